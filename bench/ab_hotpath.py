"""A/B of paddler as it is against paddler with the proposed hot-path fixes (bench/patched.py).

Same static upstream, wrk at concurrency 1 and 16, the two balancers
interleaved; medians of the per-repetition ratios.

    python -m bench.ab_hotpath [--reps 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import LOOPBACK, PYTHON, Processes, free_port, log, machine, median, raise_fd_limit, save, wait_healthy, wait_port
from bench.overhead import run_wrk
from bench.common import start_paddler, start_static_upstream


def start_patched(procs: Processes, urls: list[str], name: str) -> tuple[Any, int]:
    port, mport = free_port(), free_port()
    args = [PYTHON, "-m", "bench.patched", "balancer",
            "--listen", f"tcp:{port}:interface={LOOPBACK}:backlog=4096",
            "--management-listen", f"tcp:{mport}:interface={LOOPBACK}", "--probe-interval", "1"]
    for url in urls:
        args += ["--upstream", url]
    proc = procs.start(args, name)
    wait_port(port, 30, proc)
    wait_healthy(port, len(urls), proc)
    return proc, port


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    raise_fd_limit()
    rows: dict[str, Any] = {}
    with Processes() as procs:
        _, ports = start_static_upstream(procs, 2, "ab-upstream")
        urls = [f"http://{LOOPBACK}:{p}" for p in ports]
        stock, stock_port = start_paddler(procs, urls, "ab-stock")
        patched, patched_port = start_patched(procs, urls, "ab-patched")
        for c in (1, 16):
            runs: dict[str, list[dict[str, float]]] = {"stock": [], "patched": []}
            for _ in range(args.reps):
                runs["stock"].append(run_wrk(stock_port, c, args.seconds, stock.pid))
                runs["patched"].append(run_wrk(patched_port, c, args.seconds, patched.pid))
            rows[str(c)] = {
                "stock_rps": median(r["rps"] for r in runs["stock"]),
                "patched_rps": median(r["rps"] for r in runs["patched"]),
                "rps_ratio": median(p["rps"] / s["rps"] for p, s in zip(runs["patched"], runs["stock"])),
                "cpu_ratio": median(p["cpu_s_per_1000"] / s["cpu_s_per_1000"] for p, s in zip(runs["patched"], runs["stock"])),
                "stock_cpu_s_per_1000": median(r["cpu_s_per_1000"] for r in runs["stock"]),
                "patched_cpu_s_per_1000": median(r["cpu_s_per_1000"] for r in runs["patched"]),
            }
            log(f"A/B c={c}: {rows[str(c)]}")
    data = {"scenario": "ab_hotpath", "reps": args.reps, "seconds": args.seconds, "machine": machine(), "rows": rows}
    save("ab_hotpath", data)
    return data


if __name__ == "__main__":
    main()
