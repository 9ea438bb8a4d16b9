"""Scenario 2: streaming relay.

A tiny asyncio SSE upstream (bench/sse_upstream.py) stamps each event with
the system-wide CLOCK_MONOTONIC when it writes it; the load client (its own
process, bench/loadclient.py) subtracts its own reading at receipt. Streams
run at 50 events/s each: directly (the baseline of the same run), through
paddler, nginx (1 worker, proxy_buffering off) and HAProxy (1 thread).
Reported: delay per chunk p50/p99 and added over direct, balancer CPU (% of
one core while streaming), peak RSS (VmHWM) of a fresh balancer per run, and
peak RSS holding idle open streams.

    python -m bench.streaming [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench.common import (
    LOOPBACK,
    PYTHON,
    TMP,
    Processes,
    cpu_seconds,
    free_port,
    log,
    machine,
    peak_rss_mib,
    percentile,
    raise_fd_limit,
    save,
    start_haproxy,
    start_nginx,
    start_paddler,
    wait_port,
)

TARGETS = ("direct", "paddler", "nginx", "haproxy")


def start_target(procs: Processes, target: str, upstream_port: int, name: str) -> tuple[Any, int]:
    if target == "direct":
        return None, upstream_port
    if target == "paddler":
        # idle streams must not hit --idle-timeout; every stream takes a slot
        return start_paddler(procs, [f"http://{LOOPBACK}:{upstream_port}"], name,
                             extra=["--idle-timeout", "300", "--max-buffered-requests", "5000"])
    if target == "nginx":
        return start_nginx(procs, [upstream_port], name, streaming=True)
    return start_haproxy(procs, [upstream_port], name, streaming=True)


def run_client(procs: Processes, mode: str, port: int, name: str, **kw: Any) -> dict[str, Any]:
    out = TMP / f"{name}.json"
    args = [PYTHON, "-m", "bench.loadclient", mode, "--port", str(port), "--out", str(out)]
    for key, value in kw.items():
        args += [f"--{key}", str(value)]
    proc = procs.start(args, name)
    proc.wait(timeout=600)
    procs.stop(proc)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s streams, up to 256 streams, 500 idle")
    args = parser.parse_args(argv)
    raise_fd_limit()
    sizes = (1, 64, 256) if args.quick else (1, 64, 512)
    seconds = 2.0 if args.quick else 8.0
    idle = 500 if args.quick else 2000
    rate = 50.0
    rows: dict[str, dict[str, Any]] = {}
    with Processes() as procs:
        upstream_port = free_port()
        upstream = procs.start([PYTHON, "-m", "bench.sse_upstream", "--port", str(upstream_port)], "s2-upstream")
        wait_port(upstream_port, 15, upstream)
        for n in sizes:
            for target in TARGETS:
                name = f"s2-{target}-{n}"
                proc, port = start_target(procs, target, upstream_port, name)
                pid = proc.pid if proc is not None else None
                up0 = cpu_seconds(upstream.pid)
                before = cpu_seconds(pid) if pid else 0.0
                t0 = time.monotonic()
                result = run_client(procs, "streams", port, f"{name}-client", streams=n,
                                    events=int(seconds * rate), rate=rate, ramp=min(1.0, n / 256))
                wall = time.monotonic() - t0
                delays = result["delays"]
                row = {
                    "streams": n,
                    "events": result["events"],
                    "expected_events": result["expected_events"],
                    "errors": result["errors"],
                    "p50_ms": percentile(delays, 50) * 1000,
                    "p99_ms": percentile(delays, 99) * 1000,
                    "client_cpu_pct": 100 * result["client_cpu"] / wall,
                    "upstream_cpu_pct": 100 * (cpu_seconds(upstream.pid) - up0) / wall,
                }
                if pid:
                    row["balancer_cpu_pct"] = 100 * (cpu_seconds(pid) - before) / wall
                    row["peak_rss_mib"] = peak_rss_mib(pid)
                    procs.stop(proc)
                rows[f"{target}/{n}"] = row
                log(f"streaming {target} x{n}: p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms "
                    f"events {row['events']}/{row['expected_events']} errors {row['errors']} "
                    f"cpu {row.get('balancer_cpu_pct', 0):.0f}% client {row['client_cpu_pct']:.0f}%")
            for target in TARGETS[1:]:
                row = rows[f"{target}/{n}"]
                base = rows[f"direct/{n}"]
                row["added_p50_ms"] = row["p50_ms"] - base["p50_ms"]
                row["added_p99_ms"] = row["p99_ms"] - base["p99_ms"]
        idle_rows: dict[str, Any] = {}
        for target in TARGETS[1:]:
            name = f"s2-{target}-idle"
            proc, port = start_target(procs, target, upstream_port, name)
            rss_before = peak_rss_mib(proc.pid)
            result = run_client(procs, "idle", port, f"{name}-client", streams=idle, hold=5 if args.quick else 8,
                                ramp=2.0)
            idle_rows[target] = {
                "streams": idle,
                "opened": result["opened"],
                "errors": result["errors"],
                "rss_at_start_mib": rss_before,
                "peak_rss_mib": peak_rss_mib(proc.pid),
            }
            procs.stop(proc)
            log(f"idle {target} x{idle}: opened {result['opened']} peak RSS {idle_rows[target]['peak_rss_mib']:.1f} MiB")
    data = {
        "scenario": "streaming",
        "quick": args.quick,
        "seconds_per_stream": seconds,
        "rate": rate,
        "machine": machine(),
        "rows": rows,
        "idle": idle_rows,
    }
    save("streaming", data)
    return data


if __name__ == "__main__":
    main()
