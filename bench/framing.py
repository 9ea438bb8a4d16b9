"""Connection reuse through the balancer on a well-behaved upstream, for two source trees side by side.

The strict reuse rules (docs/reliability.md, "Upstream framing") must not
cost a well-behaved upstream its kept-alive connections. This starts the
well-behaved server of ``tests/hostile_upstream.py`` (``--good``: every
answer a sized JSON) and, for each ``--source`` tree in turn, a balancer
from that tree in front of it; ``--clients`` threads send ``--requests``
completions on kept-alive connections. The upstream counts the connections
that carried them: the reuse rate is ``1 - connections / requests``.

    python -m bench.framing --source /work/main --source . [--requests 20000]

Alternates the trees ``--reps`` times and prints the figures as JSON
(``bench/results/framing.json``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not answering")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _start(args: list[str], pythonpath: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=str(pythonpath)), cwd=str(pythonpath), start_new_session=True,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)


def _load(port: int, clients: int, requests: int) -> float:
    def run(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for n in range(requests // clients):
            conn.request("POST", "/completion", b'{"prompt":"hi"}',
                         {"Content-Type": "application/json", "X-Request-Id": f"c{index}-{n}"})
            conn.getresponse().read()
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - started


def measure(source: Path, requests: int, clients: int, tmp: Path) -> dict[str, Any]:
    """One balancer from C{source} in front of a fresh well-behaved upstream: the reuse figures."""
    up_port, port, management = _free_port(), _free_port(), _free_port()
    upstream = _start(["-m", "tests.hostile_upstream", "--port", str(up_port), "--name", "good", "--good"],
                      ROOT, tmp / "upstream.log")
    balancer = None
    try:
        _wait(f"http://127.0.0.1:{up_port}/health")
        balancer = _start(
            ["-m", "paddler", "balancer", "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--management-listen", f"tcp:{management}:interface=127.0.0.1",
             "--upstream", f"good=http://127.0.0.1:{up_port}"],
            source, tmp / "balancer.log",
        )
        _wait(f"http://127.0.0.1:{port}/health")
        time.sleep(1.0)  # the first probe
        seconds = _load(port, clients, requests)
        stats = _get(f"http://127.0.0.1:{up_port}/_stats")
    finally:
        if balancer is not None:
            _stop(balancer)
        _stop(upstream)
    return {
        "source": str(source),
        "requests": stats["answers"],
        "upstream_connections": stats["connections"],
        "reuse_rate": round(1 - stats["connections"] / max(1, stats["answers"]), 5),
        "requests_per_second": round(requests / seconds),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", action="append", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    options = parser.parse_args(argv)
    tmp = ROOT / "bench" / "results" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    runs = [
        measure(source.resolve(), options.requests, options.clients, tmp)
        for _ in range(options.reps)
        for source in options.source
    ]
    result = {"clients": options.clients, "runs": runs}
    (ROOT / "bench" / "results" / "framing.json").write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    return result


if __name__ == "__main__":
    main()
