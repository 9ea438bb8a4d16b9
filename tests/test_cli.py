"""The ``paddler`` command line as users meet it: usage lines, one-line errors, exit codes,
a regular (non-editable) install that needs no plugin discovery."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from paddler import __version__
from paddler.cli import USAGE_ERROR, parse

ROOT = Path(__file__).resolve().parents[1]


def paddler(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PADDLER_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "paddler", *args],
        capture_output=True, text=True, timeout=timeout, cwd="/", env=environment,
    )


@pytest.mark.parametrize(
    "command, usage",
    [
        ("balancer", "Usage: paddler balancer [options]"),
        ("agent", "Usage: paddler agent --llamacpp URL --balancer URL [options]"),
        ("simulate", "Usage: paddler simulate [options]"),
    ],
)
def test_help_shows_a_plain_usage_line_and_exits_0(command, usage):
    result = paddler(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == usage
    assert "twistd" not in result.stdout and result.stderr == ""


def test_version_prints_paddlers_version():
    result = paddler("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"paddler {__version__}")


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["balancer", "--nope"], {}, "paddler balancer: error: option --nope not recognized"),
        (["balancer", "--probe-interval", "soon"], {}, "--probe-interval must be a number, got 'soon'"),
        (["balancer", "--upstream", "http://[::1"], {}, "--upstream: url is not a valid URL"),
        (["balancer", "--config", "/nonexistent.toml"], {}, "--config /nonexistent.toml: cannot read it"),
        (["balancer"], {"PADDLER_MAX_RETRIES": "-1"}, "PADDLER_MAX_RETRIES must be at least 0"),
        (["agent", "--llamacpp", "http://127.0.0.1:1"], {}, "paddler agent: error: --balancer is required"),
        (["simulate", "--slots", "0"], {}, "paddler simulate: error: --slots must be at least 1"),
        ([], {}, "paddler: error: choose a subcommand"),
    ],
)
def test_a_bad_command_line_is_one_line_and_a_hint_on_stderr_with_status_2(args, env, words):
    result = paddler(*args, env=env)
    assert result.returncode == USAGE_ERROR
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert words in lines[0]
    assert lines[1].startswith("Try 'paddler") and "--help" in lines[1]


def test_a_taken_port_is_one_line_naming_the_endpoint_with_status_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        result = paddler("simulate", "--listen", endpoint, timeout=60)
        balancer = paddler("balancer", "--listen", endpoint, "--management-listen", "tcp:0:interface=127.0.0.1")
    for outcome in (result, balancer):
        assert outcome.returncode == 1, outcome.stderr
        errors = [line for line in outcome.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and endpoint in errors[0] and "Traceback" not in outcome.stderr


def test_the_console_script_never_looks_for_twisted_plugins():
    """The console script parses and builds its service on its own: plugin discovery and twistd are never used."""
    stderr = io.StringIO()
    code = (
        "import sys, twisted.plugin\n"
        "def refuse(*a, **k): raise AssertionError('plugin discovery')\n"
        "twisted.plugin.getPlugins = refuse\n"
        "from paddler.cli import parse\n"
        "from paddler.tap import makeService\n"
        "makeService(parse(['balancer', '--management-listen', 'tcp:0:interface=127.0.0.1'], sys.stderr))\n"
        "print('twisted.scripts.twistd' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert result.stdout.split() == ["False"], result.stderr
    with pytest.raises(SystemExit) as exit:
        parse(["balancer", "--max-retries", "x"], stderr)
    assert exit.value.code == USAGE_ERROR and "--max-retries" in stderr.getvalue()


@pytest.mark.integration
def test_a_regular_install_runs_paddler_and_twistd_paddler_from_any_directory(tmp_path):
    """A wheel installed into a plain directory: `paddler balancer --help` and `twistd paddler --help` work."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True, timeout=300, capture_output=True,
    )
    target = tmp_path / "site"
    [wheel] = wheels.glob("paddler-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, timeout=300, capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLER_")}
    env["PYTHONPATH"] = str(target)
    script = target / "bin" / "paddler"
    result = subprocess.run([str(script), "balancer", "--help"], capture_output=True, text=True,
                            timeout=60, cwd="/", env=env)
    assert result.returncode == 0 and result.stdout.startswith("Usage: paddler balancer"), result.stderr
    located = subprocess.run([sys.executable, "-c", "import paddler; print(paddler.__file__)"],
                             capture_output=True, text=True, timeout=60, cwd="/", env=env)
    assert located.stdout.startswith(str(target))
    twistd = subprocess.run(
        [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
         "sys.argv=['twistd','paddler','balancer','--help']; run()"],
        capture_output=True, text=True, timeout=60, cwd="/", env=env,
    )
    assert twistd.returncode == 0 and "Usage: paddler balancer [options]" in twistd.stdout, twistd.stderr
