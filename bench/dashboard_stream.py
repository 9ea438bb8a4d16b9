"""Bytes per second one dashboard receives from ``/api/v1/state/stream`` with a large fleet.

    python -m bench.dashboard_stream                 # this checkout, and the given --before tree
    python -m bench.dashboard_stream --before REV    # compare with a git revision (default: the
                                                     # last commit before the delta stream)

Deterministic: one process, a fake clock (``twisted.internet.task.Clock``),
no sockets. A pool of ``--upstreams`` (500) upstreams with 4 slots each is
probed once a second (staggered), requests arrive as a Poisson process whose
rate swings between 20 % and 95 % of the fleet's capacity over a minute, run
2-12 s and are recorded in the request figures; one stream client is
attached through Twisted's real HTTP server (``MemoryHTTPClient``) and every
byte written to its connection is counted (HTTP chunk framing included) over
``--seconds`` (60) after a 30 s warm-up, and the CPU time spent building and
writing pushes. The same trace runs against the code of ``--before``
(exported with ``git archive`` into a temporary directory and run in a
subprocess), ``--reps`` (3) times each, interleaved; the medians are
reported. Results: ``bench/results/dashboard-stream.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: The last commit whose stream pushed the whole fleet on every change.
BEFORE = "0142c74"


def wire(clock: Any, pool: Any, stats: Any) -> tuple[Any, Any]:
    """The observability service and the app's resource, with whichever API this tree has."""
    from paddler.observability import snapshot, stream

    history = snapshot.StateHistory()
    if hasattr(snapshot, "FleetView"):  # the delta stream
        from paddler.observability.events import FleetEvents

        events = FleetEvents(clock)
        view = snapshot.FleetView(pool, stats, clock, history, events)
        state_stream = stream.StateStream(clock, view)
        service = stream.ObservabilityService(pool, stats, clock, history, state_stream, events)
        state = view.state
    else:  # the whole state on every change

        def state(with_history: bool) -> dict[str, Any]:
            return snapshot.build_state(pool, stats, clock, history if with_history else None)

        state_stream = stream.StateStream(clock, state)
        service = stream.ObservabilityService(pool, stats, clock, history, state_stream)
    from paddler.observability.dashboard import ObservabilityApp

    # CPU spent building and writing pushes (the simulation's own work is not counted).
    timed = {"push": 0.0}
    real_push = state_stream._push

    def push() -> None:
        started = time.process_time()
        try:
            real_push()
        finally:
            timed["push"] += time.process_time() - started

    state_stream._push = push
    service.timed = timed
    return service, ObservabilityApp(state, state_stream).resource()


def simulate(upstreams: int, seconds: float, warmup: float, seed: int) -> dict[str, Any]:
    """Run the trace on this interpreter's paddler; bytes and events the stream client got."""
    from twisted.internet.task import Clock
    from twisted.web.server import Site

    from paddler.fleet.pool import UpstreamPool
    from paddler.fleet.upstream import SlotsSeen, Upstream
    from paddler.observability.requests import RequestStats
    from paddler.routing.policies import MostIdleSlotsChooser
    from paddler.simulator.testing import MemoryHTTPClient

    rng = random.Random(seed)
    clock = Clock()
    clock.advance(1_700_000_000.0)
    pool = UpstreamPool(clock, MostIdleSlotsChooser(), max_buffered=100, buffer_timeout=30.0)
    stats = RequestStats(clock)
    slots = 4
    for i in range(upstreams):
        pool.add(Upstream(f"http://10.{i // 250}.{i % 250}.1:8080", f"gpu-{i:03d}", source="static", clock=clock))
    service, resource = wire(clock, pool, stats)
    service.startService()

    def probe(upstream: Any) -> None:
        if upstream.id in pool.upstreams:
            pool.observe(upstream, SlotsSeen(slots, upstream.slots_held, upstream.probe_mark(), models=("m.gguf",)))
            clock.callLater(1.0, probe, upstream)

    for i, upstream in enumerate(list(pool.upstreams.values())):
        clock.callLater(i / upstreams, probe, upstream)

    capacity = upstreams * slots
    mean_duration = 7.0

    def finish(lease: Any, started: float, duration: float) -> None:
        stats.record(200, clock.seconds() - started, min(duration, 0.1 + rng.random() * 0.4), lease.upstream)
        lease.release()

    def arrive(at: float) -> None:
        # Clock.advance runs a call late by up to one step: keep the arrival times exact.
        started = clock.seconds()
        duration = 2.0 + rng.random() * 10.0
        d = pool.acquire()
        d.addCallback(lambda lease: clock.callLater(duration, finish, lease, started, duration))
        d.addErrback(lambda f: stats.record(f.value.status, clock.seconds() - started))
        load = 0.575 + 0.375 * math.sin(2 * math.pi * at / 60.0)
        at += rng.expovariate(load * capacity / mean_duration)
        clock.callLater(max(0.0, at - clock.seconds()), arrive, at)

    arrive(clock.seconds())
    step = 0.01
    for _ in range(int(warmup / step)):
        clock.advance(step)
    client = MemoryHTTPClient(Site(resource, reactor=clock))
    exchange = client.get("/api/v1/state/stream")
    first = len(exchange.response.body)  # the first event (the whole state), already read
    received = first
    per_second: list[int] = []
    busy: list[int] = []
    cpu = time.process_time()
    service.timed["push"] = 0.0
    for second in range(int(seconds)):
        got = 0
        for _ in range(int(1 / step)):
            clock.advance(step)
            got += len(exchange.transport.value())
            exchange.transport.clear()
        per_second.append(got)
        busy.append(pool.totals()["slots_processing"])
        received += got
    cpu = time.process_time() - cpu
    client.close()
    service.stopService()
    per_second.sort()
    return {
        "upstreams": upstreams,
        "seconds": seconds,
        "first_event_bytes": first,
        "bytes": received - first,
        "bytes_per_second": (received - first) / seconds,
        "bytes_per_second_p50": per_second[len(per_second) // 2],
        "bytes_per_second_max": per_second[-1],
        "requests_recorded": stats.requests_total,
        "slots_busy_min_max": [min(busy), max(busy)],
        "slots": capacity,
        "cpu_seconds": round(cpu, 2),
        "push_cpu_seconds": round(service.timed["push"], 2),
    }


def run_tree(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run L{simulate} in a subprocess on the paddler package of C{tree}."""
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{ROOT}")
    out = subprocess.run(
        [sys.executable, "-m", "bench.dashboard_stream", "--child", "--upstreams", str(args.upstreams),
         "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--seed", str(args.seed)],
        env=env, cwd=tree, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstreams", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3, help="repetitions, before and after interleaved")
    parser.add_argument("--before", default=BEFORE, help="git revision to compare with")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(simulate(args.upstreams, args.seconds, args.warmup, args.seed)))  # noqa: T201
        return
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = Path(tmp) / "before"
        before_tree.mkdir()
        archive = subprocess.run(["git", "archive", args.before, "paddler", "bench"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before_tree)], input=archive, check=True)
        # The trace and its wiring are this file's: run it over the old package.
        (before_tree / "bench" / "dashboard_stream.py").write_bytes(Path(__file__).read_bytes())
        for _ in range(args.reps):
            runs["before"].append(run_tree(before_tree, args))
            runs["after"].append(run_tree(ROOT, args))

    def median(side: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[side])

    summary = {
        side: {
            "bytes_per_second": round(median(side, "bytes_per_second")),
            "push_cpu_seconds_per_minute": round(median(side, "push_cpu_seconds") * 60 / args.seconds, 2),
            "first_event_bytes": runs[side][0]["first_event_bytes"],
        }
        for side in runs
    }
    result = {
        "command": "python -m bench.dashboard_stream " + " ".join(sys.argv[1:]),
        "before_revision": args.before,
        "repetitions": args.reps,
        "medians": summary,
        "bytes_ratio": round(summary["before"]["bytes_per_second"] / max(1, summary["after"]["bytes_per_second"]), 1),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dashboard-stream.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
