"""Routing for the prompt cache: multi-turn and shared-prefix traces on a simulated fleet.

The fleet: two 4-slot servers at 60 tokens/s (prompt 2,000 tokens/s) and two
2-slot servers at 20 tokens/s (prompt 600 tokens/s), ``paddler simulate``
with llama-server's prompt cache on (slot contents, ``--slot-prompt-similarity
0.1``, an 8 GiB ``--cache-ram`` at 128 KiB per token: about 65k tokens per
server), 8,192-token slots. A seeded trace (L{bench.traces}) is replayed by
L{bench.chatclient} (streaming ``/v1/chat/completions``, the whole history
with the real replies each turn) through:

- ``paddler-default``: ``paddler balancer`` with no ``--policy`` (the
  default, ``cache-aware``);
- ``paddler-cost``: ``paddler balancer --policy cost``;
- ``paddler-slots``: ``--policy slots``;
- ``haproxy-leastconn-maxconn``: HAProxy ``balance leastconn``, ``maxconn``
  = each server's slots, ``timeout queue 600s``;
- ``sglang-cache_aware``: sglang-router (PyPI ``sglang-router``) with
  ``--policy cache_aware`` and its CLI defaults;
- ``sticky``: no balancer: the client sends every turn of a conversation to
  one server, conversations spread over the servers in proportion to their
  slots (smooth weighted round robin). Each conversation's history is then
  always cached where it goes: the ideal for prompt tokens evaluated (not
  for waiting: it queues inside busy servers).

Each gets its own identical fleet and all replay at once. Per config: prompt
tokens the servers evaluated and reused (``llamacpp:prompt_tokens_total`` /
``prompt_tokens_cached_total`` from each server's ``/metrics``, before and
after), the share of requests whose ``timings.cache_n`` covered at least half
the prompt, TTFT (first content token) p50/p99, e2e p99, generated tokens
per second over the run, and the most requests each server ever had waiting
in its own queue (``llamacpp:requests_deferred``, sampled twice a second; > 0
means a balancer sent it more requests than it has slots).

Each repetition replays a fresh seeded trace; figures are medians over the
repetitions and every ratio is taken per repetition before the median,
with its min-max.

    python -m bench.routing {multiturn,shared-prefix} [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

from bench import traces
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
    prometheus_values,
    raise_fd_limit,
    save,
    sglang_router_available,
    spread,
    start_haproxy,
    start_paddler,
    start_sglang_router,
)
from bench.scheduling import collect_fleet

FLEET = (
    # (servers, slots, tokens/s, prompt tokens/s)
    (2, 4, 60.0, 2000.0),
    (2, 2, 20.0, 600.0),
)
N_CTX = 8192
CACHE_RAM_MIB = 8192
CACHE_BYTES_PER_TOKEN = 131072
CONFIGS = ("paddler-default", "paddler-cost", "paddler-slots", "haproxy-leastconn-maxconn", "sglang-cache_aware",
           "sticky")
PADDLER_EXTRA = ["--max-buffered-requests", "100000", "--buffered-request-timeout", "600",
                 "--upstream-timeout", "600", "--idle-timeout", "600"]
PROMETHEUS = ("llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens_cached_total",
              "llamacpp:requests_deferred", "llamacpp:requests_processing")


def slots_per_server() -> list[int]:
    return [slots for count, slots, _, _ in FLEET for _ in range(count)]


def make_trace(kind: str, seed: int, quick: bool) -> tuple[list[traces.Conversation], dict[str, Any]]:
    if kind == "multiturn":
        spec = traces.MultiturnSpec(conversations=20 if quick else 40, window=30.0 if quick else 60.0)
        return traces.multiturn(spec, seed), vars_of(spec)
    spec2 = traces.SharedPrefixSpec(users=70 if quick else 150, window=21.0 if quick else 45.0)
    return traces.shared_prefix(spec2, seed), vars_of(spec2)


def vars_of(spec: Any) -> dict[str, Any]:
    return {k: getattr(spec, k) for k in spec.__dataclass_fields__}


def launch_fleet(procs: Processes, name: str) -> list[tuple[Any, int, str]]:
    started = []
    for index, (count, slots, tps, pps) in enumerate(FLEET):
        proc = procs.start(
            [PYTHON, "-m", "paddler", "simulate", "--listen", f"tcp:0:interface={LOOPBACK}",
             "--fleet", str(count), "--slots", str(slots), "--tokens-per-second", str(tps),
             "--prompt-tokens-per-second", str(pps), "--n-ctx", str(N_CTX), "--seed", str(index * 10),
             "--cache-ram", str(CACHE_RAM_MIB), "--cache-bytes-per-token", str(CACHE_BYTES_PER_TOKEN)],
            f"{name}-sim{index}",
        )
        started.append((proc, count, f"{name}-sim{index}"))
    return started


class Sampler(threading.Thread):
    """Reads every server's ``/metrics`` twice a second; keeps the largest queue and load seen."""

    def __init__(self, fleets: dict[str, list[int]], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.fleets = fleets
        self.interval = interval
        self.stopped = threading.Event()
        self.max_deferred = {config: [0.0] * len(ports) for config, ports in fleets.items()}
        self.max_processing = {config: [0.0] * len(ports) for config, ports in fleets.items()}

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            for config, ports in self.fleets.items():
                for i, port in enumerate(ports):
                    try:
                        values = prometheus_values(port, PROMETHEUS)
                    except OSError:
                        continue
                    self.max_deferred[config][i] = max(self.max_deferred[config][i],
                                                       values["llamacpp:requests_deferred"])
                    self.max_processing[config][i] = max(self.max_processing[config][i],
                                                         values["llamacpp:requests_processing"])


def fleet_counters(ports: list[int]) -> dict[str, float]:
    totals = {"evaluated": 0.0, "cached": 0.0}
    for port in ports:
        values = prometheus_values(port, PROMETHEUS)
        totals["evaluated"] += values["llamacpp:prompt_tokens_total"]
        totals["cached"] += values["llamacpp:prompt_tokens_cached_total"]
    return totals


def summarise(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    ok = [r for r in records if r.get("status") == 200 and r.get("ttft") is not None]
    ttft = [r["ttft"] for r in ok]
    e2e = [r["e2e"] for r in ok]
    generated = sum(r.get("completion_tokens") or 0 for r in ok)
    start = min((r["sent"] for r in ok), default=0.0)
    end = max((r["sent"] + r["e2e"] for r in ok), default=wall)
    with_timings = [r for r in ok if r.get("cache_n") is not None and r.get("prompt_n") is not None]
    hits = [r for r in with_timings if r["cache_n"] >= 0.5 * (r["cache_n"] + r["prompt_n"])]
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "e2e_p50": percentile(e2e, 50),
        "e2e_p99": percentile(e2e, 99),
        "tokens_per_s": generated / (end - start) if end > start else 0.0,
        "makespan_s": end - start,
        "timings_cache_n": sum(r["cache_n"] for r in with_timings),
        "timings_prompt_n": sum(r["prompt_n"] for r in with_timings),
        "hit_share": len(hits) / len(with_timings) if with_timings else float("nan"),
    }


def start_config(procs: Processes, config: str, urls: list[str], name: str) -> tuple[Any, int | None]:
    ports = [int(u.rsplit(":", 1)[1]) for u in urls]
    if config.startswith("paddler-"):
        return start_paddler(procs, urls, name, policy=paddler_policy(config), extra=PADDLER_EXTRA)
    if config == "haproxy-leastconn-maxconn":
        return start_haproxy(procs, ports, name, streaming=True, maxconn=slots_per_server())
    if config == "sglang-cache_aware":
        return start_sglang_router(procs, urls, name, policy="cache_aware", plain=False)
    return None, None  # sticky: no balancer


def run_once(kind: str, seed: int, rep: int, quick: bool, configs: tuple[str, ...]) -> dict[str, Any]:
    conversations, spec = make_trace(kind, seed, quick)
    tag = f"rt-{kind}"
    TMP.mkdir(parents=True, exist_ok=True)
    trace_path = TMP / f"{tag}-trace.json"
    trace_path.write_text(json.dumps(traces.to_json(conversations, seed=seed)))
    assign = traces.sticky_assignment(len(conversations), slots_per_server())
    results: dict[str, Any] = {}
    with Processes() as procs:
        launched = {config: launch_fleet(procs, f"{tag}-{config}") for config in configs}
        fleets: dict[str, list[int]] = {}
        balancers: dict[str, tuple[Any, int | None]] = {}
        for config in configs:
            urls = collect_fleet(launched[config])
            fleets[config] = [int(u.rsplit(":", 1)[1]) for u in urls]
            balancers[config] = start_config(procs, config, urls, f"{tag}-{config}")
        before = {config: fleet_counters(ports) for config, ports in fleets.items()}
        cpu0 = {config: cpu_seconds(p.pid) for config, (p, _) in balancers.items() if p is not None}
        sampler = Sampler(fleets)
        sampler.start()
        clients = {}
        t0 = time.monotonic()
        for config in configs:
            out = TMP / f"{tag}-{config}-client.json"
            proc, port = balancers[config]
            target = (["--port", str(port)] if port is not None else
                      ["--ports", ",".join(map(str, fleets[config])), "--assign", ",".join(map(str, assign))])
            clients[config] = (procs.start([PYTHON, "-m", "bench.chatclient", *target, "--trace", str(trace_path),
                                            "--out", str(out)], f"{tag}-{config}-client"), out)
        for config, (client, out) in clients.items():
            client.wait(timeout=1800)
        wall = time.monotonic() - t0
        sampler.stopped.set()
        sampler.join(5)
        for config in configs:
            data = json.loads(clients[config][1].read_text())
            row = summarise(data["results"], data["wall"])
            after = fleet_counters(fleets[config])
            row["prompt_tokens_evaluated"] = after["evaluated"] - before[config]["evaluated"]
            row["prompt_tokens_cached"] = after["cached"] - before[config]["cached"]
            total = row["prompt_tokens_evaluated"] + row["prompt_tokens_cached"]
            row["cached_share"] = row["prompt_tokens_cached"] / total if total else float("nan")
            row["max_deferred_per_server"] = sampler.max_deferred[config]
            row["max_processing_per_server"] = sampler.max_processing[config]
            row["client_cpu_s"] = data["client_cpu"]
            proc = balancers[config][0]
            row["balancer_cpu_s"] = cpu_seconds(proc.pid) - cpu0[config] if proc is not None else 0.0
            results[config] = row
            log(f"{kind} rep {rep + 1} {config}: evaluated {row['prompt_tokens_evaluated']:.0f} "
                f"cached {row['prompt_tokens_cached']:.0f} ({row['cached_share']:.2f}) hits {row['hit_share']:.2f} "
                f"ttft p50 {row['ttft_p50']:.2f} p99 {row['ttft_p99']:.2f} e2e p99 {row['e2e_p99']:.1f} "
                f"tok/s {row['tokens_per_s']:.0f} errors {row['errors']} deferred max {row['max_deferred_per_server']}")
    ratios = pair_ratios(results)
    for pair, figures in ratios.items():
        log(f"{kind} rep {rep + 1} {pair}: " + " ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    return {"seed": seed, "spec": spec, "trace": traces.totals(conversations), "wall_s": wall,
            "results": results, "pairs": ratios}


#: Ratios taken per repetition: (A, B, figures compared).
PAIRS = (
    ("paddler-default", "sticky", ("prompt_tokens_evaluated",)),
    ("paddler-default", "paddler-cost", ("prompt_tokens_evaluated", "ttft_p50", "ttft_p99", "e2e_p99",
                                         "tokens_per_s")),
    ("paddler-default", "sglang-cache_aware", ("prompt_tokens_evaluated", "ttft_p50", "ttft_p99", "e2e_p99",
                                               "tokens_per_s")),
    ("paddler-default", "paddler-slots", ("prompt_tokens_evaluated", "ttft_p50", "ttft_p99", "e2e_p99",
                                          "tokens_per_s")),
    ("paddler-cost", "sticky", ("prompt_tokens_evaluated",)),
    ("paddler-cost", "sglang-cache_aware", ("prompt_tokens_evaluated", "ttft_p50", "ttft_p99", "e2e_p99",
                                            "tokens_per_s")),
    ("paddler-cost", "haproxy-leastconn-maxconn", ("prompt_tokens_evaluated", "ttft_p50", "ttft_p99", "e2e_p99",
                                                   "tokens_per_s")),
    ("paddler-cost", "paddler-slots", ("prompt_tokens_evaluated", "ttft_p50", "ttft_p99", "e2e_p99",
                                       "tokens_per_s")),
    ("paddler-slots", "sticky", ("prompt_tokens_evaluated",)),
    ("sglang-cache_aware", "sticky", ("prompt_tokens_evaluated",)),
    ("haproxy-leastconn-maxconn", "sticky", ("prompt_tokens_evaluated",)),
)


def pair_ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for a, b, keys in PAIRS:
        if a in results and b in results:
            out[f"{a}/{b}"] = {k: results[a][k] / results[b][k] if results[b][k] else float("nan") for k in keys}
    return out


FIGURES = ("prompt_tokens_evaluated", "prompt_tokens_cached", "cached_share", "hit_share", "ttft_p50", "ttft_p99",
           "e2e_p50", "e2e_p99", "tokens_per_s", "makespan_s", "balancer_cpu_s", "client_cpu_s")


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for config in runs[0]["results"]:
        per_rep = [run["results"][config] for run in runs]
        row: dict[str, Any] = {}
        for key in FIGURES:
            values = [r[key] for r in per_rep]
            row[key] = median(values)
            row[key + "_spread"] = spread(values)
        for key in ("requests", "ok", "errors"):
            row[key] = sum(r[key] for r in per_rep)
        row["max_deferred_per_server"] = [max(v) for v in zip(*(r["max_deferred_per_server"] for r in per_rep))]
        row["max_processing_per_server"] = [max(v) for v in zip(*(r["max_processing_per_server"] for r in per_rep))]
        results[config] = row
    pairs: dict[str, Any] = {}
    for pair in runs[0]["pairs"]:
        pairs[pair] = {}
        for key in runs[0]["pairs"][pair]:
            values = [run["pairs"][pair][key] for run in runs]
            pairs[pair][key] = median(values)
            pairs[pair][key + "_spread"] = spread(values)
            pairs[pair][key + "_runs"] = values
    return {"results": results, "pairs": pairs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", choices=("multiturn", "shared-prefix"))
    parser.add_argument("--quick", action="store_true", help="1 repetition of a half-size trace")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--name", default=None, help="results file name (default: the trace's)")
    args = parser.parse_args(argv)
    raise_fd_limit()
    configs = tuple(c for c in args.configs.split(",") if c)
    missing = sglang_router_available()
    if missing and "sglang-cache_aware" in configs:
        log(f"sglang-router left out: {missing}")
        configs = tuple(c for c in configs if c != "sglang-cache_aware")
    reps = args.reps or (1 if args.quick else 3)
    runs = [run_once(args.trace, args.seed + 100 * rep, rep, args.quick, configs) for rep in range(reps)]
    name = args.name or args.trace.replace("-", "_")
    data = {
        "scenario": name,
        "quick": args.quick,
        "repetitions": reps,
        "seed": args.seed,
        "sglang_router": missing or "sglang-router " + _sglang_version(),
        "fleet": [{"servers": c, "slots": s, "tokens_per_second": t, "prompt_tokens_per_second": p}
                  for c, s, t, p in FLEET],
        "n_ctx": N_CTX,
        "cache_ram_mib": CACHE_RAM_MIB,
        "cache_bytes_per_token": CACHE_BYTES_PER_TOKEN,
        "machine": machine(),
        **combine(runs),
        "runs": runs,
    }
    save(name, data)
    return data


def _sglang_version() -> str:
    try:
        from importlib.metadata import version

        return version("sglang-router")
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
