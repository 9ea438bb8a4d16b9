"""Scenario 3: scheduling quality on a heterogeneous simulated fleet.

The fleet: two 4-slot servers at 60 tokens/s and two 2-slot servers at 20
tokens/s (``paddler simulate``, prompt 2000 tokens/s). A seeded trace of
Poisson arrivals at 50 %, 80 % and 95 % of the fleet's capacity, with
log-normal (long-tailed) prompt and output lengths, is replayed by the load
client (streaming ``/completion``, ``n_predict`` + ``ignore_eos`` so lengths
are exact) through paddler (``--policy slots``, ``round-robin``,
``least-connections``), HAProxy ``leastconn`` and nginx round robin. Each
balancer gets its own identical fleet and all five replay at once (the
figures are seconds of queueing, far above the milliseconds of CPU
contention that buys). The ideal (bench/ideal.py) runs the same trace.

    python -m bench.scheduling [--quick]
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
    percentile,
    raise_fd_limit,
    save,
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
CONFIGS = ("paddler-slots", "paddler-round-robin", "paddler-least-connections", "haproxy-leastconn", "nginx-round-robin")


def servers() -> list[Server]:
    return [Server(slots, tps, PROMPT_TPS) for count, slots, tps in FLEET for _ in range(count)]


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
    t, requests = 0.0, []
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


def start_fleet(procs: Processes, name: str) -> list[str]:
    urls: list[str] = []
    started = []
    for index, (count, slots, tps) in enumerate(FLEET):
        proc = procs.start(
            [PYTHON, "-m", "paddler", "simulate", "--listen", f"tcp:0:interface={LOOPBACK}",
             "--fleet", str(count), "--slots", str(slots), "--tokens-per-second", str(tps),
             "--prompt-tokens-per-second", str(PROMPT_TPS), "--n-ctx", "4096", "--seed", str(index * 10)],
            f"{name}-sim{index}",
        )
        started.append((proc, count, f"{name}-sim{index}"))
    for proc, count, log_name in started:
        deadline = time.monotonic() + 30
        found: list[str] = []
        while time.monotonic() < deadline and len(found) < count:
            text = (TMP / f"{log_name}.log").read_text(errors="replace")
            found = re.findall(r"listening on (http://127\.0\.0\.1:\d+)", text)
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
        policy = config[len("paddler-"):]
        return start_paddler(procs, urls, name, policy=policy,
                             extra=["--max-buffered-requests", "100000", "--buffered-request-timeout", "600",
                                    "--upstream-timeout", "600", "--idle-timeout", "600"])
    if config == "haproxy-leastconn":
        return start_haproxy(procs, ports, name, streaming=True)
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


def run_load(load: float, duration: float, seed: int) -> dict[str, Any]:
    trace = make_trace(load, duration, seed)
    trace_path = TMP / f"trace-{int(load * 100)}.json"
    TMP.mkdir(parents=True, exist_ok=True)
    trace_path.write_text(json.dumps(trace))
    results: dict[str, Any] = {"ideal": ideal_summary(trace)}
    with Processes() as procs:
        balancers = {}
        for config in CONFIGS:
            name = f"s3-{int(load * 100)}-{config}"
            urls = start_fleet(procs, name)
            proc, port = start_balancer(procs, config, urls, name)
            balancers[config] = (proc, port)
        clients = {}
        t0 = time.monotonic()
        cpu0 = {config: cpu_seconds(p.pid) for config, (p, _) in balancers.items()}
        for config, (proc, port) in balancers.items():
            out = TMP / f"s3-{int(load * 100)}-{config}-client.json"
            client = procs.start([PYTHON, "-m", "bench.loadclient", "trace", "--port", str(port),
                                  "--trace", str(trace_path), "--out", str(out), "--timeout", "600"],
                                 f"s3-{int(load * 100)}-{config}-client")
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
    ideal_p99 = results["ideal"]["ttft_p99"]
    for config, row in results.items():
        row["ttft_p99_vs_ideal"] = row["ttft_p99"] / ideal_p99 if ideal_p99 else float("nan")
        log(f"scheduling {int(load * 100)}% {config}: ttft p50 {row['ttft_p50']:.2f} s p99 {row['ttft_p99']:.2f} s "
            f"({row['ttft_p99_vs_ideal']:.2f}x ideal) e2e p99 {row['e2e_p99']:.1f} s errors {row['errors']}")
    return {"load": load, "rate_rps": trace["rate"], "capacity_rps": trace["capacity_rps"],
            "requests": len(trace["requests"]), "wall_s": wall, "results": results}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one load (80 %), 12 s of arrivals")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    raise_fd_limit()
    loads = (0.8,) if args.quick else (0.5, 0.8, 0.95)
    duration = args.duration or (12.0 if args.quick else 45.0)
    mean_prompt, mean_output = mean_lengths()
    data = {
        "scenario": "scheduling",
        "quick": args.quick,
        "duration_s": duration,
        "seed": args.seed,
        "fleet": [{"servers": c, "slots": s, "tokens_per_second": t, "prompt_tokens_per_second": PROMPT_TPS}
                  for c, s, t in FLEET],
        "mean_prompt_tokens": mean_prompt,
        "mean_output_tokens": mean_output,
        "capacity_rps": capacity(servers(), mean_prompt, mean_output),
        "machine": machine(),
        "loads": [run_load(load, duration, args.seed + i) for i, load in enumerate(loads)],
    }
    save("scheduling", data)
    return data


if __name__ == "__main__":
    main()
