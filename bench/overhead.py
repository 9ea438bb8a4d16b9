"""Scenario 1: proxy overhead.

A fast static upstream (nginx, 1 worker, answering a fixed completion JSON)
is loaded with wrk directly, through paddler, through sglang-router (round
robin), through HAProxy (leastconn, 1 thread) and through nginx (round
robin, 1 worker), at several concurrencies. The proxy under test is pinned
to one core, wrk and the upstream to the other (taskset).
Targets are interleaved within each repetition so that drifting machine load
hits them all alike; medians over the repetitions are reported, as ratios to
"direct" measured in the same repetition.

    python -m bench.overhead [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    BENCH,
    LOAD_CORE,
    PROXY_CORE,
    RESULTS,
    LOOPBACK,
    Processes,
    busy_between,
    cpu_seconds,
    log,
    machine,
    machine_busy,
    median,
    pinned,
    raise_fd_limit,
    save,
    sglang_router_command,
    spread,
    start_haproxy,
    start_nginx,
    start_paddler,
    start_sglang_router,
    start_static_upstream,
    tool_version,
)

PATH = "/v1/completions"
TARGETS = ("direct", "paddler", "sglang-router", "haproxy", "nginx")
#: on request only (--targets): this code with --request-parser httptools
EXTRA_TARGETS = ("paddler-httptools",)
#: every paddler target runs the write flush, as the streaming bench's do (the default now; the --base checkout may predate that)
PADDLER_FLAGS = ["--flush-before-poll"]

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests/s, request count, errors and the latency percentiles from ``wrk --latency``."""
    result: dict[str, float] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in", out)
    result["requests"] = float(m.group(1)) if m else 0.0
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        result[f"p{q}_ms"] = _ms(m.group(1)) if m else float("nan")
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    result["errors"] = float(errors)
    return result


def run_wrk(port: int, connections: int, seconds: float, proxy_pid: int | None) -> dict[str, float]:
    before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
    proc = subprocess.Popen(
        pinned([
            "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s",
            "-s", str(BENCH / "post.lua"), f"http://{LOOPBACK}:{port}{PATH}",
        ], LOAD_CORE),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = proc.communicate(timeout=seconds + 30)
    result = parse_wrk(out)
    if proxy_pid:
        result["proxy_cpu_s"] = cpu_seconds(proxy_pid) - before
        n = result["requests"]
        result["cpu_s_per_1000"] = result["proxy_cpu_s"] / n * 1000 if n else float("nan")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition of 2 s each (under a minute)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--profile", action="store_true", help="also cProfile paddler at concurrency 16")
    parser.add_argument("--base", default=None,
                        help="a directory holding another paddler package: measured too, as paddler-base")
    parser.add_argument("--out", default="overhead", help="results name (bench/results/NAME.json)")
    parser.add_argument("--concurrencies", default="1,16,128", help="wrk connections, comma-separated")
    parser.add_argument("--targets", default=None, help="targets besides direct, comma-separated (default all)")
    args = parser.parse_args(argv)
    raise_fd_limit()
    reps = args.reps or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    concurrencies = tuple(int(c) for c in args.concurrencies.split(","))
    wanted = set(args.targets.split(",")) | {"direct"} if args.targets else set(TARGETS)
    names = [t for t in (*TARGETS, *EXTRA_TARGETS)
             if t in wanted and (t != "sglang-router" or sglang_router_command() is not None)]
    if args.base:
        names.insert(2, "paddler-base")
    runs: dict[str, dict[int, list[dict[str, float]]]] = {t: {c: [] for c in concurrencies} for t in names}
    with Processes() as procs:
        upstream, ports = start_static_upstream(procs, 2, "s1-upstream", core=LOAD_CORE)
        urls = [f"http://{LOOPBACK}:{p}" for p in ports]
        paddler, paddler_port = start_paddler(procs, urls, "s1-paddler", core=PROXY_CORE, extra=PADDLER_FLAGS)
        targets = {"direct": (ports[0], None), "paddler": (paddler_port, paddler.pid)}
        if "paddler-httptools" in names:
            fast, fast_port = start_paddler(procs, urls, "s1-paddler-httptools", core=PROXY_CORE,
                                            extra=[*PADDLER_FLAGS, "--request-parser", "httptools"])
            targets["paddler-httptools"] = (fast_port, fast.pid)
        if "haproxy" in names:
            haproxy, haproxy_port = start_haproxy(procs, ports, "s1-haproxy", core=PROXY_CORE)
            targets["haproxy"] = (haproxy_port, haproxy.pid)
        if "nginx" in names:
            nginx, nginx_port = start_nginx(procs, ports, "s1-nginx", core=PROXY_CORE)
            targets["nginx"] = (nginx_port, nginx.pid)
        if "sglang-router" in names:
            sglang, sglang_port = start_sglang_router(procs, ports, "s1-sglang-router", core=PROXY_CORE)
            targets["sglang-router"] = (sglang_port, sglang.pid)
        if args.base:
            base, base_port = start_paddler(procs, urls, "s1-paddler-base", core=PROXY_CORE, source=args.base,
                                            extra=PADDLER_FLAGS)
            targets["paddler-base"] = (base_port, base.pid)
        for target, (port, pid) in targets.items():  # warm up connections and code paths
            run_wrk(port, 16, 1, pid)
        for rep in range(reps):
            for c in concurrencies:
                for target in names:
                    port, pid = targets[target]
                    busy0 = machine_busy()
                    result = run_wrk(port, c, seconds, pid)
                    result["machine_busy_pct"] = busy_between(busy0, machine_busy())
                    result["load_1min"] = os.getloadavg()[0]
                    runs[target][c].append(result)
                    log(f"overhead rep {rep + 1}/{reps} c={c} {target}: {result['rps']:.0f} req/s "
                        f"p50 {result['p50_ms']:.3f} ms p99 {result['p99_ms']:.3f} ms errors {result['errors']:.0f} "
                        f"cpu {result.get('cpu_s_per_1000', 0):.4f} s/1000 "
                        f"machine {result['machine_busy_pct']:.0f}% busy, load {result['load_1min']:.1f}")
        if args.profile:
            procs.stop(paddler)
            profile = RESULTS / "tmp" / "paddler-s1.prof"
            paddler, paddler_port = start_paddler(procs, urls, "s1-paddler-profiled", profile=profile, core=PROXY_CORE)
            run_wrk(paddler_port, 16, 1, None)
            prof_run = run_wrk(paddler_port, 16, max(seconds, 5.0), paddler.pid)
            procs.stop(paddler)
            time.sleep(0.5)
            write_profile(profile, prof_run)
    summary: dict[str, Any] = {}
    for c in concurrencies:
        row: dict[str, Any] = {}
        for target in names:
            # per-repetition ratios to direct, then the median of those
            rs = runs[target][c]
            ds = runs["direct"][c]
            row[target] = {
                "rps": median(r["rps"] for r in rs),
                "p50_ms": median(r["p50_ms"] for r in rs),
                "p99_ms": median(r["p99_ms"] for r in rs),
                "errors": sum(r["errors"] for r in rs),
                "rps_ratio": median(r["rps"] / d["rps"] for r, d in zip(rs, ds) if d["rps"]),
                "added_p50_ms": median(r["p50_ms"] - d["p50_ms"] for r, d in zip(rs, ds)),
                "added_p99_ms": median(r["p99_ms"] - d["p99_ms"] for r, d in zip(rs, ds)),
                "cpu_s_per_1000": median(r.get("cpu_s_per_1000", float("nan")) for r in rs),
            }
        for mine in ("paddler", "paddler-httptools"):
            if mine not in names:
                continue
            for other, key in (("sglang-router", "cpu_vs_sglang_router"), ("paddler-base", "cpu_vs_base"),
                               ("haproxy", "cpu_vs_haproxy"), ("paddler", "cpu_vs_paddler")):
                if other in names and other != mine:
                    # the CPU per request against the other's, per repetition, then the median
                    ratios = [p["cpu_s_per_1000"] / g["cpu_s_per_1000"]
                              for p, g in zip(runs[mine][c], runs[other][c]) if g.get("cpu_s_per_1000")]
                    row[mine][key] = median(ratios)
                    row[mine][key + "_spread"] = spread(ratios)
                    row[mine][key + "_per_repetition"] = ratios
        summary[str(c)] = row
    data = {
        "scenario": "overhead",
        "quick": args.quick,
        "repetitions": reps,
        "seconds_per_run": seconds,
        "path": PATH,
        "machine": machine(),
        "tools": {
            "wrk": tool_version(["wrk", "--version"]),
            "haproxy": tool_version(["haproxy", "-v"]),
            "nginx": tool_version(["nginx", "-v"]),
            "sglang-router": _sglang_version(),
        },
        "pinning": {"proxy_core": PROXY_CORE, "load_core": LOAD_CORE},
        "summary": summary,
        "targets": names,
        "runs": {t: {str(c): v for c, v in by_c.items()} for t, by_c in runs.items()},
    }
    if args.base:
        data["base"] = args.base
    data["paddler_flags"] = PADDLER_FLAGS
    data["command"] = "python -m bench.overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    save(args.out, data)
    return data


def _sglang_version() -> str:
    try:
        from importlib.metadata import version

        return "sglang-router " + version("sglang-router")
    except Exception:  # noqa: BLE001 - not installed
        return "missing"


def write_profile(path: Any, run: dict[str, float]) -> None:
    """The top of the cProfile of paddler under wrk, as text next to the results."""
    import io
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs()
    out.write(f"# paddler under wrk -c16 for a few seconds: {run['requests']:.0f} requests, "
              f"{run['rps']:.0f} req/s (cProfile slows it down)\n")
    out.write("\n## named costs (inclusive time, share of the reactor loop)\n")
    for label, share, calls in named_costs(stats):
        out.write(f"{share:5.1f}%  {calls:>7}  {label}\n")
    out.write("\n## by own time (tottime)\n")
    stats.sort_stats("tottime").print_stats(30)
    out.write("\n## by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(40)
    (RESULTS / "profile-overhead.txt").write_text(out.getvalue())


NAMED = (
    ("twisted.web server: parse request, run the resource (all of render)", "http.py", "requestReceived"),
    ("paddler ProxyResource.render (parse JSON body, start _forward)", "proxy.py", "render"),
    ("paddler _send: UpstreamClient.send (request written in one write)", "proxy.py", "_send"),
    ("paddler upstream answer: head parsed, answer relayed (UpstreamConnection.dataReceived)",
     "upstream_client.py", "dataReceived"),
    ("paddler response-head parsing (parse_head)", "http1.py", "parse_head"),
    ("paddler _relay (head written, body relayed, stats)", "proxy.py", "_relay"),
    ("twisted.web Content-Type parsing through the email package", "http.py", "_parseContentType"),
    ("twisted.web access log line per request (HTTPFactory.log)", "http.py", "log"),
    ("Agent builds a new endpoint per request (idna host encoding)", "client.py", "_getEndpoint"),
    ("paddler _upstream_headers (copying request headers)", "proxy.py", "_upstream_headers"),
    ("paddler pool.acquire (eligible + chooser + lease)", "pool.py", "acquire"),
    ("paddler stats.record", "stats.py", "record"),
    ("paddler request_model (json.loads of the body)", "proxy.py", "request_model"),
)


def named_costs(stats: Any) -> list[tuple[str, float, int]]:
    loop = [v[3] for k, v in stats.stats.items() if k[2] == "mainLoop"]
    total = max(loop) if loop else max(v[3] for v in stats.stats.values())
    rows = []
    for label, filename, function in NAMED:
        matches = [v for k, v in stats.stats.items() if k[0] == filename and k[2] == function]
        if matches:
            best = max(matches, key=lambda v: v[3])
            rows.append((label, 100.0 * best[3] / total, best[1]))
    return rows


if __name__ == "__main__":
    main()
