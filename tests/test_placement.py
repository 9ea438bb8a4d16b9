"""Model placement (--model-placement) on a fake clock, against simulated routers in memory:
where a model is loaded, what is evicted, one load at a time per model, minimum residency,
failed loads, replicas, the event log and paddler_model_loads_total."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock, LoopingCall, deferLater

from paddler.fleet.placement import ModelPlacement
from paddler.fleet.routers import child_id, observe_router
from paddler.fleet.upstream import Upstream
from paddler.observability.events import FleetEvents

from .helpers import make_pool
from .test_router_fleet import SimulatedRouterHost


class PlacementFleet:
    """Routers simulated in memory, a pool with placement on, and the placement service."""

    def __init__(self, clock: Clock, count: int = 2, replicas_max: int = 1, hosts: Any = None,
                 claims: Any = None, **settings: Any) -> None:
        self.clock = clock
        self.pool = make_pool(clock, max_buffered=20, timeout=60.0)
        self.pool.model_placement = True
        self.owns_hosts = hosts is None
        self.hosts = hosts if hosts is not None else [
            SimulatedRouterHost(clock, f"http://10.0.0.{i + 1}:8080", **settings) for i in range(count)
        ]
        self.routers = [self.pool.add(Upstream(h.url, name=f"gpu-{i + 1}", clock=clock))
                        for i, h in enumerate(self.hosts)]
        for router in self.routers:
            self.probe_now(router)
        self.events = FleetEvents(clock)
        self.placement = ModelPlacement(
            self.pool, clock, self.post, self.probe_now, self.events,
            interval=0.5, min_residency=30.0, load_timeout=10.0, replicas_max=replicas_max,
            poll_interval=0.25, claims=claims,
        )
        self.placement.startService()

    def host(self, router: Upstream) -> SimulatedRouterHost:
        return self.hosts[self.routers.index(router)]

    def post(self, router: Upstream, path: str, body: dict[str, Any]) -> Any:
        response = self.host(router).client.post(path, body).response
        return succeed((response.status, response.body))

    def probe_now(self, router: Upstream) -> Any:
        host = self.host(router)

        def model_mark(model: str) -> int:
            child = self.pool.upstreams.get(child_id(router.url, model))
            return child.probe_mark() if child is not None else 0

        observe_router(self.pool, router, host.read(router.probe_mark, model_mark))
        return succeed(None)

    def child(self, index: int, model: str) -> Upstream:
        return self.pool.upstreams[child_id(self.routers[index].url, model)]

    def states(self, index: int) -> dict[str, str]:
        return {m.name: m.state.value for m in self.hosts[index].router.models.values()}

    def close(self) -> None:
        self.placement.stopService()
        self.pool.stop()
        for host in self.hosts if self.owns_hosts else ():
            host.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fleets(clock: Clock):
    made: list[PlacementFleet] = []

    def make(**settings: Any) -> PlacementFleet:
        fleet = PlacementFleet(clock, **settings)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.close()
    assert clock.getDelayedCalls() == []


def released(d: Any) -> Any:
    lease = d.result
    lease.release()
    return lease


def test_requests_for_an_unloaded_model_wait_for_one_load_then_get_its_slots(fleets, clock: Clock) -> None:
    """Placement on: two clients for beta wait in the buffer (no router autoloads for them);
    placement loads beta once, on one router, and both get beta's slots there; the event log
    says "loaded beta on gpu-N", paddler_model_loads_total counts one load and
    paddler_model_load_seconds times it."""
    fleet = fleets()
    waiting = [fleet.pool.acquire("beta"), fleet.pool.acquire("beta")]
    assert not any(d.called for d in waiting)
    assert fleet.pool.buffered_by_model() == {"beta": 2}
    clock.advance(0.5)
    assert list(fleet.placement.loading) == ["beta"]
    for _ in range(4):
        clock.advance(0.25)
    leases = [d.result for d in waiting]
    [router] = {lease.upstream.parent_id for lease in leases}
    index = [r.id for r in fleet.routers].index(router)
    assert {lease.upstream.router_model for lease in leases} == {"beta"}
    assert fleet.states(index)["beta"] == "loaded"
    assert fleet.states(1 - index)["beta"] == "unloaded"
    assert sum(h.router.models["beta"].loads for h in fleet.hosts) == 1
    [entry] = [e for e in fleet.events.describe() if e["kind"] == "model_load"]
    assert entry["text"].startswith(f"loaded beta on gpu-{index + 1} (2 waiting, demand ")
    assert entry["outcome"] == "loaded"
    assert fleet.placement.loads_total == {("beta", f"gpu-{index + 1}", "loaded"): 1}
    histogram = fleet.placement.load_seconds
    assert sum(histogram.counts) == 1 and 0.5 <= histogram.sum <= 1.0  # a 0.5 s load, seen within 0.25 s

    for lease in leases:
        lease.release()


def test_a_full_router_evicts_its_idle_model_not_its_busy_one(fleets, clock: Clock) -> None:
    """One router with --models-max 2, alpha and gamma loaded; gamma took a request long ago
    that still runs (so gamma is the least recently used), alpha served one 30 s later: a
    request for beta evicts alpha (serving nothing), not busy gamma, loads beta, and the event
    says "evicted alpha (idle N s)"."""
    fleet = fleets(count=1, models_max=2)
    host = fleet.hosts[0]
    host.load("alpha")
    host.load("gamma")
    fleet.probe_now(fleet.routers[0])
    busy = fleet.pool.acquire("gamma").result
    clock.advance(30)
    fleet.pool.acquire("alpha").result.release()
    clock.advance(60)
    waiting = fleet.pool.acquire("beta")
    for _ in range(6):
        clock.advance(0.25)
    lease = waiting.result
    assert lease.upstream.router_model == "beta"
    assert fleet.states(0) == {"alpha": "unloaded", "beta": "loaded", "gamma": "loaded"}
    [entry] = [e for e in fleet.events.describe() if e["kind"] == "model_load"]
    assert entry["evicted"] == "alpha"
    assert entry["text"].startswith("loaded beta on gpu-1 (1 waiting, demand ")
    assert ", evicted alpha (idle 6" in entry["text"] and "no demand)" in entry["text"], entry["text"]
    lease.release()
    busy.release()


def test_a_model_loaded_less_than_the_minimum_residency_is_not_evicted(fleets, clock: Clock) -> None:
    """alpha loaded 5 s ago on a full router (models_max 1): a request for beta waits; once
    alpha has been resident 30 s, alpha is evicted and beta loaded."""
    fleet = fleets(count=1, models_max=1)
    fleet.hosts[0].load("alpha")
    fleet.probe_now(fleet.routers[0])
    clock.advance(5)
    waiting = fleet.pool.acquire("beta")
    for _ in range(40):
        clock.advance(0.5)
    assert not waiting.called and fleet.states(0)["alpha"] == "loaded"
    assert fleet.placement.loading == {}
    for _ in range(20):
        clock.advance(0.5)
    assert waiting.called
    assert fleet.states(0) == {"alpha": "unloaded", "beta": "loaded", "gamma": "unloaded"}
    released(waiting)


def test_a_failed_load_is_logged_and_counted(fleets, clock: Clock) -> None:
    """A load of beta that fails (exit code 3): outcome failed in the event log and the counter;
    the request keeps waiting (another load is tried later)."""
    fleet = fleets(count=1, failing={"beta": 3})
    waiting = fleet.pool.acquire("beta")
    for _ in range(6):
        clock.advance(0.25)
    [entry] = [e for e in fleet.events.describe() if e["kind"] == "model_load"]
    assert entry["outcome"] == "failed" and "exit code 3" in entry["reason"]
    assert fleet.placement.loads_total == {("beta", "gpu-1", "failed"): 1}
    assert not waiting.called
    waiting.cancel()
    waiting.addErrback(lambda _: None)


class Workload:
    """Requests for C{model} every C{every} seconds on the fake clock, each holding its slot
    C{hold} seconds once it gets one (a steady demand of C{hold / every} slots)."""

    def __init__(self, fleet: PlacementFleet, model: str, every: float, hold: float) -> None:
        self.fleet, self.model, self.hold = fleet, model, hold
        self.waiting: list[Any] = []
        self.held: list[Any] = []
        self.served: list[Any] = []
        self.loop = LoopingCall(self.send)
        self.loop.clock = fleet.clock
        self.loop.start(every)

    def send(self) -> None:
        d = self.fleet.pool.acquire(self.model)
        self.waiting.append(d)
        d.addCallback(self._granted, d)

    def _granted(self, lease: Any, d: Any) -> None:
        self.waiting.remove(d)
        self.served.append(lease)
        call = self.fleet.clock.callLater(self.hold, self._done, lease)
        self.held.append(call)

    def _done(self, lease: Any) -> None:
        self.held = [c for c in self.held if c.active()]
        lease.release()

    def stop(self) -> None:
        """No more requests; the waiting ones leave, the running ones end now."""
        if self.loop.running:
            self.loop.stop()
        for d in list(self.waiting):
            d.addErrback(lambda _: None)
            d.cancel()
        for call in list(self.held):
            if call.active():
                lease = call.args[0]
                call.cancel()
                lease.release()
        self.held = []


def run_for(clock: Clock, seconds: float, step: float = 0.25) -> None:
    for _ in range(int(seconds / step)):
        clock.advance(step)


def copies(fleet: PlacementFleet, model: str) -> int:
    return sum(1 for i in range(len(fleet.hosts)) if fleet.states(i)[model] == "loaded")


def test_a_model_whose_requests_wait_momentarily_gets_no_second_copy(fleets, clock: Clock) -> None:
    """replicas_max 2, two routers, alpha on gpu-1 and beta on gpu-2: alpha's two slots busy
    and three more requests waiting for 2 s (a burst, then quiet) do not load a second copy
    of alpha, in the burst or the minute after it."""
    fleet = fleets(replicas_max=2)
    fleet.hosts[0].load("alpha")
    fleet.hosts[1].load("beta")
    for router in fleet.routers:
        fleet.probe_now(router)
    busy = [fleet.pool.acquire("alpha").result for _ in range(2)]
    waiting = [fleet.pool.acquire("alpha") for _ in range(3)]
    run_for(clock, 2.0)
    for lease in busy:
        lease.release()
    for d in waiting:
        released(d)
    run_for(clock, 60.0)
    assert fleet.states(1) == {"alpha": "unloaded", "beta": "loaded", "gamma": "unloaded"}
    assert sum(h.router.models["alpha"].loads for h in fleet.hosts) == 1
    assert [e for e in fleet.events.describe() if e["kind"] == "model_load"] == []


def test_sustained_demand_above_capacity_adds_one_copy(fleets, clock: Clock) -> None:
    """replicas_max 3, three routers: alpha (2 slots) loaded on gpu-1 gets a request every
    0.5 s holding its slot 1.5 s (3 slots of demand): after its shortage has lasted the
    replica delay (10 s) a second copy is loaded in a free place, which serves; its demand
    fits in the 4 slots of two copies, so no third copy, though replicas_max allows it.
    The event says why: "copy 2: demand 3 slots over 2 for 10 s"."""
    fleet = fleets(count=3, replicas_max=3)
    fleet.hosts[0].load("alpha")
    fleet.probe_now(fleet.routers[0])
    work = Workload(fleet, "alpha", every=0.5, hold=1.5)
    run_for(clock, 8.0)
    assert copies(fleet, "alpha") == 1  # short, but not for long enough yet
    run_for(clock, 10.0)
    assert copies(fleet, "alpha") == 2
    [entry] = [e for e in fleet.events.describe() if e["kind"] == "model_load"]
    assert entry["evicted"] is None and "(copy 2: demand " in entry["text"], entry["text"]
    assert "slots over 2 for 1" in entry["text"]
    run_for(clock, 60.0)
    assert copies(fleet, "alpha") == 2
    assert not work.waiting  # two copies keep up
    assert {lease.upstream.parent_id for lease in work.served[-20:]} == {
        fleet.routers[i].id for i in range(3) if fleet.states(i)["alpha"] == "loaded"}
    work.stop()


def test_a_model_with_steady_demand_is_not_evicted_to_make_room_for_a_replica(fleets, clock: Clock) -> None:
    """models_max 1, replicas_max 2: alpha on gpu-1 is short of slots for good (3 slots of
    demand on 2), beta on gpu-2 has a steady small demand (a request every 2 s holding 1 s)
    and is idle half the time: beta's only copy is not evicted for alpha's second copy."""
    fleet = fleets(models_max=1, replicas_max=2)
    fleet.hosts[0].load("alpha")
    fleet.hosts[1].load("beta")
    for router in fleet.routers:
        fleet.probe_now(router)
    clock.advance(60)  # both long past the minimum residency
    hot = Workload(fleet, "alpha", every=0.5, hold=1.5)
    steady = Workload(fleet, "beta", every=2.0, hold=1.0)
    run_for(clock, 90.0)
    assert fleet.states(1)["beta"] == "loaded" and fleet.states(1)["alpha"] == "unloaded"
    assert [e for e in fleet.events.describe() if e["kind"] == "model_load"] == []
    assert not steady.waiting
    hot.stop()
    steady.stop()


def test_a_surplus_copy_makes_room_for_a_model_short_of_slots(fleets, clock: Clock) -> None:
    """models_max 1, three routers: alpha on gpu-1 short of slots for good, beta on gpu-2 and
    gpu-3 with a small demand one copy covers: one copy of beta is evicted for alpha's second
    copy (the event names beta, its idle seconds and its demand); beta keeps one copy."""
    fleet = fleets(count=3, models_max=1, replicas_max=2)
    fleet.hosts[0].load("alpha")
    fleet.hosts[1].load("beta")
    fleet.hosts[2].load("beta")
    for router in fleet.routers:
        fleet.probe_now(router)
    clock.advance(60)
    hot = Workload(fleet, "alpha", every=0.5, hold=1.5)
    steady = Workload(fleet, "beta", every=4.0, hold=1.0)
    run_for(clock, 40.0)
    assert copies(fleet, "alpha") == 2 and copies(fleet, "beta") == 1
    [entry] = [e for e in fleet.events.describe() if e["kind"] == "model_load"]
    assert entry["evicted"] == "beta"
    assert ", evicted beta (idle " in entry["text"] and " s, demand 0." in entry["text"], entry["text"]
    assert "slots, 2 on its other copies)" in entry["text"]
    run_for(clock, 60.0)
    assert len([e for e in fleet.events.describe() if e["kind"] == "model_load"]) == 1
    hot.stop()
    steady.stop()


def test_the_last_copy_of_a_model_in_use_goes_only_for_a_model_with_twice_its_demand(fleets, clock: Clock) -> None:
    """models_max 1, two routers: alpha on gpu-1 (0.5 slots of steady demand), beta on gpu-2
    (0.25). One request for gamma, loaded nowhere, waits 20 s (less than its patience, four
    load times): it evicts neither. Then gamma gets 2 slots of demand: beta's copy (the
    smaller demand, idle) is evicted for it, and the event says so; alpha stays."""
    fleet = fleets(models_max=1)
    fleet.hosts[0].load("alpha")
    fleet.hosts[1].load("beta")
    for router in fleet.routers:
        fleet.probe_now(router)
    clock.advance(60)
    work = [Workload(fleet, "alpha", every=2.0, hold=1.0), Workload(fleet, "beta", every=4.0, hold=1.0)]
    run_for(clock, 30.0)
    lonely = fleet.pool.acquire("gamma")
    run_for(clock, 20.0)
    assert not lonely.called
    assert [e for e in fleet.events.describe() if e["kind"] == "model_load"] == []
    work.append(Workload(fleet, "gamma", every=0.5, hold=1.0))
    run_for(clock, 10.0)
    assert fleet.states(0)["alpha"] == "loaded"
    assert fleet.states(1) == {"alpha": "unloaded", "beta": "unloaded", "gamma": "loaded"}
    [entry] = [e for e in fleet.events.describe() if e["kind"] == "model_load"]
    assert entry["evicted"] == "beta" and "at most half of gamma's" in entry["text"], entry["text"]
    released(lonely)
    for w in work:
        w.stop()


def test_after_a_popularity_shift_the_hot_model_gets_the_surplus_place(fleets, clock: Clock) -> None:
    """Two routers, models_max 2, replicas_max 2: alpha hot on both (gpu-1 alpha+beta, gpu-2
    alpha+gamma), beta and gamma lukewarm. Then the shift: alpha cools to one request every
    4 s, beta gets 3 slots of demand. One load only: beta on gpu-2 in place of alpha's
    surplus copy; gamma (steady) stays, alpha keeps one copy."""
    fleet = fleets(models_max=2, replicas_max=2)
    fleet.hosts[0].load("alpha")
    fleet.hosts[0].load("beta")
    fleet.hosts[1].load("alpha")
    fleet.hosts[1].load("gamma")
    for router in fleet.routers:
        fleet.probe_now(router)
    clock.advance(60)
    work = [Workload(fleet, "alpha", every=0.5, hold=1.5), Workload(fleet, "beta", every=4.0, hold=1.0),
            Workload(fleet, "gamma", every=4.0, hold=1.0)]
    run_for(clock, 60.0)
    assert [e for e in fleet.events.describe() if e["kind"] == "model_load"] == []
    work[0].stop()
    work[1].stop()
    work += [Workload(fleet, "alpha", every=4.0, hold=1.0), Workload(fleet, "beta", every=0.5, hold=1.5)]
    run_for(clock, 90.0)
    loads = [e for e in fleet.events.describe() if e["kind"] == "model_load"]
    assert [(e["model"], e["upstream"], e["evicted"]) for e in loads] == [("beta", "gpu-2", "alpha")]
    assert fleet.states(1) == {"alpha": "unloaded", "beta": "loaded", "gamma": "loaded"}
    assert copies(fleet, "alpha") == 1
    for w in work:
        w.stop()


def test_a_request_that_times_out_waiting_for_a_load_gets_its_expected_time(fleets, clock: Clock) -> None:
    """beta takes 4 s to load, learned from a first load; after an unload a request that waits
    2 s (--buffered-request-timeout) for beta's next load gets 504 with Retry-After the rest of
    the expected load time and x-should-retry true; the model upstream shows load_seconds."""
    from paddler.errors import BufferTimeout

    fleet = fleets(count=1, load_seconds=4.0)
    first = fleet.pool.acquire("beta")
    for _ in range(24):
        clock.advance(0.25)
    released(first)
    learned = fleet.child(0, "beta").load_seconds
    assert learned is not None and 4.0 <= learned <= 4.5
    fleet.hosts[0].client.post("/models/unload", {"model": "beta"})
    fleet.probe_now(fleet.routers[0])
    fleet.pool.buffer_timeout = 2.0
    timed_out: list[Any] = []
    fleet.pool.acquire("beta").addErrback(timed_out.append)
    for _ in range(8):
        clock.advance(0.25)
    [failure] = timed_out
    assert failure.check(BufferTimeout)
    error = failure.value
    assert error.headers[b"x-should-retry"] == b"true"
    assert 1 <= int(error.headers[b"retry-after"]) <= 3
    assert "beta is loading" in error.message
    for _ in range(16):
        clock.advance(0.25)


def test_a_pinned_model_is_never_evicted(fleets, clock: Clock) -> None:
    """models_max 1, alpha loaded long ago, idle, pinned: a request for beta waits (nothing may
    be evicted); unpinned, alpha is evicted and beta loaded."""
    fleet = fleets(count=1, models_max=1)
    fleet.hosts[0].load("alpha")
    fleet.probe_now(fleet.routers[0])
    fleet.child(0, "alpha").pinned = True
    clock.advance(60)
    waiting = fleet.pool.acquire("beta")
    for _ in range(8):
        clock.advance(0.5)
    assert not waiting.called and fleet.states(0)["alpha"] == "loaded"
    fleet.child(0, "alpha").pinned = False
    for _ in range(8):
        clock.advance(0.5)
    assert fleet.states(0)["beta"] == "loaded"
    released(waiting)


def test_requests_naming_a_routers_alias_are_counted_for_its_model(fleets, clock: Clock) -> None:
    """A router lists beta with the alias "b": requests for "b" wait, placement loads beta."""
    fleet = fleets(count=1)
    fleet.child(0, "beta").set_models(("beta", "b"))
    original = fleet.probe_now

    def probe_with_alias(router: Upstream) -> Any:
        result = original(router)
        fleet.child(0, "beta").set_models(("beta", "b"))  # the simulator lists no aliases
        return result

    fleet.placement.probe_now = probe_with_alias
    waiting = fleet.pool.acquire("b")
    for _ in range(6):
        clock.advance(0.25)
    assert fleet.states(0)["beta"] == "loaded"
    assert released(waiting).upstream.router_model == "beta"


def test_loads_started_in_one_check_count_for_their_router_before_it_answers(fleets, clock: Clock) -> None:
    """A router with --models-max 2 holds alpha and gamma, both idle long ago; requests for beta
    and delta wait at once, and the router answers a POST only 0.3 s later. The first load
    takes one of the two places (evicting one idle model): the second must not count the
    place the victim leaves as free while the first load has not been answered yet (a real
    router refuses the extra load: "model limit reached"), so it evicts the other idle model;
    at no moment does the router hold more than two models."""
    fleet = fleets(count=1, models_max=2, models=("alpha", "beta", "gamma", "delta"))
    host = fleet.hosts[0]
    host.load("alpha")
    host.load("gamma")
    fleet.probe_now(fleet.routers[0])
    clock.advance(100)
    answer_now = fleet.post
    most = [0]

    def slow_post(router: Upstream, path: str, body: dict[str, Any]) -> Any:
        def answer() -> Any:
            result = answer_now(router, path, body)
            running = sum(m.state.value in ("loaded", "loading") for m in host.router.models.values())
            most[0] = max(most[0], running)
            return result

        return deferLater(clock, 0.3, answer)

    fleet.placement.post = slow_post
    waiting = [fleet.pool.acquire("beta"), fleet.pool.acquire("delta")]
    clock.advance(0.5)
    loads = fleet.placement.loading
    assert sorted(loads) == ["beta", "delta"]
    assert sorted(load.victim or "" for load in loads.values()) == ["alpha", "gamma"]
    for _ in range(20):
        clock.advance(0.25)
    assert fleet.states(0) == {"alpha": "unloaded", "beta": "loaded", "gamma": "unloaded", "delta": "loaded"}, (
        fleet.placement.loads_total, [e["text"] for e in fleet.events.describe()])
    assert all(d.called for d in waiting), (fleet.pool.buffered_by_model(), fleet.placement.loads_total,
        {u.name: (u.model_state, u.slots_total, u.slots_idle, u.state) for u in fleet.pool.upstreams.values()})
    assert most[0] <= 2
    for d in waiting:
        released(d)


def test_a_request_for_a_model_loaded_nowhere_is_not_starved_by_busier_models(fleets, clock: Clock) -> None:
    """models_max 1, one router: alpha holds it with steady demand (0.5 slots), more than a
    lone request for beta ever has. The beta request waits while it is younger than its
    patience (four load times, 10 s assumed before any load was seen: 40 s), then alpha's idle
    copy goes for it and the event says why; the request is served."""
    fleet = fleets(count=1, models_max=1)
    fleet.hosts[0].load("alpha")
    fleet.probe_now(fleet.routers[0])
    clock.advance(60)
    work = Workload(fleet, "alpha", every=2.0, hold=1.0)
    run_for(clock, 30.0)
    lonely = fleet.pool.acquire("beta")
    run_for(clock, 35.0)
    assert not lonely.called
    assert fleet.states(0)["alpha"] == "loaded"
    run_for(clock, 10.0)
    assert lonely.called
    assert fleet.states(0) == {"alpha": "unloaded", "beta": "loaded", "gamma": "unloaded"}
    [entry] = [e for e in fleet.events.describe() if e["kind"] == "model_load"]
    assert entry["evicted"] == "alpha" and "a request for beta waited 4" in entry["text"], entry["text"]
    released(lonely)
    work.stop()
