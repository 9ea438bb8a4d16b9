"""In-process replay of a conversation trace on a fake clock: the real pool and policies, simulated servers.

For tuning the ``cost`` policy quickly and without machine noise: the
balancer's own L{UpstreamPool} and chooser run against
L{SimulatedServerEngine}s (the simulator's timing and prompt-cache model)
on one L{Clock}, with the trace's think times; no HTTP, no probes (the pool
knows every slot exactly, as with a probe that is never late). Times are
the model's, not measured: use it to compare policies and settings, and
the real benchmark (L{bench.routing}) for the figures that are reported.

Configs: ``cost``, ``slots`` (paddler's policies), ``leastconn-maxconn``
(HAProxy ``leastconn`` with ``maxconn`` = slots: the free server with the
fewest requests, else wait in one FIFO) and ``sticky`` (each conversation
on one server, in proportion to slots; queued inside the server).

    python -m bench.routesim multiturn [--seed S] [--configs cost,slots,...]
    python -m bench.routesim poisson [--loads 0.8,0.95]   # the scheduling scenario's trace

``poisson`` replays L{bench.scheduling}'s trace (distinct random prompts,
Poisson arrivals, streaming ``/completion``) on its fleet: the no-prefix
trace on which a cache-aware policy must not lose to ``slots``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.task import Clock
from zope.interface import implementer

from bench import traces
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import SlotsSeen, Upstream
from paddler.interfaces import ISlotChooser
from paddler.routing.policies import CHOOSERS, _Policy
from paddler.simulator.engine import SimulatedServerEngine, SimulatorConfig
from paddler.simulator.validation import chat_request, completion_request

MODEL = "simulated.gguf"


@implementer(ISlotChooser)
class LeastConnMaxconn(_Policy):
    """HAProxy ``leastconn`` with ``maxconn`` = slots: the fewest requests among servers below their limit."""

    name = "leastconn-maxconn"

    def choose(self, upstreams: Sequence[Upstream], model: str | None, demand: Any = None) -> Upstream | None:
        free = [u for u in upstreams if u.in_flight < u.slots_total]
        if not free:
            return None
        return min(free, key=lambda u: (u.in_flight, u.last_chosen))


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def replay(
    conversations: Sequence[traces.Conversation],
    fleet: Sequence[tuple[int, int, float, float]],
    config: str,
    n_ctx: int = 8192,
    cache_ram_mib: int = 8192,
    make_chooser: Callable[[Clock], Any] | None = None,
) -> dict[str, Any]:
    """Replay the trace through one config; per-request records and fleet totals."""
    clock = Clock()
    servers: list[tuple[SimulatedServerEngine, Upstream]] = []
    for count, slots, tps, pps in fleet:
        for _ in range(count):
            engine = SimulatedServerEngine(clock, SimulatorConfig(
                slots=slots, tokens_per_second=tps, prompt_tokens_per_second=pps, n_ctx=n_ctx,
                seed=len(servers), cache_ram_mib=cache_ram_mib))
            engine.start()
            upstream = Upstream(f"http://10.0.0.{len(servers) + 1}:8080", clock=clock)
            upstream.record(SlotsSeen(slots, 0, upstream.probe_mark(), models=(MODEL,)), 0.0)
            servers.append((engine, upstream))
    if make_chooser is not None:
        chooser = make_chooser(clock)
    elif config == "leastconn-maxconn":
        chooser = LeastConnMaxconn()
    else:
        chooser = CHOOSERS.get(config, CHOOSERS["slots"])(clock)
    pool = UpstreamPool(clock, chooser, max_buffered=10**9, buffer_timeout=1e9)
    for _, upstream in servers:
        pool.upstreams[upstream.id] = upstream
    engine_of = {upstream.id: engine for engine, upstream in servers}
    index_of = {upstream.id: i for i, (_, upstream) in enumerate(servers)}
    assign = traces.sticky_assignment(len(conversations), [s for c, s, _, _ in fleet for _ in range(c)])
    records: list[dict[str, Any]] = []
    max_in_flight = [0] * len(servers)

    def turn(conv: traces.Conversation, k: int, messages: list[dict[str, str]]) -> None:
        t = conv.turns[k]
        messages = [*messages, {"role": "user", "content": t.user}]
        body = {"messages": messages, "max_tokens": t.max_tokens, "ignore_eos": True}
        sent = clock.seconds()
        record: dict[str, Any] = {"conversation": conv.id, "turn": k, "system": conv.system_key, "sent": sent}

        def run_on(engine: SimulatedServerEngine, server: int, release: Callable[[Any], None] | None) -> None:
            first: list[float] = []
            job = engine.submit(chat_request(body), lambda job, piece, token: first or first.append(clock.seconds()))
            max_in_flight[server] = max(max_in_flight[server], engine.requests_processing + engine.requests_deferred)

            def done(result: Any) -> None:
                timings = result.timings.to_json()
                if release is not None:
                    release(timings)
                record.update(server=server, ttft=first[0] - sent, e2e=clock.seconds() - sent,
                              cache_n=timings["cache_n"], prompt_n=timings["prompt_n"],
                              generated=result.tokens_predicted)
                records.append(record)
                if k + 1 < len(conv.turns):
                    reply = {"role": "assistant", "content": result.content}
                    clock.callLater(conv.turns[k + 1].think, turn, conv, k + 1, [*messages, reply])

            job.whenDone().addCallback(done)

        if config == "sticky":
            engine, upstream = servers[assign[conv.id]]
            run_on(engine, assign[conv.id], None)
            return
        demand = pool.chooser.prepare(body, b"/v1/chat/completions", {})

        def leased(lease: Any) -> None:
            record["waited"] = clock.seconds() - sent
            hold_until = getattr(lease.demand, "hold_until", None)
            record["held"] = hold_until is not None
            record["hold_expired"] = hold_until is not None and clock.seconds() >= hold_until
            record["demand"] = lease.demand
            run_on(engine_of[lease.upstream.id], index_of[lease.upstream.id], lambda timings: lease.release(timings))

        pool.acquire(None, (), demand).addCallback(leased)

    for conv in conversations:
        clock.callLater(conv.start, turn, conv, 0, [{"role": "system", "content": conv.system}])
    while True:
        calls = clock.getDelayedCalls()
        if not calls:
            break
        clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))
    evaluated = sum(e.metrics.prompt_tokens_total for e, _ in servers)
    cached = sum(e.metrics.prompt_tokens_cached_total for e, _ in servers)
    ttft = [r["ttft"] for r in records]
    e2e = [r["e2e"] for r in records]
    end = max(r["sent"] + r["e2e"] for r in records)
    start = min(r["sent"] for r in records)
    return {
        "config": config,
        "requests": len(records),
        "evaluated": evaluated,
        "cached": cached,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "ttft_max": max(ttft),
        "e2e_p99": percentile(e2e, 99),
        "tokens_per_s": sum(r["generated"] for r in records) / (end - start),
        "max_in_flight": max_in_flight,
        "records": records,
    }


def _fleet_servers(clock: Clock, fleet: Sequence[tuple[int, int, float, float]], n_ctx: int,
                   cache_ram_mib: int) -> list[tuple[SimulatedServerEngine, Upstream]]:
    servers: list[tuple[SimulatedServerEngine, Upstream]] = []
    for count, slots, tps, pps in fleet:
        for _ in range(count):
            engine = SimulatedServerEngine(clock, SimulatorConfig(
                slots=slots, tokens_per_second=tps, prompt_tokens_per_second=pps, n_ctx=n_ctx,
                seed=len(servers), cache_ram_mib=cache_ram_mib))
            engine.start()
            upstream = Upstream(f"http://10.0.0.{len(servers) + 1}:8080", clock=clock)
            upstream.record(SlotsSeen(slots, 0, upstream.probe_mark(), models=(MODEL,)), 0.0)
            servers.append((engine, upstream))
    return servers


def _make_chooser(config: str, clock: Clock, make_chooser: Callable[[Clock], Any] | None) -> Any:
    if make_chooser is not None:
        return make_chooser(clock)
    if config == "leastconn-maxconn":
        return LeastConnMaxconn()
    return CHOOSERS.get(config, CHOOSERS["slots"])(clock)


def _run(clock: Clock) -> None:
    while True:
        calls = clock.getDelayedCalls()
        if not calls:
            break
        clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))


def replay_requests(
    requests: Sequence[dict[str, Any]],
    fleet: Sequence[tuple[int, int, float, float]],
    config: str,
    n_ctx: int = 4096,
    cache_ram_mib: int = 8192,
    make_chooser: Callable[[Clock], Any] | None = None,
) -> dict[str, Any]:
    """Replay independent requests (L{bench.scheduling.make_trace}'s) through one config."""
    clock = Clock()
    servers = _fleet_servers(clock, fleet, n_ctx, cache_ram_mib)
    pool = UpstreamPool(clock, _make_chooser(config, clock, make_chooser), max_buffered=10**9, buffer_timeout=1e9)
    for _, upstream in servers:
        pool.upstreams[upstream.id] = upstream
    engine_of = {upstream.id: engine for engine, upstream in servers}
    index_of = {upstream.id: i for i, (_, upstream) in enumerate(servers)}
    records: list[dict[str, Any]] = []

    def send(request: dict[str, Any]) -> None:
        body = {"prompt": request["prompt"], "n_predict": request["n_predict"], "ignore_eos": True,
                "stream": True}
        sent = clock.seconds()
        demand = pool.chooser.prepare(body, b"/completion", {})

        def leased(lease: Any) -> None:
            engine = engine_of[lease.upstream.id]
            first: list[float] = []
            job = engine.submit(completion_request(body),
                                lambda job, piece, token: first or first.append(clock.seconds()))

            def done(result: Any) -> None:
                lease.release(result.timings.to_json())
                records.append({"id": request["id"], "server": index_of[lease.upstream.id],
                                "ttft": first[0] - sent, "e2e": clock.seconds() - sent,
                                "n_predict": request["n_predict"], "waited": 0.0})

            job.whenDone().addCallback(done)

        pool.acquire(None, (), demand).addCallback(leased)

    for request in requests:
        clock.callLater(request["at"], send, request)
    _run(clock)
    ttft = [r["ttft"] for r in records]
    e2e = [r["e2e"] for r in records]
    per_server = [sum(1 for r in records if r["server"] == i) for i in range(len(servers))]
    return {"config": config, "requests": len(records), "ttft_p50": percentile(ttft, 50),
            "ttft_p99": percentile(ttft, 99), "e2e_p50": percentile(e2e, 50), "e2e_p99": percentile(e2e, 99),
            "per_server": per_server, "records": records}


def poisson_main(args: argparse.Namespace) -> None:
    from bench import scheduling

    fleet = [(c, s, t, scheduling.PROMPT_TPS) for c, s, t in scheduling.FLEET]
    configs = args.configs.split(",")
    rows = []
    for load in (float(x) for x in args.loads.split(",")):
        for i in range(args.seeds):
            seed = args.seed + 100 * i
            trace = scheduling.make_trace(load, args.duration, seed)
            results = {c: replay_requests(trace["requests"], fleet, c) for c in configs}
            base = results.get("slots")
            for config, r in results.items():
                vs = (f"ttft p99 {r['ttft_p99'] / base['ttft_p99']:.2f}x e2e p99 {r['e2e_p99'] / base['e2e_p99']:.2f}x"
                      if base else "")
                print(f"load {load:.2f} seed {seed} {config:18} ttft p50 {r['ttft_p50']:.2f} p99 {r['ttft_p99']:.2f} "
                      f"e2e p99 {r['e2e_p99']:.1f} {vs} per server {r['per_server']}", flush=True)
                rows.append({k: v for k, v in r.items() if k != "records"} | {"seed": seed, "load": load})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", choices=("multiturn", "shared-prefix", "poisson"))
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--seeds", type=int, default=3, help="traces (seed, seed + 100, ...)")
    parser.add_argument("--configs", default="cost,slots,leastconn-maxconn,sticky")
    parser.add_argument("--out")
    parser.add_argument("--loads", default="0.8,0.95", help="poisson: loads")
    parser.add_argument("--duration", type=float, default=20.0, help="poisson: seconds of arrivals")
    args = parser.parse_args(argv)
    if args.trace == "poisson":
        if args.configs == parser.get_default("configs"):
            args.configs = "cost,slots"
        poisson_main(args)
        return
    from bench.routing import FLEET, make_trace

    rows = []
    for i in range(args.seeds):
        conversations, _ = make_trace(args.trace, args.seed + 100 * i, quick=False)
        results = {c: replay(conversations, FLEET, c) for c in args.configs.split(",")}
        base = results.get("sticky")
        for config, r in results.items():
            vs = r["evaluated"] / base["evaluated"] if base else math.nan
            print(f"seed {args.seed + 100 * i} {config:18} evaluated {r['evaluated']:7d} ({vs:.2f}x sticky) "
                  f"ttft p50 {r['ttft_p50']:.2f} p99 {r['ttft_p99']:.2f} e2e p99 {r['e2e_p99']:.1f} "
                  f"tok/s {r['tokens_per_s']:.0f} max in flight {r['max_in_flight']}")
            rows.append({k: v for k, v in r.items() if k != "records"} | {"seed": args.seed + 100 * i})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
