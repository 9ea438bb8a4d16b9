"""Scenario 2: streaming relay.

A tiny SSE upstream (bench/sse_upstream.py) stamps each event with the
system-wide CLOCK_MONOTONIC when it writes it; the load client (its own
process, bench/loadclient.py) subtracts its own reading at receipt. Streams
run at 50 events/s each: directly (the baseline), through paddler
(pass-through relay, the default), paddler with --no-relay-passthrough
(decode and re-encode), sglang-router, HAProxy (1 thread) and nginx (1
worker, proxy_buffering off), interleaved within each repetition. The proxy
under test is pinned to one core (taskset), the upstream and the load
client to the other, so that the proxy has a core of its own.

Reported, as medians over the repetitions: delay per chunk p50/p99, added
over direct and as a ratio to direct (both computed per repetition against
that repetition's direct run, then the median; the p99 ratio and the added
p99 also as min-max), the proxy's CPU (% of one core while streaming) and
CPU seconds per 1,000 chunks, its peak RSS (VmHWM, a fresh proxy per cell),
and, once after the repetitions, the memory each proxy holds per idle open
stream.

    python -m bench.streaming [--quick] [--reps N] [--sizes 512,1000] [--targets paddler,haproxy]
    python -m bench.streaming --sizes 512 --targets paddler,paddler-base --base /tmp/old --out streaming-ab
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any

from bench.common import (
    LOAD_CORE,
    LOOPBACK,
    PROXY_CORE,
    PYTHON,
    TMP,
    Processes,
    busy_between,
    machine_busy,
    cpu_seconds,
    free_port,
    log,
    machine,
    median,
    peak_rss_mib,
    percentile,
    pinned,
    raise_fd_limit,
    save,
    sglang_router_command,
    spread,
    start_haproxy,
    start_nginx,
    start_paddler,
    start_sglang_router,
    tool_version,
    wait_port,
)

TARGETS = ("direct", "paddler", "paddler-decode", "sglang-router", "haproxy", "nginx")
#: reference targets, only on request (--targets): a plain TCP forwarder on Twisted, the floor of any Twisted
#: relay; paddler from another checkout (--base DIR, e.g. an older commit unpacked with git archive)
EXTRA_TARGETS = ("twisted-floor", "twisted-floor-lean", "twisted-floor-asyncio", "twisted-floor-uvloop", "paddler-base", "paddler-base-flush",
                 "paddler-twisted", "paddler-workers2", "paddler-workers2-flush")
BASE: list[str] = [""]
RATE = 50.0


def start_target(procs: Processes, target: str, upstream_port: int, name: str) -> tuple[Any, int]:
    if target == "direct":
        return None, upstream_port
    if target in ("paddler", "paddler-decode", "paddler-base", "paddler-base-flush", "paddler-twisted"):
        # idle streams must not hit --idle-timeout; every stream takes a slot
        extra = ["--idle-timeout", "300", "--max-buffered-requests", "5000"]
        if target == "paddler-decode":
            extra.append("--no-relay-passthrough")
        if target in ("paddler", "paddler-decode", "paddler-base-flush"):  # the write flush (the default now; a --base checkout may predate that)
            extra.append("--flush-before-poll")
        if target == "paddler-twisted":  # this code on Twisted's own reactor and write buffering
            extra.append("--no-lean-reactor")
        source = BASE[0] if target.startswith("paddler-base") else None
        return start_paddler(procs, [f"http://{LOOPBACK}:{upstream_port}"], name, extra=extra, core=PROXY_CORE,
                             source=source)
    if target.startswith("paddler-workers2"):
        # two balancer processes on one port (SO_REUSEPORT) sharing leases through Redis, on both
        # cores (not pinned): what --workers buys when the proxy is the bottleneck
        state = f"redis://{LOOPBACK}:{_redis(procs)}/0"
        extra = ["--idle-timeout", "300", "--max-buffered-requests", "5000", "--workers", "2",
                 "--state", state, "--state-prefix", "{" + name + "}"]
        if target == "paddler-workers2-flush":
            extra.append("--flush-before-poll")
        return start_paddler(procs, [f"http://{LOOPBACK}:{upstream_port}"], name, extra=extra)
    if target.startswith("twisted-floor"):
        port = free_port()
        loop = target[len("twisted-floor-"):] or "epoll"
        proc = procs.start(pinned([PYTHON, "-m", "bench.twisted_forward", "--port", str(port),
                                   "--upstream-port", str(upstream_port), "--loop", loop], PROXY_CORE), name)
        wait_port(port, 15, proc)
        return proc, port
    if target == "sglang-router":
        return start_sglang_router(procs, [upstream_port], name, core=PROXY_CORE)
    if target == "nginx":
        return start_nginx(procs, [upstream_port], name, streaming=True, core=PROXY_CORE)
    return start_haproxy(procs, [upstream_port], name, streaming=True, core=PROXY_CORE)


_REDIS: dict[int, int] = {}


def _redis(procs: Processes) -> int:
    """A redis-server on loopback for the workers target (one per Processes)."""
    key = id(procs)
    if key not in _REDIS:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        port = free_port()
        proc = procs.start([binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"],
                           "streaming-redis")
        wait_port(port, 15, proc)
        _REDIS[key] = port
    return _REDIS[key]


def run_client(procs: Processes, mode: str, port: int, name: str, **kw: Any) -> dict[str, Any]:
    out = TMP / f"{name}.json"
    args = [PYTHON, "-m", "bench.loadclient", mode, "--port", str(port), "--out", str(out)]
    for key, value in kw.items():
        args += [f"--{key}", str(value)]
    proc = procs.start(pinned(args, LOAD_CORE), name)
    proc.wait(timeout=900)
    procs.stop(proc)
    return json.loads(out.read_text())


def run_cell(procs: Processes, upstream: Any, target: str, n: int, seconds: float, name: str) -> dict[str, Any]:
    """One stream-count cell for one target, with a fresh proxy (so its peak RSS is this cell's)."""
    proc, port = start_target(procs, target, upstream.port, name)
    pid = proc.pid if proc is not None else None
    up0 = cpu_seconds(upstream.pid)
    before = cpu_seconds(pid) if pid else 0.0
    busy0 = machine_busy()
    t0 = time.monotonic()
    result = run_client(procs, "streams", port, f"{name}-client", streams=n,
                        events=int(seconds * RATE), rate=RATE, ramp=min(1.0, n / 256))
    wall = time.monotonic() - t0
    delays = result["delays"]
    row = {
        "streams": n,
        "events": result["events"],
        "expected_events": result["expected_events"],
        "errors": result["errors"],
        "errors_by_kind": result.get("errors_by_kind", {}),
        "p50_ms": percentile(delays, 50) * 1000,
        "p99_ms": percentile(delays, 99) * 1000,
        "client_cpu_pct": 100 * result["client_cpu"] / wall,
        "upstream_cpu_pct": 100 * (cpu_seconds(upstream.pid) - up0) / wall,
        # the shared machine: both cores' use during the cell (this cell's processes included), load
        "machine_busy_pct": busy_between(busy0, machine_busy()),
        "load_1min": os.getloadavg()[0],
    }
    if pid:
        cpu = cpu_seconds(pid) - before
        row["balancer_cpu_pct"] = 100 * cpu / wall
        row["cpu_s_per_1000_chunks"] = 1000 * cpu / result["events"] if result["events"] else float("nan")
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
    for key in ("p50_ms", "p99_ms", "client_cpu_pct", "upstream_cpu_pct", "balancer_cpu_pct",
                "cpu_s_per_1000_chunks", "peak_rss_mib", "machine_busy_pct", "load_1min"):
        if key in runs[0]:
            row[key] = median(r[key] for r in runs)
    if "balancer_cpu_pct" in runs[0]:
        row["balancer_cpu_pct_spread"] = spread(r["balancer_cpu_pct"] for r in runs)
    if runs is not direct:
        pairs = list(zip(runs, direct))
        added_p99 = [r["p99_ms"] - d["p99_ms"] for r, d in pairs]
        row["added_p50_ms"] = median(r["p50_ms"] - d["p50_ms"] for r, d in pairs)
        row["added_p99_ms"] = median(added_p99)
        row["added_p99_ms_spread"] = spread(added_p99)
        p50_ratios = [r["p50_ms"] / d["p50_ms"] for r, d in pairs if d["p50_ms"]]
        p99_ratios = [r["p99_ms"] / d["p99_ms"] for r, d in pairs if d["p99_ms"]]
        row["p50_vs_direct"] = median(p50_ratios)
        row["p99_vs_direct"] = median(p99_ratios)
        row["p99_vs_direct_spread"] = spread(p99_ratios)
    return row


def against(runs: dict[str, list[dict[str, Any]]], sizes: tuple[int, ...], targets: tuple[str, ...]) -> dict[str, Any]:
    """Paddler against sglang-router, per repetition then the median: CPU per chunk and added p99."""
    out: dict[str, Any] = {}
    for n in sizes:
        for other in ("sglang-router", "haproxy", "nginx", "paddler-base", "paddler-base-flush", "twisted-floor",
                      "twisted-floor-lean", "paddler-workers2-flush"):
            if other not in targets or "paddler" not in targets:
                continue
            mine, theirs = runs[f"paddler/{n}"], runs[f"{other}/{n}"]
            cpu = [m["cpu_s_per_1000_chunks"] / t["cpu_s_per_1000_chunks"]
                   for m, t in zip(mine, theirs) if t.get("cpu_s_per_1000_chunks")]
            out[f"{n}/{other}"] = {"cpu_per_chunk_ratio": median(cpu), "cpu_per_chunk_ratio_spread": spread(cpu),
                                   "cpu_per_chunk_ratios": cpu}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, 2 s streams, 64 and 512 streams, 300 idle")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument("--sizes", default=None, help="stream counts, comma-separated (default 1,64,512,1000)")
    parser.add_argument("--targets", default=None, help="targets besides direct, comma-separated")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per stream (default 5, 2 with --quick)")
    parser.add_argument("--base", default=None, help="a directory holding another paddler package (target paddler-base)")
    parser.add_argument("--out", default="streaming", help="results name (bench/results/NAME.json)")
    parser.add_argument("--no-idle", action="store_true", help="skip the idle-streams memory run")
    args = parser.parse_args(argv)
    BASE[0] = args.base or ""
    raise_fd_limit()
    reps = args.reps or (1 if args.quick else 3)
    sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else ((64, 512) if args.quick else (1, 64, 512, 1000))
    targets = ("direct", *[t for t in (args.targets.split(",") if args.targets else TARGETS) if t != "direct"])
    if "sglang-router" in targets and sglang_router_command() is None:
        log("sglang-router is not installed: skipping it")
        targets = tuple(t for t in targets if t != "sglang-router")
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    idle = 300 if args.quick else 2000
    hold = 2.0 if args.quick else 6.0
    runs: dict[str, list[dict[str, Any]]] = {f"{t}/{n}": [] for n in sizes for t in targets}
    with Processes() as procs:
        upstream_port = free_port()
        upstream = procs.start(
            pinned([PYTHON, "-m", "bench.sse_upstream", "--port", str(upstream_port)], LOAD_CORE), "s2-upstream"
        )
        upstream.port = upstream_port  # type: ignore[attr-defined]
        wait_port(upstream_port, 15, upstream)
        for rep in range(reps):
            for n in sizes:
                for target in targets:  # interleaved: drifting machine load hits every target alike
                    row = run_cell(procs, upstream, target, n, seconds, f"s2-{target}-{n}-r{rep + 1}")
                    runs[f"{target}/{n}"].append(row)
                    log(f"streaming rep {rep + 1}/{reps} {target} x{n}: p50 {row['p50_ms']:.2f} ms "
                        f"p99 {row['p99_ms']:.2f} ms events {row['events']}/{row['expected_events']} "
                        f"errors {row['errors']} cpu {row.get('balancer_cpu_pct', 0):.0f}% "
                        f"({row.get('cpu_s_per_1000_chunks', 0):.4f} s/1000 chunks) "
                        f"client {row['client_cpu_pct']:.0f}% upstream {row['upstream_cpu_pct']:.0f}% "
                        f"machine {row['machine_busy_pct']:.0f}% busy, load {row['load_1min']:.1f}"
                        + (f" errors by kind {row['errors_by_kind']}" if row["errors_by_kind"] else ""))
        rows = {key: summarise(rs, runs[f"direct/{key.split('/')[1]}"]) for key, rs in runs.items()}
        idle_rows: dict[str, Any] = {}
        for target in () if args.no_idle else targets[1:]:
            if target.startswith("twisted-floor"):
                continue
            name = f"s2-{target}-idle"
            proc, port = start_target(procs, target, upstream_port, name)
            time.sleep(0.5)
            rss_before = peak_rss_mib(proc.pid)
            result = run_client(procs, "idle", port, f"{name}-client", streams=idle, hold=hold,
                                ramp=1.0 if args.quick else 2.0)
            peak = peak_rss_mib(proc.pid)
            idle_rows[target] = {
                "streams": idle,
                "opened": result["opened"],
                "errors": result["errors"],
                "rss_at_start_mib": rss_before,
                "peak_rss_mib": peak,
                "kib_per_stream": (peak - rss_before) * 1024 / max(1, result["opened"]),
            }
            procs.stop(proc)
            log(f"idle {target} x{idle}: opened {result['opened']} peak RSS {peak:.1f} MiB "
                f"({idle_rows[target]['kib_per_stream']:.1f} KiB per stream)")
    data = {
        "scenario": "streaming",
        "quick": args.quick,
        "repetitions": reps,
        "seconds_per_stream": seconds,
        "rate": RATE,
        "sizes": list(sizes),
        "targets": list(targets),
        "pinning": {"proxy_core": PROXY_CORE, "load_core": LOAD_CORE},
        "machine": machine(),
        "tools": {
            "haproxy": tool_version(["haproxy", "-v"]),
            "nginx": tool_version(["nginx", "-v"]),
            "sglang-router": _sglang_version(),
        },
        "rows": rows,
        "paddler_against": against(runs, sizes, targets),
        "runs": runs,
        "idle": idle_rows,
    }
    if args.base:
        data["base"] = args.base
    save(args.out, data)
    return data


def _sglang_version() -> str:
    try:
        from importlib.metadata import version

        return "sglang-router " + version("sglang-router")
    except Exception:  # noqa: BLE001 - not installed
        return "missing"


if __name__ == "__main__":
    main()
