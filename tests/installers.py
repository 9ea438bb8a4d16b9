"""Running the suite's installer scripts (chromium, redis-server, promtool, ...) from fixtures.

An installer prints the path (or version) of what it installed as its last
line, exits 3 when the tool cannot be installed here (the test is skipped
with the reason it gave on stderr), and any other non-zero status fails the
test.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

#: An installer's exit status for "cannot be installed in this environment".
EXIT_ENVIRONMENT = 3
#: Longest an installer may take (a first apt-get install of chromium on a slow mirror).
INSTALL_DEADLINE = 900.0


def run_installer(script: Path, deadline: float = INSTALL_DEADLINE) -> str:
    """Run an installer script; the last line it printed, or skip/fail the test with its reason."""
    try:
        result = subprocess.run(
            ["bash", str(script)],
            capture_output=True,
            text=True,
            timeout=deadline,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"{script.name} did not finish within {deadline:.0f} s")
    reason = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "")
    if result.returncode == EXIT_ENVIRONMENT:
        pytest.skip(reason or f"{script.name} cannot install here")
    if result.returncode != 0:
        pytest.fail(f"{script.name} exited {result.returncode}: {reason}", pytrace=False)
    lines = result.stdout.strip().splitlines()
    if not lines:
        pytest.fail(f"{script.name} printed nothing", pytrace=False)
    return lines[-1]
