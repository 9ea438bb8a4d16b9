"""Scenario 7: the multi-turn trace, small, on two real llama-servers.

Two ``llama-server`` processes (the test build: tests/llamacpp/build-llama-server,
its tiny random-weight model, ``-np 2``, 2,048-token slots (the model's training context), ``--metrics``,
default prompt cache: ``--cache-ram 8192``, similarity 0.1), four
concurrent six-turn conversations (one shared system prompt for two of them,
private ones for the others; think times about a second). Each config gets
fresh servers (so no cache carries over) and they run one after the other,
in a rotated order per repetition; each repetition replays a fresh seeded
trace. Configs as in L{bench.routing}: ``paddler-default`` (no ``--policy``:
what the README's ``paddler balancer`` runs), ``paddler-cost``, ``paddler-slots``,
``haproxy-leastconn-maxconn``, ``sglang-cache_aware``, ``sticky``.

Figures: prompt tokens the servers evaluated and reused, from the answers'
own ``timings.cache_n`` / ``timings.prompt_n`` (summed by the client) and
from ``/metrics`` (``llamacpp:prompt_tokens_total``); TTFT and e2e are
those of a tiny model on 2 shared cores (milliseconds): read the prompt
tokens, not the times.

    python -m bench.routing_real [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import traces
from bench.common import (
    LOOPBACK,
    PYTHON,
    ROOT,
    TMP,
    Processes,
    free_port,
    http_get,
    log,
    machine,
    paddler_policy,
    prometheus_values,
    raise_fd_limit,
    save,
    sglang_router_available,
    start_haproxy,
    start_paddler,
    start_sglang_router,
)
from bench.routing import CONFIGS, PADDLER_EXTRA, combine, pair_ratios, summarise

SERVERS = 2
SLOTS = 2
SLOT_CTX = 2048
SPEC = traces.MultiturnSpec(conversations=4, turns=6, window=1.0, shared_prompts=1, shared_share=0.5,
                            system_tokens=120, user_median=20.0, reply_median=30.0, think_mean=1.0)


def build() -> tuple[Path, Path]:
    out = subprocess.run([str(ROOT / "tests" / "llamacpp" / "build-llama-server")], capture_output=True, text=True,
                         timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"build-llama-server failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    binary = Path(out.stdout.strip().splitlines()[-1])
    return binary, binary.with_name("tiny.gguf")


def start_servers(procs: Processes, binary: Path, model: Path, name: str) -> list[int]:
    ports = []
    for i in range(SERVERS):
        port = free_port()
        procs.start([str(binary), "-m", str(model), "--host", LOOPBACK, "--port", str(port), "-np", str(SLOTS),
                     "-c", str(SLOTS * SLOT_CTX), "--slots", "--metrics", "-t", "1"], f"{name}-llama{i}")
        ports.append(port)
    deadline = time.monotonic() + 60
    for port in ports:
        while True:
            try:
                if http_get(port, "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama-server on {port} not ready")
            time.sleep(0.2)
    return ports


def run_config(config: str, trace_path: Path, n: int, binary: Path, model: Path, tag: str,
               debug: bool = False) -> dict[str, Any]:
    with Processes() as procs:
        ports = start_servers(procs, binary, model, f"{tag}-{config}")
        urls = [f"http://{LOOPBACK}:{p}" for p in ports]
        proc, port = None, None
        if config.startswith("paddler-"):
            proc, port = start_paddler(procs, urls, f"{tag}-{config}", policy=paddler_policy(config),
                                       extra=PADDLER_EXTRA, env={"PADDLER_LOG_LEVEL": "debug"} if debug else None)
        elif config == "haproxy-leastconn-maxconn":
            proc, port = start_haproxy(procs, ports, f"{tag}-{config}", streaming=True, maxconn=[SLOTS] * SERVERS)
        elif config == "sglang-cache_aware":
            proc, port = start_sglang_router(procs, urls, f"{tag}-{config}", policy="cache_aware", plain=False)
        assign = traces.sticky_assignment(n, [SLOTS] * SERVERS)
        target = (["--port", str(port)] if port is not None else
                  ["--ports", ",".join(map(str, ports)), "--assign", ",".join(map(str, assign))])
        out = TMP / f"{tag}-{config}-client.json"
        before = [prometheus_values(p, ("llamacpp:prompt_tokens_total",)) for p in ports]
        client = procs.start([PYTHON, "-m", "bench.chatclient", *target, "--trace", str(trace_path), "--out", str(out),
                              "--timeout", "300"], f"{tag}-{config}-client")
        client.wait(timeout=900)
        after = [prometheus_values(p, ("llamacpp:prompt_tokens_total",)) for p in ports]
    data = json.loads(out.read_text())
    row = summarise(data["results"], data["wall"])
    row["prompt_tokens_evaluated"] = row["timings_prompt_n"]
    row["prompt_tokens_cached"] = row["timings_cache_n"]
    total = row["prompt_tokens_evaluated"] + row["prompt_tokens_cached"]
    row["cached_share"] = row["prompt_tokens_cached"] / total if total else float("nan")
    row["metrics_prompt_tokens_total"] = sum(a["llamacpp:prompt_tokens_total"] - b["llamacpp:prompt_tokens_total"]
                                             for a, b in zip(after, before))
    row["max_deferred_per_server"] = [0.0] * SERVERS
    row["max_processing_per_server"] = [0.0] * SERVERS
    row["balancer_cpu_s"] = 0.0
    row["client_cpu_s"] = data["client_cpu"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--debug-log", action="store_true",
                        help="paddler logs every routing decision (PADDLER_LOG_LEVEL=debug; in bench/.tmp/rr-*.log)")
    args = parser.parse_args(argv)
    raise_fd_limit()
    binary, model = build()
    configs = [c for c in args.configs.split(",") if c]
    missing = sglang_router_available()
    if missing and "sglang-cache_aware" in configs:
        log(f"sglang-router left out: {missing}")
        configs.remove("sglang-cache_aware")
    reps = args.reps or (1 if args.quick else 3)
    runs = []
    for rep in range(reps):
        seed = args.seed + 100 * rep
        conversations = traces.multiturn(SPEC, seed)
        TMP.mkdir(parents=True, exist_ok=True)
        trace_path = TMP / "rr-trace.json"
        trace_path.write_text(json.dumps(traces.to_json(conversations, seed=seed)))
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        results = {}
        for config in order:
            row = run_config(config, trace_path, len(conversations), binary, model, f"rr{rep + 1}", args.debug_log)
            results[config] = row
            log(f"real rep {rep + 1} {config}: evaluated {row['prompt_tokens_evaluated']:.0f} (metrics "
                f"{row['metrics_prompt_tokens_total']:.0f}) cached {row['prompt_tokens_cached']:.0f} "
                f"hits {row['hit_share']:.2f} ttft p50 {row['ttft_p50'] * 1000:.0f} ms p99 {row['ttft_p99'] * 1000:.0f} ms "
                f"errors {row['errors']}")
        ratios = pair_ratios(results)
        for pair, figures in ratios.items():
            log(f"real rep {rep + 1} {pair}: " + " ".join(f"{k} {v:.2f}" for k, v in figures.items()))
        runs.append({"seed": seed, "order": order, "trace": traces.totals(conversations), "results": results,
                     "pairs": ratios})
    version = (binary.parent / "version.txt").read_text().strip() if (binary.parent / "version.txt").exists() else "?"
    data = {"scenario": "routing_real", "quick": args.quick, "repetitions": reps, "seed": args.seed,
            "llama_server": version, "servers": SERVERS, "slots": SLOTS, "slot_ctx": SLOT_CTX,
            "spec": {k: getattr(SPEC, k) for k in SPEC.__dataclass_fields__},
            "sglang_router": missing or "installed", "machine": machine(), **combine(runs), "runs": runs}
    save("routing_real", data)
    return data


if __name__ == "__main__":
    main()
