"""Scenario 2: streaming relay.

A tiny asyncio SSE upstream (bench/sse_upstream.py) stamps each event with
the system-wide CLOCK_MONOTONIC when it writes it; the load client (its own
process, bench/loadclient.py) subtracts its own reading at receipt. Streams
run at 50 events/s each: directly (the baseline), through paddler, nginx (1
worker, proxy_buffering off) and HAProxy (1 thread), the four interleaved
within each repetition. Reported, as medians over the repetitions: delay per
chunk p50/p99, added over direct and as a ratio to direct (both computed per
repetition against that repetition's direct run, then the median; the p99
ratio also as min-max), balancer CPU (% of one core while streaming), peak
RSS (VmHWM) of a fresh balancer per cell, and peak RSS holding idle open
streams (once, after the repetitions).

    python -m bench.streaming [--quick] [--reps N]
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
    median,
    peak_rss_mib,
    percentile,
    raise_fd_limit,
    save,
    spread,
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


def run_cell(procs: Processes, upstream: Any, target: str, n: int, seconds: float, rate: float, name: str) -> dict[str, Any]:
    """One stream-size cell for one target, with a fresh balancer (so its peak RSS is this cell's)."""
    proc, port = start_target(procs, target, upstream.port, name)
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
    return row


def summarise(runs: list[dict[str, Any]], direct: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repetitions; added delay and ratios per repetition against that repetition's direct run."""
    row: dict[str, Any] = {
        "streams": runs[0]["streams"],
        "repetitions": len(runs),
        "events": sum(r["events"] for r in runs),
        "expected_events": sum(r["expected_events"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
    }
    for key in ("p50_ms", "p99_ms", "client_cpu_pct", "upstream_cpu_pct", "balancer_cpu_pct", "peak_rss_mib"):
        if key in runs[0]:
            row[key] = median(r[key] for r in runs)
    if runs is not direct:
        pairs = list(zip(runs, direct))
        row["added_p50_ms"] = median(r["p50_ms"] - d["p50_ms"] for r, d in pairs)
        row["added_p99_ms"] = median(r["p99_ms"] - d["p99_ms"] for r, d in pairs)
        p50_ratios = [r["p50_ms"] / d["p50_ms"] for r, d in pairs if d["p50_ms"]]
        p99_ratios = [r["p99_ms"] / d["p99_ms"] for r, d in pairs if d["p99_ms"]]
        row["p50_vs_direct"] = median(p50_ratios)
        row["p99_vs_direct"] = median(p99_ratios)
        row["p99_vs_direct_spread"] = spread(p99_ratios)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, 2 s streams, 1 and 64 streams, 300 idle")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3, 1 with --quick)")
    args = parser.parse_args(argv)
    raise_fd_limit()
    reps = args.reps or (1 if args.quick else 3)
    sizes = (1, 64) if args.quick else (1, 64, 256)
    seconds = 2.0 if args.quick else 5.0
    idle = 300 if args.quick else 2000
    hold = 2.0 if args.quick else 6.0
    rate = 50.0
    runs: dict[str, list[dict[str, Any]]] = {f"{t}/{n}": [] for n in sizes for t in TARGETS}
    with Processes() as procs:
        upstream_port = free_port()
        upstream = procs.start([PYTHON, "-m", "bench.sse_upstream", "--port", str(upstream_port)], "s2-upstream")
        upstream.port = upstream_port  # type: ignore[attr-defined]
        wait_port(upstream_port, 15, upstream)
        for rep in range(reps):
            for n in sizes:
                for target in TARGETS:  # interleaved: drifting machine load hits every target alike
                    row = run_cell(procs, upstream, target, n, seconds, rate, f"s2-{target}-{n}")
                    runs[f"{target}/{n}"].append(row)
                    log(f"streaming rep {rep + 1}/{reps} {target} x{n}: p50 {row['p50_ms']:.2f} ms "
                        f"p99 {row['p99_ms']:.2f} ms events {row['events']}/{row['expected_events']} "
                        f"errors {row['errors']} cpu {row.get('balancer_cpu_pct', 0):.0f}% "
                        f"client {row['client_cpu_pct']:.0f}%")
        rows = {key: summarise(rs, runs[f"direct/{key.split('/')[1]}"]) for key, rs in runs.items()}
        idle_rows: dict[str, Any] = {}
        for target in TARGETS[1:]:
            name = f"s2-{target}-idle"
            proc, port = start_target(procs, target, upstream_port, name)
            rss_before = peak_rss_mib(proc.pid)
            result = run_client(procs, "idle", port, f"{name}-client", streams=idle, hold=hold,
                                ramp=1.0 if args.quick else 2.0)
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
        "repetitions": reps,
        "seconds_per_stream": seconds,
        "rate": rate,
        "machine": machine(),
        "rows": rows,
        "runs": runs,
        "idle": idle_rows,
    }
    save("streaming", data)
    return data


if __name__ == "__main__":
    main()
