"""The chaos harness's long form: ``bench/run chaos`` (or ``python -m bench.chaos [--quick]``).

Runs tests/chaos with ``PADDLER_CHAOS=long`` (``--quick``: the short form
the test suite runs), collects the figures every test reports and writes
bench/results/chaos.json and bench/results/chaos.md. Everything listens on
127.0.0.1; every phase is bounded. Exits with pytest's status.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import RESULTS, machine


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Chaos harness results",
        "",
        f"`{data['command']}`: the {data['form']} form, {data['seconds']:.0f} s, "
        f"pytest {'passed' if data['passed'] else 'FAILED'}; {data['machine']['cores']} cores "
        f"({data['machine']['cpu']}), Python {data['machine']['python']}.",
        "",
    ]
    for record in data["tests"]:
        figures = {k: v for k, v in record.items() if k not in ("test", "form")}
        lines.append(f"## {record['test']}")
        lines.append("")
        for key, value in figures.items():
            lines.append(f"- {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short form (as in the test suite)")
    parser.add_argument("-k", default=None, help="only the tests whose names match (pytest -k)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    figures = RESULTS / "chaos.jsonl"
    figures.unlink(missing_ok=True)
    env = dict(os.environ, PADDLER_CHAOS="short" if args.quick else "long", PADDLER_CHAOS_REPORT=str(figures))
    command = [sys.executable, "-m", "pytest", "tests/chaos", "-m", "chaos", "-q", "-p", "no:randomly",
               "-o", "timeout=3600"]
    if args.k:
        command += ["-k", args.k]
    started = time.monotonic()
    status = subprocess.call(command, env=env)
    records = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    figures.unlink(missing_ok=True)
    data = {
        "command": "bench/run chaos" + (" --quick" if args.quick else ""),
        "form": "short" if args.quick else "long",
        "seconds": time.monotonic() - started,
        "passed": status == 0,
        "machine": machine(),
        "tests": records,
    }
    (RESULTS / "chaos.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "chaos.md").write_text(markdown(data))
    print(f"wrote {RESULTS / 'chaos.json'} and chaos.md", file=sys.stderr)  # noqa: T201
    return status


if __name__ == "__main__":
    raise SystemExit(main())
