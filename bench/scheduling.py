"""Scenario 3: scheduling quality on a heterogeneous simulated fleet.

The fleet: two 4-slot servers at 60 tokens/s and two 2-slot servers at 20
tokens/s (``paddler simulate``, prompt 2000 tokens/s). A seeded trace of
Poisson arrivals at 50 %, 80 % and 95 % of the fleet's capacity, with
log-normal (long-tailed) prompt and output lengths, is replayed by the load
client (streaming ``/completion``, ``n_predict`` + ``ignore_eos`` so lengths
are exact) through paddler (no ``--policy``: the default ``cache-aware``;
``--policy cost``, ``slots``, ``round-robin``,
``least-connections``), HAProxy ``leastconn`` (without a connection limit,
and with ``maxconn`` = the server's slots and a 600 s ``timeout queue``: the
strongest classic configuration) and nginx round robin. Every prompt is
distinct random words, so no two requests share a cached prefix: this is
also the no-prefix trace on which ``cost`` must not lose to ``slots``. Each
balancer gets its own identical fleet and all seven replay at once (the
figures are seconds of queueing, far above the milliseconds of CPU
contention that buys). The ideal (bench/ideal.py) runs the same trace.

Each repetition replays a fresh seeded trace (seed + load index + 100 x
repetition) at every load; figures are medians over the repetitions, and
the ratios to the ideal are taken per repetition (against the ideal of that
repetition's trace) before the median, with their min-max spread.

    python -m bench.scheduling [--quick] [--reps N] [--duration S]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from typing import Any

from bench.common import (
    LOOPBACK,
    PYTHON,
    TMP,
    Processes,
    cpu_seconds,
    log,
    machine,
    median,
    paddler_policy,
    percentile,
    raise_fd_limit,
    save,
    spread,
    start_haproxy,
    start_nginx,
    start_paddler,
)
from bench.ideal import Request, Server, capacity, simulate

FLEET = (
    # (servers, slots, tokens/s)
    (2, 4, 60.0),
    (2, 2, 20.0),
)
PROMPT_TPS = 2000.0
PROMPT = (math.log(150), 1.0, 8, 1500)  # log-normal median 150 tokens, clipped
OUTPUT = (math.log(50), 0.8, 4, 400)  # log-normal median 50 tokens, clipped
CONFIGS = (
    "paddler-default",
    "paddler-cost",
    "paddler-slots",
    "paddler-round-robin",
    "paddler-least-connections",
    "haproxy-leastconn",
    "haproxy-leastconn-maxconn",
    "nginx-round-robin",
)


def servers() -> list[Server]:
    return [Server(slots, tps, PROMPT_TPS) for count, slots, tps in FLEET for _ in range(count)]


def slots_per_server() -> list[int]:
    """Each server's slots, in the order L{launch_fleet} starts them."""
    return [slots for count, slots, _ in FLEET for _ in range(count)]


def _draw(rng: random.Random, spec: tuple[float, float, int, int]) -> int:
    mu, sigma, lo, hi = spec
    return max(lo, min(hi, round(rng.lognormvariate(mu, sigma))))


def mean_lengths(samples: int = 100000) -> tuple[float, float]:
    rng = random.Random(12345)
    prompts = [_draw(rng, PROMPT) for _ in range(samples)]
    outputs = [_draw(rng, OUTPUT) for _ in range(samples)]
    return sum(prompts) / samples, sum(outputs) / samples


def make_trace(load: float, duration: float, seed: int) -> dict[str, Any]:
    mean_prompt, mean_output = mean_lengths()
    cap = capacity(servers(), mean_prompt, mean_output)
    rate = load * cap
    rng = random.Random(seed)
    t = 0.0
    requests: list[dict[str, Any]] = []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        n_prompt = _draw(rng, PROMPT)
        # distinct random words: no two prompts share a cached prefix
        words = " ".join(f"w{rng.randrange(10**9)}" for _ in range(n_prompt))
        requests.append({"id": len(requests), "at": t, "prompt_tokens": n_prompt,
                         "n_predict": _draw(rng, OUTPUT), "prompt": words})
    return {"load": load, "rate": rate, "capacity_rps": cap, "mean_prompt": mean_prompt,
            "mean_output": mean_output, "duration": duration, "seed": seed, "requests": requests}


def launch_fleet(procs: Processes, name: str) -> list[tuple[Any, int, str]]:
    """Start one fleet's simulator processes; L{collect_fleet} waits for their URLs."""
    started = []
    for index, (count, slots, tps) in enumerate(FLEET):
        proc = procs.start(
            [PYTHON, "-m", "paddler", "simulate", "--listen", f"tcp:0:interface={LOOPBACK}",
             "--fleet", str(count), "--slots", str(slots), "--tokens-per-second", str(tps),
             "--prompt-tokens-per-second", str(PROMPT_TPS), "--n-ctx", "4096", "--seed", str(index * 10)],
            f"{name}-sim{index}",
        )
        started.append((proc, count, f"{name}-sim{index}"))
    return started


def collect_fleet(started: list[tuple[Any, int, str]]) -> list[str]:
    urls: list[str] = []
    for proc, count, log_name in started:
        deadline = time.monotonic() + 30
        found: list[str] = []
        while time.monotonic() < deadline and len(found) < count:
            text = (TMP / f"{log_name}.log").read_text(errors="replace")
            # each server announces itself twice (listener and simulator): keep the first of each URL
            found = list(dict.fromkeys(re.findall(r"listening on (http://127\.0\.0\.1:\d+)", text)))
            if proc.poll() is not None:
                raise RuntimeError(f"simulator {log_name} exited: {text[-2000:]}")
            time.sleep(0.1)
        if len(found) < count:
            raise TimeoutError(f"simulator {log_name} did not announce {count} listeners")
        urls.extend(u.rstrip("/") for u in found[:count])
    return urls


def start_balancer(procs: Processes, config: str, urls: list[str], name: str) -> tuple[Any, int]:
    ports = [int(u.rsplit(":", 1)[1]) for u in urls]
    if config.startswith("paddler-"):
        return start_paddler(procs, urls, name, policy=paddler_policy(config),
                             extra=["--max-buffered-requests", "100000", "--buffered-request-timeout", "600",
                                    "--upstream-timeout", "600", "--idle-timeout", "600"])
    if config == "haproxy-leastconn":
        return start_haproxy(procs, ports, name, streaming=True)
    if config == "haproxy-leastconn-maxconn":
        return start_haproxy(procs, ports, name, streaming=True, maxconn=slots_per_server())
    return start_nginx(procs, ports, name, streaming=True)


def summarise(records: list[dict[str, Any]], wall: float, trace: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in records if r.get("status") == 200 and r.get("ttft") is not None]
    by_id = {r["id"]: r for r in trace["requests"]}
    ttft = [r["ttft"] for r in ok]
    e2e = [r["e2e"] for r in ok]
    tokens = sum(by_id[r["id"]]["n_predict"] for r in ok)
    makespan = max((r["sent"] + r["e2e"] for r in ok), default=wall)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "e2e_p50": percentile(e2e, 50),
        "e2e_p99": percentile(e2e, 99),
        "throughput_rps": len(ok) / makespan if makespan else 0.0,
        "throughput_tokens_per_s": tokens / makespan if makespan else 0.0,
        "makespan_s": makespan,
    }


def ideal_summary(trace: dict[str, Any]) -> dict[str, Any]:
    reqs = [Request(r["at"], r["prompt_tokens"], r["n_predict"]) for r in trace["requests"]]
    outcomes = simulate(servers(), reqs)
    ttft = [o.ttft for o in outcomes]
    e2e = [o.e2e for o in outcomes]
    makespan = max(r.at + o.e2e for r, o in zip(reqs, outcomes))
    return {
        "requests": len(reqs), "ok": len(reqs), "errors": 0,
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "e2e_p50": percentile(e2e, 50), "e2e_p99": percentile(e2e, 99),
        "throughput_rps": len(reqs) / makespan,
        "throughput_tokens_per_s": sum(r.n_predict for r in reqs) / makespan,
        "makespan_s": makespan,
    }


def run_load(load: float, duration: float, seed: int, rep: int,
             configs: tuple[str, ...] = CONFIGS) -> dict[str, Any]:
    """One repetition at one load: every config and the ideal on the same seeded trace."""
    trace = make_trace(load, duration, seed)
    tag = f"s3-{int(load * 100)}"
    trace_path = TMP / f"trace-{int(load * 100)}.json"
    TMP.mkdir(parents=True, exist_ok=True)
    trace_path.write_text(json.dumps(trace))
    results: dict[str, Any] = {"ideal": ideal_summary(trace)}
    with Processes() as procs:
        launched = {config: launch_fleet(procs, f"{tag}-{config}") for config in configs}
        balancers = {}
        for config in configs:
            urls = collect_fleet(launched[config])
            balancers[config] = start_balancer(procs, config, urls, f"{tag}-{config}")
        clients = {}
        t0 = time.monotonic()
        cpu0 = {config: cpu_seconds(p.pid) for config, (p, _) in balancers.items()}
        for config, (proc, port) in balancers.items():
            out = TMP / f"{tag}-{config}-client.json"
            client = procs.start([PYTHON, "-m", "bench.loadclient", "trace", "--port", str(port),
                                  "--trace", str(trace_path), "--out", str(out), "--timeout", "600"],
                                 f"{tag}-{config}-client")
            clients[config] = (client, out)
        for config, (client, out) in clients.items():
            client.wait(timeout=900)
        wall = time.monotonic() - t0
        for config, (client, out) in clients.items():
            data = json.loads(out.read_text())
            row = summarise(data["results"], data["wall"], trace)
            row["client_cpu_s"] = data["client_cpu"]
            proc = balancers[config][0]
            row["balancer_cpu_s"] = cpu_seconds(proc.pid) - cpu0[config]
            results[config] = row
    ideal = results["ideal"]
    for config, row in results.items():
        row["ttft_p99_vs_ideal"] = row["ttft_p99"] / ideal["ttft_p99"] if ideal["ttft_p99"] else float("nan")
        row["e2e_p99_vs_ideal"] = row["e2e_p99"] / ideal["e2e_p99"] if ideal["e2e_p99"] else float("nan")
        log(f"scheduling rep {rep + 1} {int(load * 100)}% {config}: ttft p50 {row['ttft_p50']:.2f} s "
            f"p99 {row['ttft_p99']:.2f} s ({row['ttft_p99_vs_ideal']:.2f}x ideal) e2e p99 {row['e2e_p99']:.1f} s "
            f"errors {row['errors']}")
    pairs = pair_ratios(results)
    for pair, figures in pairs.items():
        log(f"scheduling rep {rep + 1} {int(load * 100)}% {pair}: ttft p99 {figures['ttft_p99']:.2f}x "
            f"p50 {figures['ttft_p50']:.2f}x e2e p99 {figures['e2e_p99']:.2f}x")
    return {"load": load, "seed": seed, "rate_rps": trace["rate"], "capacity_rps": trace["capacity_rps"],
            "requests": len(trace["requests"]), "wall_s": wall, "results": results, "pairs": pairs}


#: Head-to-head ratios taken per repetition (A's figure / B's figure on the same trace).
PAIRS = (
    ("paddler-default", "paddler-slots"),
    ("paddler-default", "paddler-cost"),
    ("paddler-default", "haproxy-leastconn-maxconn"),
    ("paddler-cost", "paddler-slots"),
    ("paddler-cost", "haproxy-leastconn-maxconn"),
    ("paddler-slots", "haproxy-leastconn-maxconn"),
)
PAIR_FIGURES = ("ttft_p50", "ttft_p99", "e2e_p99", "throughput_tokens_per_s")


def pair_ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A / B for each of L{PAIRS} present in C{results}, per figure."""
    out: dict[str, dict[str, float]] = {}
    for a, b in PAIRS:
        if a in results and b in results:
            out[f"{a}/{b}"] = {
                key: results[a][key] / results[b][key] if results[b][key] else float("nan")
                for key in PAIR_FIGURES
            }
    return out


FIGURES = ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99", "throughput_rps", "throughput_tokens_per_s",
           "makespan_s", "ttft_p99_vs_ideal", "e2e_p99_vs_ideal")


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repetitions of one load; each ratio was taken against its own repetition's ideal."""
    results: dict[str, Any] = {}
    for config in runs[0]["results"]:
        per_rep = [run["results"][config] for run in runs]
        row: dict[str, Any] = {key: median(r[key] for r in per_rep) for key in FIGURES}
        row["ttft_p99_vs_ideal_spread"] = spread(r["ttft_p99_vs_ideal"] for r in per_rep)
        for key in ("requests", "ok", "errors"):
            row[key] = sum(r[key] for r in per_rep)
        results[config] = row
    pairs: dict[str, Any] = {}
    for pair in runs[0].get("pairs", {}):
        pairs[pair] = {}
        for key in PAIR_FIGURES:
            values = [run["pairs"][pair][key] for run in runs if pair in run.get("pairs", {})]
            pairs[pair][key] = median(values)
            pairs[pair][key + "_spread"] = spread(values)
    return {
        "load": runs[0]["load"],
        "pairs": pairs,
        "repetitions": len(runs),
        "seeds": [run["seed"] for run in runs],
        "rate_rps": runs[0]["rate_rps"],
        "capacity_rps": runs[0]["capacity_rps"],
        "requests": [run["requests"] for run in runs],
        "wall_s": [run["wall_s"] for run in runs],
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, one load (80 %%), 8 s of arrivals")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--name", default="scheduling", help="results file name")
    args = parser.parse_args(argv)
    configs = tuple(c for c in args.configs.split(",") if c)
    raise_fd_limit()
    reps = args.reps or (1 if args.quick else 3)
    loads = (0.8,) if args.quick else (0.5, 0.8, 0.95)
    duration = args.duration or (8.0 if args.quick else 20.0)
    mean_prompt, mean_output = mean_lengths()
    runs: dict[float, list[dict[str, Any]]] = {load: [] for load in loads}
    for rep in range(reps):
        for i, load in enumerate(loads):
            # a fresh trace per repetition: the spread covers trace-to-trace variation and machine noise
            runs[load].append(run_load(load, duration, args.seed + i + 100 * rep, rep, configs))
    data = {
        "scenario": "scheduling",
        "quick": args.quick,
        "repetitions": reps,
        "duration_s": duration,
        "seed": args.seed,
        "fleet": [{"servers": c, "slots": s, "tokens_per_second": t, "prompt_tokens_per_second": PROMPT_TPS}
                  for c, s, t in FLEET],
        "mean_prompt_tokens": mean_prompt,
        "mean_output_tokens": mean_output,
        "capacity_rps": capacity(servers(), mean_prompt, mean_output),
        "machine": machine(),
        "loads": [combine(runs[load]) for load in loads],
        "runs": {str(load): rs for load, rs in runs.items()},
    }
    save(args.name, data)
    return data


if __name__ == "__main__":
    main()
