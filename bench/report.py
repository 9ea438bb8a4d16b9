"""Render bench/results/*.json as bench/results/latest.md and PNG charts.

    python -m bench.report [--command "bench/run ..."]
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from bench.common import RESULTS, machine


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:.{digits}f}"


def overhead_md(data: dict[str, Any], charts: list[str]) -> list[str]:
    out = [
        "## 1. Proxy overhead",
        "",
        f"wrk `-t1`, POST `{data['path']}` (small JSON), {data['repetitions']} repetition(s) of "
        f"{data['seconds_per_run']:g} s per cell, targets interleaved; medians. Upstream: nginx static "
        "responder (1 worker) on 2 ports. Ratios are per repetition against direct, then the median. "
        + ("Each proxy is pinned to core {proxy_core}, wrk and the upstream to core {load_core} (taskset). ".format(
            **data["pinning"]) if data.get("pinning") else ""),
        "",
        "| concurrency | target | req/s | req/s vs direct | p50 ms | p99 ms | added p50 ms | added p99 ms | proxy CPU s / 1000 req | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, row in data["summary"].items():
        for target, r in row.items():
            out.append(
                f"| {c} | {target} | {r['rps']:.0f} | {f(r['rps_ratio'], 3)} | {f(r['p50_ms'], 3)} | {f(r['p99_ms'], 3)} "
                f"| {'' if target == 'direct' else f(r['added_p50_ms'], 3)} | {'' if target == 'direct' else f(r['added_p99_ms'], 3)} "
                f"| {'' if target == 'direct' else f(r['cpu_s_per_1000'], 3)} | {r['errors']:.0f} |"
            )
    out += ["", "Ratios of paddler to the other proxies (same run):", ""]
    for c, row in data["summary"].items():
        p = row["paddler"]
        sglang = ""
        if "cpu_vs_sglang_router" in p:
            sglang = (f", paddler/sglang-router {f(p['cpu_vs_sglang_router'], 1)}x "
                      f"(per repetition, min–max {span(p.get('cpu_vs_sglang_router_spread'), 1)})")
        out.append(
            f"- c={c}: paddler/direct {f(p['rps_ratio'], 3)}; paddler/HAProxy "
            f"{f(p['rps'] / row['haproxy']['rps'], 3)}; paddler/nginx {f(p['rps'] / row['nginx']['rps'], 3)} (req/s); "
            f"CPU per request paddler/HAProxy {f(p['cpu_s_per_1000'] / row['haproxy']['cpu_s_per_1000'], 1)}x, "
            f"paddler/nginx {f(p['cpu_s_per_1000'] / row['nginx']['cpu_s_per_1000'], 1)}x{sglang}"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        cs = list(data["summary"])
        targets = [t for t in ("paddler", "sglang-router", "haproxy", "nginx") if t in data["summary"][cs[0]]]
        width = 0.8 / len(targets)
        for i, t in enumerate(targets):
            axes[0].bar([j + i * width for j in range(len(cs))], [data["summary"][c][t]["rps_ratio"] for c in cs], width, label=t)
            axes[1].bar([j + i * width for j in range(len(cs))], [data["summary"][c][t]["cpu_s_per_1000"] for c in cs], width, label=t)
        for ax, title in ((axes[0], "req/s as a fraction of direct"), (axes[1], "proxy CPU seconds per 1000 requests")):
            ax.set_xticks([j + width for j in range(len(cs))], [f"c={c}" for c in cs])
            ax.set_title(title)
            ax.legend()
        axes[1].set_yscale("log")
        fig.tight_layout()
        fig.savefig(RESULTS / "overhead.png", dpi=90)
        plt.close(fig)
        charts.append("overhead.png")
        out += ["", "![overhead](overhead.png)"]
    except ImportError:
        out += ["", "(matplotlib missing: no chart)"]
    return out


def span(pair: Any, digits: int = 2) -> str:
    """A min–max spread, or a dash."""
    if not pair:
        return "–"
    return f"{f(pair[0], digits)}–{f(pair[1], digits)}"


def stream_table_md(data: dict[str, Any]) -> list[str]:
    """A streaming run's rows, and paddler's CPU per chunk against the others."""
    out = [
        "| streams | target | chunks | errors | p50 ms | p99 ms | added p50 ms | added p99 ms | added p99 min–max "
        "| p99 vs direct | p99 vs direct min–max | proxy CPU % of a core | CPU % min–max | CPU s / 1000 chunks "
        "| peak RSS MiB | client CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in data["rows"].items():
        target = key.split("/")[0]
        out.append(
            f"| {r['streams']} | {target} | {r['events']}/{r['expected_events']} | {r['errors']} | {f(r['p50_ms'])} "
            f"| {f(r['p99_ms'])} | {f(r.get('added_p50_ms'))} | {f(r.get('added_p99_ms'))} "
            f"| {span(r.get('added_p99_ms_spread'))} "
            f"| {f(r.get('p99_vs_direct'))} | {span(r.get('p99_vs_direct_spread'))} "
            f"| {f(r.get('balancer_cpu_pct'), 1)} | {span(r.get('balancer_cpu_pct_spread'), 0)} "
            f"| {f(r.get('cpu_s_per_1000_chunks'), 4)} "
            f"| {f(r.get('peak_rss_mib'), 1)} | {f(r['client_cpu_pct'], 0)} |"
        )
    if data.get("paddler_against"):
        out += ["", "paddler's CPU per chunk against the others, per repetition then the median (min–max):", ""]
        for key, r in data["paddler_against"].items():
            n, other = key.split("/", 1)
            out.append(f"- {n} streams: paddler / {other} {f(r['cpu_per_chunk_ratio'])}x "
                       f"({span(r.get('cpu_per_chunk_ratio_spread'))})")
    return out


def workers_md(data: dict[str, Any]) -> list[str]:
    reps = data.get("repetitions", 1)
    return [
        "## 12. `--workers 2` on the streaming scenario",
        "",
        f"The streaming scenario ({data['rate']:g} events/s per stream, {data['seconds_per_stream']:g} s, {reps} "
        "repetition(s), targets interleaved) with `paddler-workers2`: two paddler workers accepting on one port "
        "(SO_REUSEPORT), leases and the buffer shared through a local redis-server, **not pinned** (the two "
        "workers may use both cores, which they share with the upstream and the load client; redis-server's "
        "CPU is not counted). The other proxies are pinned to core 0 as in section 2. "
        "`python -m bench.streaming --sizes 512,1000 --targets paddler,sglang-router,haproxy,paddler-workers2 "
        "--no-idle --out streaming-workers`.",
        "",
        *stream_table_md(data),
    ]


def streaming_md(data: dict[str, Any], charts: list[str]) -> list[str]:
    reps = data.get("repetitions", 1)
    out = [
        "## 2. Streaming relay",
        "",
        f"SSE streams at {data['rate']:g} events/s each for {data['seconds_per_stream']:g} s; delay per chunk = "
        "client CLOCK_MONOTONIC at receipt − upstream CLOCK_MONOTONIC at write. "
        f"{reps} repetition(s), the targets interleaved within each; every figure is the median over the "
        "repetitions (each repetition's percentiles are over every chunk of that run). Added delay and the "
        "ratios to direct are computed per repetition against that repetition's direct run, then the median; "
        "the p99 ratio's and the added p99's min–max over the repetitions show the noise. A fresh proxy per cell, "
        "so peak RSS is that cell's. Chunks and errors are totals over the repetitions. "
        + ("The proxy is pinned to core {proxy_core}, the upstream and the load client to core {load_core} "
           "(taskset). ".format(**data["pinning"]) if data.get("pinning") else "")
        + "paddler-decode is paddler with `--no-relay-passthrough`.",
        "",
    ]
    out += stream_table_md(data)
    out += ["", "Idle open streams (headers and one comment sent, then silence; one run after the repetitions):", "",
            "| target | streams open | errors | RSS at start MiB | peak RSS MiB | KiB per idle stream |",
            "|---|---|---|---|---|---|"]
    for target, r in data["idle"].items():
        out.append(f"| {target} | {r['opened']}/{r['streams']} | {r['errors']} | {f(r['rss_at_start_mib'], 1)} "
                   f"| {f(r['peak_rss_mib'], 1)} | {f(r.get('kib_per_stream'), 1)} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sizes = sorted({r["streams"] for r in data["rows"].values()})
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for target in [t for t in ("paddler", "paddler-decode", "sglang-router", "nginx", "haproxy")
                       if f"{t}/{sizes[0]}" in data["rows"]]:
            rows = [data["rows"][f"{target}/{n}"] for n in sizes]
            mid = [r["p99_vs_direct"] for r in rows]
            lo = [m - r["p99_vs_direct_spread"][0] for m, r in zip(mid, rows)]
            hi = [r["p99_vs_direct_spread"][1] - m for m, r in zip(mid, rows)]
            axes[0].errorbar(sizes, mid, yerr=[lo, hi], marker="o", capsize=3, label=target)
            axes[1].plot(sizes, [r["balancer_cpu_pct"] for r in rows], marker="o", label=target)
        axes[0].axhline(1.0, color="black", linewidth=0.8)
        axes[0].set_title(f"chunk delay p99 / direct (median, min–max of {reps})")
        axes[1].set_title("balancer CPU (% of one core, median)")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("concurrent streams")
            ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "streaming.png", dpi=90)
        plt.close(fig)
        charts.append("streaming.png")
        out += ["", "![streaming](streaming.png)"]
    except ImportError:
        pass
    return out


def scheduling_md(data: dict[str, Any], charts: list[str]) -> list[str]:
    fleet = ", ".join(f"{x['servers']}× {x['slots']}-slot at {x['tokens_per_second']:g} tok/s" for x in data["fleet"])
    reps = data.get("repetitions", 1)
    out = [
        "## 3. Scheduling quality",
        "",
        f"Fleet: {fleet} (prompt {data['fleet'][0]['prompt_tokens_per_second']:g} tok/s). Mean prompt "
        f"{data['mean_prompt_tokens']:.0f} tokens, mean output {data['mean_output_tokens']:.0f} tokens (log-normal, "
        f"clipped): capacity {data['capacity_rps']:.2f} req/s. {data['duration_s']:g} s of Poisson arrivals per load "
        f"and repetition; {reps} repetition(s), each replaying a fresh seeded trace (base seed {data['seed']}) "
        f"through all {len(data['loads'][0]['results']) - 1} balancers at once and through the ideal. "
        "`haproxy-leastconn-maxconn` is `balance leastconn` with `maxconn` = the server's slots and "
        "`timeout queue 600s` (requests wait in HAProxy's queue for a free slot). paddler runs with `--max-buffered-requests 100000 "
        "--buffered-request-timeout 600 --idle-timeout 600` (HAProxy and nginx with 600 s read timeouts) so "
        "that requests wait rather than being refused. Times in seconds. Every figure is the median over the "
        "repetitions; the ratios to the ideal are taken per repetition (against the ideal of that repetition's "
        "trace) and then the median; the min–max of the TTFT p99 ratio shows the spread across repetitions "
        "(trace-to-trace variation and machine noise together). Requests and errors are totals.",
        "",
    ]
    for load in data["loads"]:
        requests = load["requests"]
        count = "+".join(str(x) for x in requests) if isinstance(requests, list) else str(requests)
        out += [
            f"### {load['load'] * 100:.0f} % of capacity ({load['rate_rps']:.2f} req/s, {count} requests)",
            "",
            "| balancer | TTFT p50 | TTFT p99 | TTFT p99 vs ideal | TTFT p99 vs ideal min–max | e2e p50 | e2e p99 "
            "| e2e p99 vs ideal | req/s | tokens/s | errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for config, r in load["results"].items():
            out.append(
                f"| {config} | {f(r['ttft_p50'])} | {f(r['ttft_p99'])} | {f(r['ttft_p99_vs_ideal'])} "
                f"| {span(r.get('ttft_p99_vs_ideal_spread'))} | {f(r['e2e_p50'])} | {f(r['e2e_p99'])} "
                f"| {f(r.get('e2e_p99_vs_ideal'))} | {f(r['throughput_rps'])} | {f(r['throughput_tokens_per_s'], 0)} "
                f"| {r['errors']} |"
            )
        out.append("")
        if load.get("pairs"):
            out += [
                "Head to head (A's figure / B's, per repetition on the same trace; median and min–max):",
                "",
                "| A / B | TTFT p50 | TTFT p99 | TTFT p99 min–max | e2e p99 | e2e p99 min–max | tokens/s |",
                "|---|---|---|---|---|---|---|",
            ]
            for pair, r in load["pairs"].items():
                out.append(
                    f"| {pair} | {f(r['ttft_p50'])} | {f(r['ttft_p99'])} | {span(r.get('ttft_p99_spread'))} "
                    f"| {f(r['e2e_p99'])} | {span(r.get('e2e_p99_spread'))} | {f(r['throughput_tokens_per_s'])} |"
                )
            out.append("")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        configs = [c for c in data["loads"][0]["results"] if c != "ideal"]
        fig, ax = plt.subplots(figsize=(10, 4))
        width = 0.8 / len(configs)
        for i, config in enumerate(configs):
            rows = [load["results"][config] for load in data["loads"]]
            mid = [r["ttft_p99_vs_ideal"] for r in rows]
            err = [[m - r["ttft_p99_vs_ideal_spread"][0] for m, r in zip(mid, rows)],
                   [r["ttft_p99_vs_ideal_spread"][1] - m for m, r in zip(mid, rows)]]
            ax.bar([j + i * width for j in range(len(data["loads"]))], mid, width, yerr=err, capsize=2, label=config)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(data["loads"]))],
                      [f"{load['load'] * 100:.0f}% load" for load in data["loads"]])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(f"TTFT p99 / ideal (central FIFO, perfect knowledge): median, min–max of {reps}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "scheduling.png", dpi=90)
        plt.close(fig)
        charts.append("scheduling.png")
        out += ["![scheduling](scheduling.png)"]
    except ImportError:
        pass
    return out


def fleet_md(data: dict[str, Any], charts: list[str]) -> list[str]:
    out = [
        "## 4. Scale of the fleet",
        "",
        "One `paddler simulate --fleet N` process (pinned to one core), paddler (pinned to the other) probing every "
        "upstream each second, no requests.",
        "",
        "| upstreams | balancer CPU % of a core (idle) | simulator CPU % |",
        "|---|---|---|",
    ]
    for r in data["idle"]:
        out.append(f"| {r['upstreams']} | {f(r['balancer_cpu_pct'], 1)} | {f(r['simulator_cpu_pct'], 1)} |")
    out += ["", "Chooser cost: µs per `pool.acquire()` + `lease.release()` in-process (median of repeats):", "",
            "| policy | 4 upstreams | 100 upstreams | 500 upstreams |", "|---|---|---|---|"]
    for policy, row in data["chooser_us"].items():
        out.append(f"| {policy} | {f(row['4'], 1)} | {f(row['100'], 1)} | {f(row['500'], 1)} |")
    return out


ROUTING_TITLES = {
    "multiturn": "## 5. Multi-turn chat (prompt cache)",
    "shared_prefix": "## 6. Shared prefix (many users, few long system prompts)",
    "routing_real": "## 7. Multi-turn chat on two real llama-servers",
}


def routing_md(name: str, data: dict[str, Any]) -> list[str]:
    reps = data.get("repetitions", 1)
    real = name == "routing_real"
    if real:
        setup = (f"{data['servers']} real llama-servers ({data.get('llama_server', '?')}, tiny model, -np {data['slots']}, "
                 f"{data['slot_ctx']}-token slots, default prompt cache), {data['spec']['conversations']} conversations "
                 f"× {data['spec']['turns']} turns; configs run one after the other on fresh servers. Prompt tokens from "
                 "the answers' `timings.prompt_n` / `cache_n`; times are a tiny model's (ms), read the tokens.")
    else:
        fleet = ", ".join(f"{x['servers']}× {x['slots']}-slot at {x['tokens_per_second']:g} tok/s "
                          f"(prompt {x['prompt_tokens_per_second']:g})" for x in data["fleet"])
        spec = data["runs"][0]["spec"]
        trace = data["runs"][0]["trace"]
        setup = (f"Fleet: {fleet}, `paddler simulate` with its prompt cache ({data['cache_ram_mib']} MiB `--cache-ram` at "
                 f"{data['cache_bytes_per_token']} bytes/token), {data['n_ctx']}-token slots. Trace: "
                 + ", ".join(f"{k} {v}" for k, v in spec.items()) + f" ({trace['requests']} requests). All configs replay "
                 "at once, each on its own identical fleet. Prompt tokens evaluated/cached: the servers' `/metrics` "
                 "(`llamacpp:prompt_tokens_total`, `prompt_tokens_cached_total`).")
    out = [
        ROUTING_TITLES[name],
        "",
        setup + f" {reps} repetition(s), a fresh seeded trace each (base seed {data['seed']}); medians, min–max in "
        f"brackets; ratios per repetition, then the median. sglang-router: {data.get('sglang_router')}. "
        "'hits': share of requests whose `timings.cache_n` covered at least half the prompt. 'max queued': the most "
        "requests each server held in its own queue (`requests_deferred`, sampled every 0.5 s; > 0 = above its slots).",
        "",
        "| config | prompt tokens evaluated | cached share | hits | TTFT p50 s | TTFT p99 s | e2e p99 s | tokens/s "
        "| max queued per server | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, r in data["results"].items():
        queued = "–" if real else "/".join(f"{x:.0f}" for x in r["max_deferred_per_server"])
        out.append(
            f"| {config} | {r['prompt_tokens_evaluated']:.0f} [{span(r['prompt_tokens_evaluated_spread'], 0)}] "
            f"| {f(r['cached_share'])} | {f(r['hit_share'])} | {f(r['ttft_p50'], 3 if real else 2)} "
            f"[{span(r['ttft_p50_spread'], 3 if real else 2)}] | {f(r['ttft_p99'], 3 if real else 2)} "
            f"[{span(r['ttft_p99_spread'], 3 if real else 2)}] | {f(r['e2e_p99'])} | {f(r['tokens_per_s'], 0)} "
            f"| {queued} | {r['errors']} |"
        )
    out += ["", "Ratios (A / B per repetition; median [min–max]):", "", "| A / B | figure | ratio |", "|---|---|---|"]
    for pair, figures in data["pairs"].items():
        for key in figures:
            if key.endswith("_spread") or key.endswith("_runs"):
                continue
            out.append(f"| {pair} | {key} | {f(figures[key])} [{span(figures[key + '_spread'])}] |")
    return out


def micro_md(data: dict[str, Any], charts: list[str]) -> list[str]:
    out = [
        "## 8. Relay path in memory",
        "",
        "`python -m bench.relay_micro`: the real ProxyResource behind a real Twisted server channel, upstream "
        "and client on in-memory transports (no sockets, no reactor): Python CPU per relayed SSE chunk "
        f"({data['chunk_bytes']} bytes on the wire) and per small non-streaming request, best of 5. "
        "`agent` is the path before the upstream client (Twisted's HTTP client decoding, Twisted's server "
        "re-chunking).",
        "",
        "| path | µs per chunk | µs per small request |",
        "|---|---|---|",
    ]
    for variant, r in data["rows"].items():
        out.append(f"| {variant} | {f(r['us_per_chunk'])} | {f(r['us_per_request'], 1)} |")
    return out


def _busy(data: dict[str, Any]) -> str:
    """How busy the whole machine was during a run's cells (median, min–max of machine_busy_pct), if recorded."""
    values: list[float] = []
    runs = data.get("runs", {})
    for cells in runs.values():
        for cell in (cells.values() if isinstance(cells, dict) else [cells]):
            for r in (cell if isinstance(cell, list) else [cell]):
                if isinstance(r, dict) and "machine_busy_pct" in r:
                    values.append(r["machine_busy_pct"])
    if not values:
        return "(not recorded)"
    values.sort()
    return f"{values[len(values) // 2]:.0f} % ({values[0]:.0f}–{values[-1]:.0f} %)"


def before_after_md(
    stream: dict[str, Any] | None, over: dict[str, Any] | None, title: str = "## 9. Before and after, side by side"
) -> list[str]:
    """Same-run comparisons with another checkout of paddler (``--base``: the code before this work)."""
    out = [title, ""]
    if over is not None:
        out += [
            f"Scenario 1 with `--base {over.get('base', '?')}` (paddler before this work, as "
            "`paddler-base`), the same run, targets interleaved; CPU per request ratios per repetition, then "
            "the median (min–max); the whole machine was "
            f"{_busy(over)} busy during the runs:",
            "",
            "| concurrency | paddler CPU ms / req | paddler-base CPU ms / req | paddler / paddler-base "
            "| sglang-router CPU ms / req | paddler / sglang-router | paddler req/s | paddler-base req/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c, row in over["summary"].items():
            p, b = row["paddler"], row.get("paddler-base", {})
            g = row.get("sglang-router", {})
            out.append(
                f"| {c} | {f(p['cpu_s_per_1000'], 3)} | {f(b.get('cpu_s_per_1000'), 3)} "
                f"| {f(p.get('cpu_vs_base'))} ({span(p.get('cpu_vs_base_spread'))}) | {f(g.get('cpu_s_per_1000'), 3)} "
                f"| {f(p.get('cpu_vs_sglang_router'))} ({span(p.get('cpu_vs_sglang_router_spread'))}) "
                f"| {p['rps']:.0f} | {b.get('rps', float('nan')):.0f} |"
            )
        out.append("")
    if stream is not None:
        out += [
            f"Scenario 2 with `--base {stream.get('base', '?')}`, {stream['repetitions']} repetitions, "
            "the targets interleaved; `twisted-floor` is a plain TCP forwarder on Twisted's reactor "
            "(bench/twisted_forward.py, no HTTP at all): no relay on that reactor can use less CPU per chunk; "
            "`twisted-floor-lean` the same on paddler's lean reactor with the write flush. The whole machine "
            f"was {_busy(stream)} busy during the cells.",
            "",
            "| streams | target | added p50 ms | added p99 ms | added p99 min–max | CPU s / 1000 chunks "
            "| CPU / chunk vs paddler-base (min–max) |",
            "|---|---|---|---|---|---|---|",
        ]
        for n in stream["sizes"]:
            base_runs = stream["runs"].get(f"paddler-base/{n}", [])
            for target in stream["targets"]:
                if target == "direct":
                    continue
                r = stream["rows"][f"{target}/{n}"]
                ratios = [a["cpu_s_per_1000_chunks"] / b["cpu_s_per_1000_chunks"]
                          for a, b in zip(stream["runs"][f"{target}/{n}"], base_runs)
                          if b.get("cpu_s_per_1000_chunks")]
                ratio = "–" if not ratios or target == "paddler-base" else (
                    f"{f(statistics.median(ratios))} ({f(min(ratios))}–{f(max(ratios))})")
                out.append(
                    f"| {n} | {target} | {f(r.get('added_p50_ms'))} | {f(r.get('added_p99_ms'))} "
                    f"| {span(r.get('added_p99_ms_spread'))} | {f(r.get('cpu_s_per_1000_chunks'), 4)} | {ratio} |"
                )
    return out


def parser_md(data: dict[str, Any], charts: list[str]) -> list[str]:
    out = [
        "## 10. A faster HTTP parser on the proxy port? (prototype)",
        "",
        "`python -m bench.parser_prototype`: three Twisted servers answering every POST with the same small "
        "JSON, pinned to one core, wrk at concurrency 16 on the other; medians of "
        f"{data['repetitions']} (min–max). Not paddler: the floor each server side puts under any proxy on it.",
        "",
        "| server side | CPU ms / request | min–max | req/s |",
        "|---|---|---|---|",
    ]
    for kind, r in data["rows"].items():
        out.append(f"| {kind} | {f(r['cpu_ms_per_request'], 3)} | {span(r.get('cpu_ms_per_request_spread'), 3)} "
                   f"| {r['rps']:.0f} |")
    return out


def replicas_md(data: dict[str, Any]) -> list[str]:
    out = [
        "## 11. Several balancers on one fleet (shared state on Redis)",
        "",
        f"`bench/replicas.py`: the scheduling fleet and a seeded Poisson trace at {data['load'] * 100:.0f} % load "
        f"({data['duration_s']:g} s of arrivals), through four configurations at once, each on its own fleet; "
        f"{data['repetitions']} repetition(s), medians. 'queued inside servers': the most requests the servers held "
        "in their own queues at once (`llamacpp:requests_deferred`, read every 50 ms) and the request-seconds "
        "spent there (0 = no server ever above its slots).",
        "",
        "| config | TTFT p50 s | TTFT p99 s | TTFT p99 / 1-local | e2e p99 s | queued inside servers (peak) "
        "| request-s queued | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config, r in data["results"].items():
        out.append(
            f"| {config} | {f(r['ttft_p50'])} | {f(r['ttft_p99'])} | {f(r['ttft_p99_vs_1_local'])} "
            f"[{span(r['ttft_p99_vs_1_local_spread'])}] | {f(r['e2e_p99'])} | {r['deferred_peak']:.0f} "
            f"| {f(r['deferred_request_seconds'])} | {r['errors']} |"
        )
    return out


def reps_note() -> str:
    counts = []
    for name, key in (("overhead", "repetitions"), ("streaming", "repetitions"), ("scheduling", "repetitions")):
        data = _load(name)
        counts.append(f"{name} {data.get(key, 1) if data else '–'}")
    return "repetitions (" + ", ".join(counts) + ")"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--command", default="bench/run")
    args = parser.parse_args(argv)
    sections: list[str] = []
    charts: list[str] = []
    machine_info = None
    dates: list[str] = []
    for name, render in (("overhead", overhead_md), ("streaming", streaming_md),
                         ("scheduling", scheduling_md), ("fleet", fleet_md)):
        data = _load(name)
        if data is None:
            sections += [f"## {name}", "", "not run", ""]
            continue
        machine_info = machine_info or data.get("machine")
        if data.get("machine", {}).get("date"):
            dates.append(data["machine"]["date"])
        quick = " (quick mode)" if data.get("quick") else ""
        sections += [line.replace("\n", " ") for line in render(data, charts)]
        if quick:
            sections.append(f"\n_{name} ran in quick mode._")
        sections.append("")
    for name in ("multiturn", "shared_prefix", "routing_real"):
        data = _load(name)
        if data is None:
            continue
        if data.get("machine", {}).get("date"):
            dates.append(data["machine"]["date"])
        sections += [line.replace("\n", " ") for line in routing_md(name, data)]
        if data.get("quick"):
            sections.append(f"\n_{name} ran in quick mode._")
        sections.append("")
    micro = _load("relay_micro")
    if micro is not None:
        sections += [line.replace("\n", " ") for line in micro_md(micro, charts)] + [""]
    if _load("streaming-ab") is not None or _load("overhead-ab") is not None:
        sections += before_after_md(_load("streaming-ab"), _load("overhead-ab")) + [""]
    prototype = _load("parser_prototype")
    if prototype is not None:
        sections += parser_md(prototype, charts) + [""]
    replicas = _load("replicas")
    if replicas is not None:
        sections += replicas_md(replicas) + [""]
    workers = _load("streaming-workers")
    if workers is not None:
        sections += [line.replace("\n", " ") for line in workers_md(workers)] + [""]
    if _load("streaming-lean") is not None or _load("overhead-lean") is not None:
        sections += before_after_md(
            _load("streaming-lean"), _load("overhead-lean"),
            "## 13. The lean reactor and the write flush (issue 26), side by side",
        ) + [""]
    if _load("streaming-lean-2") is not None or _load("overhead-lean-2") is not None:
        sections += before_after_md(
            _load("streaming-lean-2"), _load("overhead-lean-2"), "### 13c. A second run of section 13, later"
        ) + [""]
    toggles = _load("streaming-toggles")
    if toggles is not None:
        sections += before_after_md(
            toggles, None,
            "### 13b. The same code with both off (`paddler-twisted`: --no-lean-reactor --no-flush-before-poll)",
        ) + [""]
    m = machine_info or machine()
    tools = (_load("overhead") or {}).get("tools", {})
    head = [
        "# paddler benchmarks",
        "",
        f"Produced by `{args.command.strip()}`; the scenarios' results were saved between {min(dates)} and "
        f"{max(dates)}." if dates else f"Produced by `{args.command.strip()}` on {m['date']}.",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), Python {m['python']}, Linux {m['kernel']}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}. The machine is shared with other work: only "
        "ratios measured side by side in one run mean anything. " + "; ".join(f"{k}: {v}" for k, v in tools.items()),
        "",
        "All processes run on 127.0.0.1 on 2 cores shared with other work; in scenarios 1, 2 and 4 the proxy "
        "under test has one core to itself as far as this harness goes (taskset), the load the other, but "
        "other processes on the machine are not pinned away, so absolute figures are far below what each "
        "would do alone. Explanations: docs/performance.md. Profile of scenario 1: "
        "profile-overhead.txt.",
        "",
        "Repetitions: scenarios 1, 2 and 3 each report the median over " + reps_note() + " with targets interleaved "
        "within each repetition, and ratios taken per repetition against that repetition's baseline (direct for 1 "
        "and 2, the ideal schedule of the same trace for 3) before the median; scenarios 2 and 3 also show the "
        "min–max of their key ratio across repetitions.",
        "",
    ]
    (RESULTS / "latest.md").write_text("\n".join(head + sections) + "\n")


if __name__ == "__main__":
    main()
