"""Router-mode upstreams shared through the slot store (--state), on a Clock: two balancers,
two simulated routers (alpha, beta, gamma; --models-max 2). Each router is probed by one
balancer; the other learns its models (state, slots) through the store, and both take
leases on the (router, model) child upstreams through the store, one FIFO for both."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from paddler.fleet.pool import UpstreamPool
from paddler.fleet.routers import child_id, observe_router
from paddler.fleet.upstream import Upstream, upstream_id
from paddler.interfaces import IUpstreamProber
from paddler.routing.policies import MostIdleSlotsChooser
from paddler.sharedstate.fleet import SharedFleet, SharedProber
from paddler.sharedstate.memory import MemorySlotState, MemorySlotStore

from .test_router_fleet import SimulatedRouterHost


@implementer(IUpstreamProber)
class RouterProber:
    """Reads simulated routers like HTTPProber: observe_router, then on_router_reading."""

    def __init__(self, pool: UpstreamPool, hosts: dict[str, SimulatedRouterHost]) -> None:
        self.pool = pool
        self.hosts = hosts
        self.on_reading: Any = None
        self.on_router_reading: Any = None

    def probe(self, upstream: Upstream) -> Any:
        host = self.hosts[upstream.url]

        def model_mark(model: str) -> int:
            child = self.pool.upstreams.get(child_id(upstream.url, model))
            return child.probe_mark() if child is not None else 0

        reading = host.read(upstream.probe_mark, model_mark)
        observe_router(self.pool, upstream, reading)
        if self.on_router_reading is not None:
            self.on_router_reading(upstream, reading)
        return succeed(None)


class Balancer:
    def __init__(self, clock: Clock, state: MemorySlotState, name: str, hosts: dict[str, Any], static: list[str]):
        self.pool = UpstreamPool(clock, MostIdleSlotsChooser(), max_buffered=10, buffer_timeout=30.0)
        self.store = MemorySlotStore(state, name, lease_ttl=3.0, reap_interval=0.5)
        self.fleet = SharedFleet(self.pool, self.store, clock,
                                 static_ids=frozenset(upstream_id(u) for u in static))
        self.pool.shared = self.fleet
        self.prober = SharedProber(RouterProber(self.pool, hosts), self.fleet)
        for url in static:
            self.pool.add(Upstream(url, source="static", clock=clock))
        self.fleet.startService()

    def probe_all(self) -> None:
        for upstream in list(self.pool.upstreams.values()):
            if upstream.source != "router":
                self.prober.probe(upstream)

    def child(self, url: str, model: str) -> Upstream:
        return self.pool.upstreams[child_id(url, model)]


@pytest.fixture
def world():
    clock = Clock()
    clock.advance(1000)
    state = MemorySlotState(clock)
    hosts = {url: SimulatedRouterHost(clock, url, models_max=2)
             for url in ("http://10.0.0.1:8080", "http://10.0.0.2:8080")}
    urls = sorted(hosts)
    for host in hosts.values():
        host.load("alpha")
    balancers = [Balancer(clock, state, "bal-a", hosts, urls), Balancer(clock, state, "bal-b", hosts, urls)]

    def step(seconds: float = 0.3, times: int = 1) -> None:
        for _ in range(times):
            clock.advance(seconds)
            for balancer in balancers:
                balancer.probe_all()

    step(times=4)
    yield clock, hosts, balancers, step
    for balancer in balancers:
        balancer.fleet.stopService()
        balancer.pool.stop()
    for host in hosts.values():
        host.close()
    assert clock.getDelayedCalls() == []


def test_each_router_is_probed_by_one_balancer_and_the_other_learns_its_models(world) -> None:
    """Every balancer knows both routers and their three models each, with the models' states
    and slots, whichever balancer reads the router."""
    clock, hosts, balancers, step = world
    for url in hosts:
        probers = [b for b in balancers if b.fleet.probes(b.pool.upstreams[upstream_id(url)])]
        assert len(probers) == 1
    for balancer in balancers:
        for url in hosts:
            assert balancer.pool.upstreams[upstream_id(url)].role == "router"
            states = {m: balancer.child(url, m).model_state for m in ("alpha", "beta", "gamma")}
            assert states == {"alpha": "loaded", "beta": "unloaded", "gamma": "unloaded"}
            alpha = balancer.child(url, "alpha")
            assert (alpha.slots_total, alpha.accepts_requests) == (2, True)


def test_model_slots_are_leased_through_the_store_by_both_balancers(world) -> None:
    """alpha has 2 slots on each router (4 in all): three clients at A and two at B ask for
    alpha at once; four get a slot (never more than 2 per router, counted across balancers),
    the fifth waits in the one FIFO and gets the first slot released, at either balancer."""
    clock, hosts, balancers, step = world
    a, b = balancers
    asked = [a.pool.acquire("alpha"), b.pool.acquire("alpha"), a.pool.acquire("alpha"),
             b.pool.acquire("alpha"), a.pool.acquire("alpha")]
    step()
    granted = [d for d in asked if d.called]
    assert len(granted) == 4
    per_router: dict[str, int] = {}
    for d in granted:
        lease = d.result
        assert lease.upstream.router_model == "alpha"
        per_router[lease.upstream.parent_id] = per_router.get(lease.upstream.parent_id, 0) + 1
    assert sorted(per_router.values()) == [2, 2]
    [waiting] = [d for d in asked if not d.called]
    first = next(d for d in asked if d.called and d.result.upstream is not None and d in asked[1::2])  # one of B's
    first.result.release()
    step()
    assert waiting.called and waiting.result.upstream.router_model == "alpha"
    for d in asked:
        if d is not first:
            d.result.release()


def test_a_model_loaded_on_one_router_is_seen_loaded_by_both_balancers(world) -> None:
    """beta loaded on the second router (by its operator): both balancers see it loaded
    there, with its slots, within a sync."""
    clock, hosts, balancers, step = world
    url = sorted(hosts)[1]
    hosts[url].load("beta")
    step(times=2)
    for balancer in balancers:
        assert balancer.child(url, "beta").model_state == "loaded"
        assert balancer.child(url, "beta").slots_total == 2


def test_requests_waiting_through_the_store_for_a_model_loaded_nowhere_get_it_placed_once(world) -> None:
    """--model-placement at both balancers, nothing autoloads: two clients ask A and two ask
    B for gamma, loaded nowhere (their requests wait through the store, with no upstream that
    may take them yet); gamma is loaded once in the fleet and all four get gamma's slots."""
    from paddler.fleet.placement import ModelPlacement

    clock, hosts, balancers, step = world
    placements = []
    for balancer in balancers:
        balancer.pool.model_placement = True
        prober = balancer.prober.prober

        def post(router: Upstream, path: str, body: dict[str, Any]) -> Any:
            response = hosts[router.url].client.post(path, body).response
            return succeed((response.status, response.body))

        def probe_now(router: Upstream, prober: Any = prober) -> Any:
            return prober.probe(router)

        placement = ModelPlacement(balancer.pool, clock, post, probe_now, interval=0.5, min_residency=30.0,
                                   load_timeout=10.0, claims=balancer.store)
        placement.startService()
        placements.append(placement)
    step(times=2)
    asked = [balancers[i % 2].pool.acquire("gamma") for i in range(4)]
    step(times=12)
    assert sum(h.router.models["gamma"].loads for h in hosts.values()) == 1
    served = [d for d in asked if d.called]
    assert len(served) == 2, "gamma's two slots"
    for d in served:
        d.result.release()
    step(times=2)
    assert all(d.called for d in asked), "the other two get the slots given back"
    assert {d.result.upstream.router_model for d in asked} == {"gamma"}
    assert sum(h.router.models["gamma"].loads for h in hosts.values()) == 1
    assert sum(sum(p.loads_total.values()) for p in placements) == 1
    for d in asked:
        if d not in served:
            d.result.release()
    for placement in placements:
        placement.stopService()
