"""Model placement (--model-placement) on a fake clock, against simulated routers in memory:
where a model is loaded, what is evicted, one load at a time per model, minimum residency,
failed loads, replicas, the event log and paddler_model_loads_total."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

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
    assert entry["text"] == f"loaded beta on gpu-{index + 1}" and entry["outcome"] == "loaded"
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
    assert entry["text"].startswith("loaded beta on gpu-1, evicted alpha (idle 6")
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


def test_a_busy_model_gets_a_second_copy_up_to_replicas_max(fleets, clock: Clock) -> None:
    """replicas_max 2: alpha loaded on gpu-1 with both slots busy and a request waiting: a
    second copy is loaded on gpu-2, which serves it; no third copy."""
    fleet = fleets(replicas_max=2)
    fleet.hosts[0].load("alpha")
    fleet.probe_now(fleet.routers[0])
    busy = [fleet.pool.acquire("alpha").result for _ in range(2)]
    waiting = [fleet.pool.acquire("alpha") for _ in range(3)]
    for _ in range(6):
        clock.advance(0.25)
    assert fleet.states(1)["alpha"] == "loaded"
    served = [d.result for d in waiting[:2]]
    assert {lease.upstream.parent_id for lease in served} == {fleet.routers[1].id}
    assert not waiting[2].called
    for _ in range(6):
        clock.advance(0.25)
    assert sum(h.router.models["alpha"].loads for h in fleet.hosts) == 2
    busy[0].release()
    for lease in (busy[1], *served, waiting[2].result):
        lease.release()


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
