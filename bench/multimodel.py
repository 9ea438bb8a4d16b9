"""Many models on router-mode hosts: an in-process replay on a fake clock (issue #21's trace).

Six models with Zipf popularity, whose order is reversed halfway (the
popularity shift), Poisson arrivals at a share of the fleet's capacity, four
simulated router-mode hosts (``--models-max 2``, 2 slots per model, a load
takes ``LOAD_SECONDS``). The balancer's own L{UpstreamPool}, router children
(L{paddler.fleet.routers}) and L{ModelPlacement} run against
L{SimulatedRouter}s on one L{Clock}; readings are taken from the routers
directly every 0.5 s (a probe that is never late). No HTTP: times are the
model's, for comparing the configurations side by side:

- ``static``: each host pinned to two models chosen by the first half's
  popularity (the HAProxy way: one static pool per model), no loading;
- ``autoload``: the routers' own ``--models-autoload`` (LRU eviction), paddler
  routing by model with its plain slot policy, no placement;
- ``placement``: ``--model-placement`` (paddler loads and evicts);
- ``oracle``: an offline oracle that knows the whole trace (no paddler
  placement; it loads and unloads on the routers itself, paddler routes with
  its slot policy to loaded models only). Every ``ORACLE_STEP`` s it counts
  each model's requests in the next ``LOAD_SECONDS + ORACLE_WINDOW`` s, d, and
  the copies that serves: n = ceil(d / what one copy serves in that time at
  ``ORACLE_FILL`` of its slots), at most one per host. While a model has fewer
  copies running than its n (the most requests per copy first), it loads one
  on a host without it: in a free place if there is one, else in place of an
  idle loaded copy of a model that has more copies than its n, the one whose
  model is next needed furthest in the future (Belady's rule). Loads thus
  start a load time ahead of the requests that need them, no model is loaded
  for requests that will not come, and a copy still needed is never evicted.

Every configuration starts from the static assignment loaded.

    python -m bench.multimodel [--seed S] [--seeds 3] [--duration 300] [--load 0.7] [--out FILE]
        [--demand-window 30] [--replica-after 10]   # placement's settings
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import random
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock, LoopingCall

from paddler.fleet.placement import ModelPlacement
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.routers import child_id, observe_router
from paddler.fleet.upstream import Upstream
from paddler.llamacpp.slots import ModelReading, RouterReading
from paddler.routing.policies import CHOOSERS
from paddler.simulator.engine import GenerationRequest, SimulatorConfig, SimulatorError
from paddler.simulator.router import (
    ModelState,
    RouterConfig,
    SimulatedModel,
    SimulatedRouter,
)

MODELS = ("m0", "m1", "m2", "m3", "m4", "m5")
HOSTS = 4
MODELS_MAX = 2
SLOTS = 2
LOAD_SECONDS = 10.0
PROMPT_TOKENS = 200
GENERATE = 64
TOKENS_PER_SECOND = 20.0
CONFIGS = ("static", "autoload", "placement", "oracle")
ORACLE_STEP = 1.0
ORACLE_WINDOW = 60.0
ORACLE_FILL = 0.8
SERVICE_SECONDS = PROMPT_TOKENS / 2000.0 + GENERATE / TOKENS_PER_SECOND


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def zipf_weights(n: int, s: float = 1.1) -> list[float]:
    raw = [1.0 / (k + 1) ** s for k in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def make_trace(seed: int, duration: float, load: float) -> list[tuple[float, str]]:
    """(arrival time, model): Poisson at C{load} x the fleet's slot capacity, Zipf popularity,
    the order of popularity reversed at C{duration / 2}."""
    rng = random.Random(seed)
    service = SERVICE_SECONDS
    rate = load * HOSTS * MODELS_MAX * SLOTS / service
    weights = zipf_weights(len(MODELS))
    trace, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return trace
        order = MODELS if t < duration / 2 else tuple(reversed(MODELS))
        trace.append((t, rng.choices(order, weights)[0]))


def static_assignment() -> list[tuple[str, str]]:
    """Two models per host by the first half's popularity: m0, m1 twice, the others once."""
    placements = ["m0", "m1", "m2", "m3", "m4", "m5", "m0", "m1"]
    return [(placements[2 * i], placements[2 * i + 1]) for i in range(HOSTS)]


def reading_of(router: SimulatedRouter, pool: UpstreamPool, url: str) -> RouterReading:
    models = []
    for name, model in router.models.items():
        child = pool.upstreams.get(child_id(url, name))
        mark = child.probe_mark() if child is not None else 0
        state = model.state.value if not model.failed else "failed"
        entry = ModelReading(name, (), state, model.exit_code, mark=mark)
        if model.state is ModelState.LOADED and model.engine is not None:
            entry.total, entry.processing = len(model.engine.slots), model.engine.requests_processing
        models.append(entry)
    return RouterReading(router.config.models_max, router.config.autoload, models, 0)


class Oracle:
    """The offline oracle of the module docstring: knows every arrival, loads ahead of need."""

    def __init__(self, clock: Clock, routers: Sequence[SimulatedRouter], arrivals: dict[str, list[float]],
                 refresh: Any) -> None:
        self.clock, self.routers, self.arrivals, self.refresh = clock, routers, arrivals, refresh

    def demand(self, model: str, now: float) -> int:
        times = self.arrivals.get(model, [])
        return (bisect.bisect_left(times, now + LOAD_SECONDS + ORACLE_WINDOW)
                - bisect.bisect_left(times, now))

    def next_use(self, model: str, now: float) -> float:
        times = self.arrivals.get(model, [])
        i = bisect.bisect_left(times, now)
        return times[i] if i < len(times) else math.inf

    def step(self) -> None:
        now = self.clock.seconds()
        demand = {m: self.demand(m, now) for m in MODELS}
        per_copy = SLOTS * (LOAD_SECONDS + ORACLE_WINDOW) / SERVICE_SECONDS * ORACLE_FILL
        needed = {m: min(HOSTS, math.ceil(demand[m] / per_copy)) for m in MODELS}
        for _ in range(HOSTS * MODELS_MAX):
            copies = {m: sum(1 for r in self.routers if r.models[m].running) for m in MODELS}
            short = [m for m in MODELS if copies[m] < needed[m]]
            if not short:
                return
            want = max(short, key=lambda m: demand[m] / (copies[m] + 1e-9))
            best: tuple[float, int, SimulatedModel | None] | None = None
            for i, router in enumerate(self.routers):
                if router.models[want].running:
                    continue
                if len(router.running) < MODELS_MAX:
                    best = (-math.inf, i, None)
                    break
                for v in router.running:
                    if (copies[v.name] <= needed[v.name] or v.state is not ModelState.LOADED
                            or v.busy or v._waiters):
                        continue
                    option = (-self.next_use(v.name, now), i, v)
                    if best is None or option[0] < best[0]:
                        best = option
            if best is None:
                return
            router = self.routers[best[1]]
            if best[2] is not None:
                router.unload(best[2])
            router.load(router.models[want])
            self.refresh(best[1])


def replay(trace: Sequence[tuple[float, str]], config: str, duration: float,
           demand_window: float = 30.0, replica_after: float = 10.0) -> dict[str, Any]:
    clock = Clock()
    child_config = SimulatorConfig(slots=SLOTS, tokens_per_second=TOKENS_PER_SECOND, n_ctx=4096, cache_ram_mib=0)
    routers = [SimulatedRouter(clock, RouterConfig(MODELS, MODELS_MAX, config == "autoload", LOAD_SECONDS),
                               child_config) for _ in range(HOSTS)]
    pool = UpstreamPool(clock, CHOOSERS["slots"](clock), max_buffered=10**9, buffer_timeout=1e9)
    if config != "autoload":
        pool.model_placement = True  # unloaded models take no request: static pins, placement loads
    parents: list[Upstream] = []
    for i, (router, pinned) in enumerate(zip(routers, static_assignment())):
        router.start()
        for name in pinned:
            router.load(router.models[name])
        parents.append(pool.add(Upstream(f"http://10.0.0.{i + 1}:8080", name=f"host-{i + 1}", clock=clock)))
    clock.advance(LOAD_SECONDS)
    preloaded = sum(m.loads for r in routers for m in r.models.values())
    router_of = {p.id: r for p, r in zip(parents, routers)}

    def probe(parent: Upstream) -> Any:
        observe_router(pool, parent, reading_of(router_of[parent.id], pool, parent.url))
        return succeed(None)

    def probe_all() -> None:
        for parent in parents:
            probe(parent)

    probe_all()
    loop = LoopingCall(probe_all)
    loop.clock = clock
    loop.start(0.5, now=False)
    placement = None
    if config == "placement":
        def post(parent: Upstream, path: str, body: dict[str, Any]) -> Any:
            router = router_of[parent.id]
            model = router.models[body["model"]]
            try:
                (router.load if path.endswith("/load") else router.unload)(model)
            except SimulatorError as e:
                return succeed((e.code, json.dumps(e.body()).encode()))
            return succeed((200, b'{"success":true}'))

        placement = ModelPlacement(pool, clock, post, probe, interval=0.5, min_residency=30.0,
                                   load_timeout=120.0, replicas_max=2, poll_interval=0.25,
                                   demand_window=demand_window, replica_after=replica_after)
        placement.startService()
    oracle_loop = None
    if config == "oracle":
        arrivals: dict[str, list[float]] = {}
        for t, model in trace:
            arrivals.setdefault(model, []).append(clock.seconds() + t)
        oracle = Oracle(clock, routers, arrivals, lambda i: probe(parents[i]))
        oracle_loop = LoopingCall(oracle.step)
        oracle_loop.clock = clock
        oracle_loop.start(ORACLE_STEP, now=True)
    records: list[dict[str, Any]] = []

    def arrive(model: str) -> None:
        sent = clock.seconds()
        record: dict[str, Any] = {"model": model, "sent": sent,
                                  "cold": not any(r.models[model].state is ModelState.LOADED for r in routers)}

        def run(lease: Any) -> None:
            router = router_of[lease.upstream.parent_id]
            target = router.models[model]
            first: list[float] = []

            def submit(ready: Any) -> None:
                assert target.engine is not None
                request = GenerationRequest(prompt_tokens=[1] * PROMPT_TOKENS, n_predict=GENERATE, ignore_eos=True)
                job = target.engine.submit(request, lambda job, piece, token: first or first.append(clock.seconds()))

                def done(result: Any) -> None:
                    lease.release(result.timings.to_json())
                    record.update(ttft=first[0] - sent, e2e=clock.seconds() - sent)
                    records.append(record)

                job.whenDone().addCallbacks(done, lambda f: (lease.release(), record.update(failed=True),
                                                             records.append(record)))

            if target.state is ModelState.LOADED:
                submit(None)
            else:
                router.touch(target)
                router.ensure_ready(target).addCallbacks(
                    submit, lambda f: (lease.release(), record.update(failed=True), records.append(record)))

        pool.acquire(model).addCallback(run)

    start = clock.seconds()
    for t, model in trace:
        clock.callLater(t, arrive, model)
    while len(records) < len(trace) and clock.seconds() < start + duration * 4:
        due = min(call.getTime() for call in clock.getDelayedCalls())
        clock.advance(max(0.0, due - clock.seconds()))
    loop.stop()
    if oracle_loop is not None:
        oracle_loop.stop()
    if placement is not None:
        placement.stopService()
    for router in routers:
        router.stop()
    served = [r for r in records if not r.get("failed")]
    shift = start + duration / 2
    after = [r["ttft"] for r in served if r["sent"] >= shift]
    loads = sum(m.loads for r in routers for m in r.models.values()) - preloaded
    return {
        "config": config,
        "requests": len(trace),
        "served": len(served),
        "unserved": len(trace) - len(served),
        "ttft_p50": percentile([r["ttft"] for r in served], 50),
        "ttft_p99": percentile([r["ttft"] for r in served], 99),
        "ttft_p50_after_shift": percentile(after, 50),
        "ttft_p99_after_shift": percentile(after, 99),
        "cold_requests": sum(1 for r in served if r["cold"]),
        "loads": loads,
        "loads_by_model": {name: sum(r.models[name].loads for r in routers) - sum(
            1 for pinned in static_assignment() if name in pinned) for name in MODELS},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--load", type=float, default=0.7)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--demand-window", type=float, default=30.0, help="placement's --model-demand-window")
    parser.add_argument("--replica-after", type=float, default=10.0, help="placement's --model-replica-after")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    rows = []
    for i in range(args.seeds):
        seed = args.seed + 100 * i
        trace = make_trace(seed, args.duration, args.load)
        for config in args.configs.split(","):
            r = replay(trace, config, args.duration, args.demand_window, args.replica_after) | {
                "seed": seed, "duration": args.duration, "load": args.load}
            if config == "placement":
                r |= {"demand_window": args.demand_window, "replica_after": args.replica_after}
            rows.append(r)
            print(f"seed {seed} {config:10} served {r['served']}/{r['requests']} ttft p50 {r['ttft_p50']:.2f} "
                  f"p99 {r['ttft_p99']:.2f} after the shift p50 {r['ttft_p50_after_shift']:.2f} "
                  f"p99 {r['ttft_p99_after_shift']:.2f} loads {r['loads']} cold {r['cold_requests']}")
    if args.out:
        with open(args.out, "w") as f:
            command = "python -m bench.multimodel " + " ".join(argv if argv is not None else sys.argv[1:])
            json.dump({"command": command, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
