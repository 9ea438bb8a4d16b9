"""Scenario: several balancers on one fleet, with and without shared state on Redis.

The scheduling scenario's fleet (two 4-slot servers at 60 tokens/s, two
2-slot servers at 20 tokens/s) and its seeded Poisson trace at 80 % load,
replayed through four configurations at once, each on its own identical
fleet:

- ``1-local``: one balancer (the reference);
- ``1-redis``: one balancer with ``--state`` (what the store path costs);
- ``3-local``: three balancers that each know the whole fleet, without shared
  state: each sees only its own leases, so between probes they send requests
  to slots the others took;
- ``3-redis``: three balancers sharing leases and one buffer through Redis.

With three balancers, request i of the trace goes to balancer i mod 3 (one
load client per balancer, each replaying its third of the trace). Figures:
TTFT p50/p99, e2e p99, and the oversubscription of the servers, read every
50 ms from their ``/metrics`` (``llamacpp:requests_deferred``: requests a
server queued inside itself because all its slots were busy): the most seen
at once and the request-seconds spent queued there. Redis is Debian's
``redis-server`` on a free loopback port, no persistence.

    python -m bench.replicas [--quick] [--reps N] [--duration S]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import threading
import time
from typing import Any

from bench.common import (
    LOOPBACK,
    PYTHON,
    TMP,
    Processes,
    free_port,
    http_get,
    log,
    machine,
    median,
    raise_fd_limit,
    save,
    spread,
    start_paddler,
    wait_port,
)
from bench.scheduling import collect_fleet, launch_fleet, make_trace, summarise

CONFIGS = {"1-local": (1, False), "1-redis": (1, True), "3-local": (3, False), "3-redis": (3, True)}
LOAD = 0.8


class DeferredWatcher:
    """Polls every server's ``llamacpp:requests_deferred`` and integrates it over time."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.peak = 0
        self.seconds = 0.0
        self.started = time.monotonic()
        self.seen: list[tuple[float, int, int]] = []  # (seconds from the start, server port, requests queued)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            queued = 0
            for port in self.ports:
                try:
                    status, body = http_get(port, "/metrics", timeout=1.0)
                except OSError:
                    continue
                for line in body.decode(errors="replace").splitlines():
                    if line.startswith("llamacpp:requests_deferred"):
                        here = int(float(line.rsplit(" ", 1)[1]))
                        queued += here
                        if here:
                            self.seen.append((round(time.monotonic() - self.started, 3), port, here))
            now = time.monotonic()
            self.seconds += queued * (now - last)
            last = now
            self.peak = max(self.peak, queued)
            self._stop.wait(0.05)

    def __enter__(self) -> DeferredWatcher:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)


def start_redis(procs: Processes) -> int:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = procs.start([binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"],
                       "replicas-redis")
    wait_port(port, proc=proc)
    return port


def run_once(duration: float, seed: int, rep: int) -> dict[str, Any]:
    trace = make_trace(LOAD, duration, seed)
    TMP.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with Processes() as procs:
        redis_port = start_redis(procs)
        fleets = {config: launch_fleet(procs, f"rep{rep + 1}-{config}") for config in CONFIGS}
        clients = []
        watchers = {}
        for index, (config, (count, shared)) in enumerate(CONFIGS.items()):
            urls = collect_fleet(fleets[config])
            extra = ["--max-buffered-requests", "100000", "--buffered-request-timeout", "600",
                     "--upstream-timeout", "600", "--idle-timeout", "600", "--probe-interval", "0.25"]
            if shared:
                extra += ["--state", f"redis://{LOOPBACK}:{redis_port}/0", "--state-prefix", f"{{bench{index}}}"]
            ports = [start_paddler(procs, urls, f"rep{rep + 1}-{config}-{i}", policy="slots", extra=extra)[1]
                     for i in range(count)]
            watchers[config] = DeferredWatcher([int(u.rsplit(":", 1)[1]) for u in urls])
            for part, port in enumerate(ports):
                sub = dict(trace, requests=[r for r in trace["requests"] if r["id"] % count == part])
                path = TMP / f"rep-{config}-{part}.json"
                path.write_text(json.dumps(sub))
                out = TMP / f"rep-{config}-{part}-client.json"
                clients.append((config, out, [PYTHON, "-m", "bench.loadclient", "trace", "--port", str(port),
                                              "--trace", str(path), "--out", str(out), "--timeout", "600"]))
        time.sleep(1.0)  # the shared balancers' first sync and probes
        for watcher in watchers.values():
            watcher.__enter__()
        started = [(config, out, procs.start(args, f"{out.stem}")) for config, out, args in clients]
        for _, _, client in started:
            client.wait(timeout=900)
        for watcher in watchers.values():
            watcher.__exit__()
        records: dict[str, list[dict[str, Any]]] = {config: [] for config in CONFIGS}
        walls: dict[str, float] = {config: 0.0 for config in CONFIGS}
        for config, out, _ in started:
            data = json.loads(out.read_text())
            records[config].extend(data["results"])
            walls[config] = max(walls[config], data["wall"])
        for config in CONFIGS:
            row = summarise(records[config], walls[config], trace)
            row["deferred_peak"] = watchers[config].peak
            row["deferred_request_seconds"] = watchers[config].seconds
            row["deferred_seen"] = watchers[config].seen[:200]
            results[config] = row
            log(f"replicas rep {rep + 1} {config}: ttft p50 {row['ttft_p50']:.2f} s p99 {row['ttft_p99']:.2f} s, "
                f"e2e p99 {row['e2e_p99']:.1f} s, queued inside servers: peak {row['deferred_peak']}, "
                f"{row['deferred_request_seconds']:.1f} request-s, errors {row['errors']}")
    reference = results["1-local"]["ttft_p99"]
    for row in results.values():
        row["ttft_p99_vs_1_local"] = row["ttft_p99"] / reference if reference else float("nan")
    return {"seed": seed, "requests": len(trace["requests"]), "results": results}


FIGURES = ("ttft_p50", "ttft_p99", "e2e_p99", "deferred_peak", "deferred_request_seconds", "ttft_p99_vs_1_local")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, 8 s of arrivals")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--seed", type=int, default=31)
    args = parser.parse_args(argv)
    raise_fd_limit()
    if shutil.which("redis-server") is None and not shutil.which("/usr/bin/redis-server"):
        subprocess.run(["bash", "tests/shared/install-redis"], check=True)
    reps = args.reps or (1 if args.quick else 3)
    duration = args.duration or (8.0 if args.quick else 20.0)
    runs = [run_once(duration, args.seed + 100 * rep, rep) for rep in range(reps)]
    combined: dict[str, Any] = {}
    for config in CONFIGS:
        per_rep = [run["results"][config] for run in runs]
        row = {key: median(r[key] for r in per_rep) for key in FIGURES}
        row["ttft_p99_vs_1_local_spread"] = spread(r["ttft_p99_vs_1_local"] for r in per_rep)
        row["errors"] = sum(r["errors"] for r in per_rep)
        combined[config] = row
    data = {"scenario": "replicas", "machine": machine(), "load": LOAD, "repetitions": reps,
            "duration_s": duration, "runs": runs, "results": combined}
    save("replicas", data)
    return data


if __name__ == "__main__":
    main()
