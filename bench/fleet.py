"""Scenario 4: scale of the fleet.

100, 500 and 1,000 simulated upstreams (one ``paddler simulate --fleet N``
process, pinned to one core) behind one paddler (pinned to the other)
probing each every second: the balancer's CPU while no request arrives (all
of it is probing), and the chooser's cost per request, measured in-process
on the real ``UpstreamPool`` (acquire + release of one lease, per policy)
for 4, 100 and 500 upstreams.

    python -m bench.fleet [--quick]
"""

from __future__ import annotations

import argparse
import re
import time
import timeit
from typing import Any

from bench.common import (
    LOAD_CORE,
    LOOPBACK,
    PROXY_CORE,
    PYTHON,
    TMP,
    Processes,
    cpu_seconds,
    log,
    machine,
    pinned,
    raise_fd_limit,
    save,
    start_paddler,
)


def chooser_cost(n: int, policy: str, repeat: int = 5, number: int = 2000) -> float:
    """Median microseconds for one acquire + release on a pool of C{n} healthy 4-slot upstreams."""
    from twisted.internet.task import Clock

    from paddler.routing.policies import CHOOSERS
    from paddler.fleet.pool import UpstreamPool
    from paddler.fleet.upstream import SlotsSeen, Upstream

    clock = Clock()
    pool = UpstreamPool(clock, CHOOSERS[policy](clock))
    for i in range(n):
        upstream = Upstream(f"http://10.0.{i // 250}.{i % 250 + 1}:8080", clock=clock)
        upstream.record(SlotsSeen(4, i % 4, upstream.probe_mark(), models=("bench",)), 0.0)
        pool.upstreams[upstream.id] = upstream

    def one() -> None:
        d = pool.acquire("bench")
        lease = d.result  # granted at once: there is always an idle slot
        lease.release()

    times = timeit.repeat(one, repeat=repeat, number=number)
    return sorted(times)[len(times) // 2] / number * 1e6


def idle_cpu(n: int, seconds: float) -> dict[str, Any]:
    with Processes() as procs:
        name = f"s4-sim-{n}"
        sim = procs.start(pinned([PYTHON, "-m", "paddler", "simulate", "--listen", f"tcp:0:interface={LOOPBACK}",
                                  "--fleet", str(n), "--slots", "4"], LOAD_CORE), name)
        deadline = time.monotonic() + 60
        urls: list[str] = []
        while time.monotonic() < deadline:
            log_text = (TMP / f"{name}.log").read_text()
            urls = list(dict.fromkeys(re.findall(r"listening on (http://127\.0\.0\.1:\d+)", log_text)))
            if len(urls) >= n or sim.poll() is not None:
                break
            time.sleep(0.2)
        if len(urls) < n:
            raise RuntimeError(f"the simulator announced {len(urls)} of {n} servers")
        balancer, port = start_paddler(procs, [u.rstrip("/") for u in urls], f"s4-paddler-{n}", core=PROXY_CORE)
        time.sleep(5)  # past the first probes (which also read /props) and into the steady state
        b0, s0, t0 = cpu_seconds(balancer.pid), cpu_seconds(sim.pid), time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        return {
            "upstreams": n,
            "balancer_cpu_pct": 100 * (cpu_seconds(balancer.pid) - b0) / wall,
            "simulator_cpu_pct": 100 * (cpu_seconds(sim.pid) - s0) / wall,
            "seconds": wall,
        }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 s of idle, fewer chooser repetitions")
    args = parser.parse_args(argv)
    raise_fd_limit()
    seconds = 5.0 if args.quick else 15.0
    idle = []
    for n in (100, 500, 1000):
        row = idle_cpu(n, seconds)
        idle.append(row)
        log(f"fleet {n}: balancer idle CPU {row['balancer_cpu_pct']:.1f}% of a core "
            f"(simulator {row['simulator_cpu_pct']:.1f}%)")
    choosers: dict[str, dict[str, float]] = {}
    for policy in ("slots", "round-robin", "least-connections"):
        choosers[policy] = {}
        for n in (4, 100, 500):
            us = chooser_cost(n, policy, repeat=3 if args.quick else 5, number=300 if args.quick else 1000)
            choosers[policy][str(n)] = us
            log(f"chooser {policy} n={n}: {us:.1f} us per acquire+release")
    data = {"scenario": "fleet", "quick": args.quick, "machine": machine(), "idle": idle, "chooser_us": choosers}
    save("fleet", data)
    return data


if __name__ == "__main__":
    main()
