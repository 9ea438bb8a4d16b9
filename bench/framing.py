"""Connection reuse through the balancer on a well-behaved upstream, for two source trees side by side.

The strict reuse rules (docs/reliability.md, "Upstream framing") must not
cost a well-behaved upstream its kept-alive connections. This starts the
well-behaved server of ``tests/hostile_upstream.py`` (``--good``: every
answer a sized JSON) and, for each ``--source`` tree in turn, a balancer
from that tree in front of it; ``--clients`` threads send ``--requests``
completions on kept-alive connections. The upstream counts the connections
that carried them: the reuse rate is ``1 - connections / requests``.

    python -m bench.framing --source /work/main --source . [--requests 20000]
    python -m bench.framing --rules-alone 0 --requests 50000   # the client alone, no suspect period

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


def rules_alone(requests: int, clients: int, suspect: float, seed: int = 1) -> dict[str, Any]:
    """
    The production L{UpstreamClient} in this process against the hostile
    server (real TCP, 127.0.0.1), C{clients} concurrent requesters on its one
    pool, 10% of the requests with a hostile shape drawn at random: how many
    answers reached the wrong requester, and from which shapes. With
    C{suspect} 0 the reuse rules work alone (no suspect period).
    """
    import random
    from collections import Counter

    from twisted.internet import defer, reactor

    sys.path.insert(0, str(ROOT))
    from paddler.upstream.clients import CACHED_CONNECTION_TIMEOUT
    from paddler.upstream.client import UpstreamClient
    from tests.hostile_upstream import _ID, LATE_SHAPES, SHAPES, HostileFactory, verdict

    factory = HostileFactory(reactor, "hostile")
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    origin = b"http://127.0.0.1:%d" % port.getHost().port
    client = UpstreamClient(reactor, connect_timeout=5.0, max_idle_per_host=64,
                            idle_timeout=CACHED_CONNECTION_TIMEOUT, suspect_seconds=suspect)
    rng = random.Random(seed)
    hostile = sorted(set(SHAPES) - {"normal"})
    asked: dict[str, str] = {}
    outcome: Counter[str] = Counter()
    crossed_from: Counter[str] = Counter()

    class Body:
        def __init__(self) -> None:
            self.pieces: list[bytes] = []
            self.d: defer.Deferred[list[Any]] = defer.Deferred()

        def body_data(self, data: bytes) -> None:
            self.pieces.append(data)

        def body_done(self, failure: Any) -> None:
            self.d.callback([failure])

    async def one(rid: str, shape: str) -> None:
        asked[rid] = shape
        headers = [(b"Host", b"up"), (b"X-Request-Id", rid.encode()), (b"X-Hostile-Shape", shape.encode())]
        try:
            response = await client.send(b"POST", origin, b"/completion", headers, b"{}")
        except Exception:
            outcome["502"] += 1
            return
        body = Body()
        response.deliver(body)
        (failure,) = await body.d
        data = b"".join(body.pieces)
        got = verdict(rid, SHAPES[shape], response.code, data, failure is None)
        outcome[got] += 1
        if got == "cross":
            for other in {m.decode() for m in _ID.findall(data)} - {rid}:
                crossed_from[asked.get(other, "?")] += 1

    async def worker(index: int) -> None:
        for n in range(requests // clients):
            shape = rng.choice(hostile) if rng.random() < 0.1 else "normal"
            await one(f"c{index}-{n}", shape)

    async def run() -> None:
        await defer.gatherResults([defer.ensureDeferred(worker(i)) for i in range(clients)])
        await client.close()
        await port.stopListening()

    started = time.monotonic()
    d = defer.ensureDeferred(run())
    d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    cross_late = sum(n for shape, n in crossed_from.items() if shape in LATE_SHAPES)
    return {
        "requests": requests, "clients": clients, "suspect_seconds": suspect,
        "seconds": round(time.monotonic() - started, 1),
        "outcomes": dict(outcome), "cross_from_shapes": dict(crossed_from),
        "cross_from_late_shapes": cross_late, "cross_from_other_shapes": sum(crossed_from.values()) - cross_late,
        "connections": len(factory.connections), "dropped": client.dropped.get(origin, 0),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", action="append", type=Path, default=[])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--rules-alone", type=float, metavar="SUSPECT_SECONDS", default=None,
                        help="instead: the client alone against the hostile server (see rules_alone)")
    options = parser.parse_args(argv)
    if options.rules_alone is not None:
        figures = rules_alone(options.requests, 4, options.rules_alone)
        json.dump(figures, sys.stdout, indent=2)
        return figures
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
