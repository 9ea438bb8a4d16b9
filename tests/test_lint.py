"""ruff finds no unused import, undefined name or similar mistake (pyflakes rules) in the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_no_pyflakes_errors():
    # F811 is left out: pytest fixtures imported into a test module and named as arguments look redefined.
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F", "--ignore", "F811",
         "paddler", "tests", "bench", "twisted"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
