"""Render bench/results/*.json as bench/results/latest.md and PNG charts.

    python -m bench.report [--command "bench/run ..."]
"""

from __future__ import annotations

import argparse
import json
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
        "responder (1 worker) on 2 ports. Ratios are per repetition against direct, then the median.",
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
        out.append(
            f"- c={c}: paddler/direct {f(p['rps_ratio'], 3)}; paddler/HAProxy "
            f"{f(p['rps'] / row['haproxy']['rps'], 3)}; paddler/nginx {f(p['rps'] / row['nginx']['rps'], 3)} (req/s); "
            f"CPU per request paddler/HAProxy {f(p['cpu_s_per_1000'] / row['haproxy']['cpu_s_per_1000'], 1)}x, "
            f"paddler/nginx {f(p['cpu_s_per_1000'] / row['nginx']['cpu_s_per_1000'], 1)}x"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        cs = list(data["summary"])
        targets = ["paddler", "haproxy", "nginx"]
        width = 0.25
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


def streaming_md(data: dict[str, Any], charts: list[str]) -> list[str]:
    reps = data.get("repetitions", 1)
    out = [
        "## 2. Streaming relay",
        "",
        f"SSE streams at {data['rate']:g} events/s each for {data['seconds_per_stream']:g} s; delay per chunk = "
        "client CLOCK_MONOTONIC at receipt − upstream CLOCK_MONOTONIC at write. "
        f"{reps} repetition(s), the four targets interleaved within each; every figure is the median over the "
        "repetitions (each repetition's percentiles are over every chunk of that run). Added delay and the "
        "ratios to direct are computed per repetition against that repetition's direct run, then the median; "
        "the p99 ratio's min–max over the repetitions shows the noise. A fresh balancer per cell, so peak RSS "
        "is that cell's. Chunks and errors are totals over the repetitions.",
        "",
        "| streams | target | chunks | errors | p50 ms | p99 ms | added p50 ms | added p99 ms | p50 vs direct "
        "| p99 vs direct | p99 vs direct min–max | balancer CPU % of a core | peak RSS MiB | client CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in data["rows"].items():
        target = key.split("/")[0]
        out.append(
            f"| {r['streams']} | {target} | {r['events']}/{r['expected_events']} | {r['errors']} | {f(r['p50_ms'])} "
            f"| {f(r['p99_ms'])} | {f(r.get('added_p50_ms'))} | {f(r.get('added_p99_ms'))} "
            f"| {f(r.get('p50_vs_direct'))} | {f(r.get('p99_vs_direct'))} | {span(r.get('p99_vs_direct_spread'))} "
            f"| {f(r.get('balancer_cpu_pct'), 1)} | {f(r.get('peak_rss_mib'), 1)} | {f(r['client_cpu_pct'], 0)} |"
        )
    out += ["", "Idle open streams (headers and one comment sent, then silence; one run after the repetitions):", "",
            "| target | streams open | errors | RSS at start MiB | peak RSS MiB |", "|---|---|---|---|---|"]
    for target, r in data["idle"].items():
        out.append(f"| {target} | {r['opened']}/{r['streams']} | {r['errors']} | {f(r['rss_at_start_mib'], 1)} | {f(r['peak_rss_mib'], 1)} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sizes = sorted({r["streams"] for r in data["rows"].values()})
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for target in ("paddler", "nginx", "haproxy"):
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
        "One `paddler simulate --fleet N` process, paddler probing every upstream each second, no requests.",
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
        "All processes run on 127.0.0.1 on the same 2 cores as the load generators, so absolute figures are far "
        "below what each would do alone. Explanations: docs/performance.md. Profile of scenario 1: "
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
