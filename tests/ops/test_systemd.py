"""contrib/systemd: the units verify cleanly and are hardened (exposure at most 3.0).

``systemd-analyze`` runs offline on the unit files inside a scratch root
(``--root``) that holds the units, a stub ``/opt/paddler/bin/paddler`` and a
copy of the system's own unit directory (for ``sysinit.target`` and friends):
nothing is installed on, started on or read from the host's systemd.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT

UNITS = ROOT / "contrib" / "systemd"
UNIT_NAMES = ("paddler-balancer.service", "paddler-agent.service")
MAX_EXPOSURE = 3.0
EXECUTABLE = "/opt/paddler/bin/paddler"
SYSTEM_UNIT_DIRS = ("usr/lib/systemd/system", "lib/systemd/system")


@pytest.fixture
def unit_root(tmp_path: Path, systemd_analyze: str) -> Path:
    """A scratch root with the two units, a stub paddler and the distribution's units."""
    root = tmp_path / "root"
    for relative in SYSTEM_UNIT_DIRS:
        source = Path("/") / relative
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, root / relative, symlinks=True)
            break
    else:
        pytest.skip("no systemd unit directory (/usr/lib/systemd/system) to verify against")
    for executable in (EXECUTABLE, "/bin/kill"):  # ExecStart and ExecReload
        stub = root / executable.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in UNIT_NAMES:
        shutil.copy(UNITS / name, root / "etc/systemd/system" / name)
    return root


def analyze(systemd_analyze: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def test_systemd_analyze_verify_is_clean(systemd_analyze: str, unit_root: Path) -> None:
    """`systemd-analyze verify` exits 0 and prints nothing (no unknown keys, no bad values) for both units."""
    result = analyze(systemd_analyze, "verify", f"--root={unit_root}", *UNIT_NAMES)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_does_report_a_misspelt_directive(systemd_analyze: str, unit_root: Path) -> None:
    """The check can fail: a misspelt hardening directive shows up in verify's output."""
    unit = unit_root / "etc/systemd/system" / UNIT_NAMES[0]
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHoem=yes"))
    result = analyze(systemd_analyze, "verify", f"--root={unit_root}", UNIT_NAMES[0])
    assert "ProtectHoem" in result.stdout + result.stderr


def exposure(systemd_analyze: str, root: Path, name: str) -> float:
    result = analyze(systemd_analyze, "security", "--offline=true", f"--root={root}", "--no-pager", name)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_the_unit_is_hardened_to_at_most_3(systemd_analyze: str, unit_root: Path, name: str) -> None:
    """`systemd-analyze security --offline=true` rates the unit at most 3.0 (it was 8.3, EXPOSED)."""
    assert exposure(systemd_analyze, unit_root, name) <= MAX_EXPOSURE


def test_the_rating_reacts_to_the_hardening(systemd_analyze: str, unit_root: Path) -> None:
    """Without its hardening section the same unit rates above 3.0: the score measures these directives."""
    unit = unit_root / "etc/systemd/system" / UNIT_NAMES[0]
    text = unit.read_text()
    bare = text[: text.index("DynamicUser=yes")] + text[text.index("[Install]"):]
    unit.write_text(bare)
    assert exposure(systemd_analyze, unit_root, UNIT_NAMES[0]) > MAX_EXPOSURE


def exec_start(name: str) -> list[str]:
    (line,) = [line for line in (UNITS / name).read_text().splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line[len("ExecStart="):])


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_the_unit_runs_the_paddler_console_script_with_real_flags(name: str, paddler_help) -> None:
    """ExecStart is the `paddler` console script (not twistd: no plugin cache is written) with flags paddler knows."""
    argv = exec_start(name)
    assert argv[0] == EXECUTABLE
    subcommand, *args = argv[1:]
    assert subcommand in ("balancer", "agent")
    flags = {arg for arg in args if arg.startswith("--")}
    assert flags and flags <= set(re.findall(r"--[a-z][a-z0-9-]*", paddler_help(subcommand)))


def test_the_agent_unit_outlasts_its_drain() -> None:
    """TimeoutStopSec is above the agent's --drain-timeout, so systemd does not kill it mid-drain."""
    argv = exec_start("paddler-agent.service")
    drain = float(argv[argv.index("--drain-timeout") + 1])
    (line,) = [line for line in (UNITS / "paddler-agent.service").read_text().splitlines() if line.startswith("TimeoutStopSec=")]
    assert float(line.split("=", 1)[1]) > drain
