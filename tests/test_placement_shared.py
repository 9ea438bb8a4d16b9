"""Model placement with shared state (--state): two balancers, each with its own pool and
placement service, in front of the same two simulated routers, claiming placements through
one shared store (the in-memory twin of the Redis scripts) on a fake clock. Exactly one load
per model for the same demand; no eviction of a model the other balancer just placed."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from paddler.sharedstate.memory import MemorySlotState, MemorySlotStore

from .test_placement import PlacementFleet
from .test_router_fleet import SimulatedRouterHost


class TwoBalancers:
    """Two routers (models alpha, beta, gamma) and two balancers sharing one store."""

    def __init__(self, clock: Clock, shared: bool = True, **settings: Any) -> None:
        self.clock = clock
        self.hosts = [SimulatedRouterHost(clock, f"http://10.0.0.{i + 1}:8080", **settings) for i in range(2)]
        self.state = MemorySlotState(clock)
        self.stores = [MemorySlotStore(self.state, owner, reap_interval=3600.0) for owner in ("bal-a", "bal-b")]
        for store in self.stores:
            store.startService()
        self.balancers = [
            PlacementFleet(clock, hosts=self.hosts, claims=store if shared else None) for store in self.stores
        ]

    def step(self, seconds: float = 0.25) -> None:
        """Time passes; every balancer reads every router (as its probes do)."""
        self.clock.advance(seconds)
        for balancer in self.balancers:
            for router in balancer.routers:
                balancer.probe_now(router)

    def loads(self, model: str) -> int:
        return sum(host.router.models[model].loads for host in self.hosts)

    def placed(self) -> dict[tuple[str, str, str], int]:
        total: dict[tuple[str, str, str], int] = {}
        for balancer in self.balancers:
            for key, count in balancer.placement.loads_total.items():
                total[key] = total.get(key, 0) + count
        return total

    def close(self) -> None:
        for balancer in self.balancers:
            balancer.close()
        for store in self.stores:
            store.stopService()
        for host in self.hosts:
            host.close()


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1000)
    return clock


@pytest.fixture
def pair(clock: Clock):
    made: list[TwoBalancers] = []

    def make(**settings: Any) -> TwoBalancers:
        made.append(TwoBalancers(clock, **settings))
        return made[-1]

    yield make
    for fleet in made:
        fleet.close()
    assert clock.getDelayedCalls() == []


def test_requests_for_a_model_loaded_nowhere_at_both_balancers_load_it_once(pair, clock: Clock) -> None:
    """Two clients ask balancer A and two ask balancer B for beta, loaded nowhere, at once:
    one balancer places beta (one POST /models/load, one router loads it), the other's claim
    is refused; every request is answered by beta's slots once it is loaded."""
    fleet = pair()
    a, b = fleet.balancers
    waiting = [a.pool.acquire("beta"), b.pool.acquire("beta"), a.pool.acquire("beta"), b.pool.acquire("beta")]
    for _ in range(8):
        fleet.step()
    assert fleet.loads("beta") == 1
    placed = fleet.placed()
    assert sum(placed.values()) == 1 and [outcome for (_, _, outcome) in placed] == ["loaded"]
    assert all(d.called for d in waiting[:2]) or all(d.called for d in waiting[2:]) or all(d.called for d in waiting)
    for _ in range(8):
        fleet.step()
    assert fleet.loads("beta") == 1, "no second copy once the claim's hold is over: beta is loaded"
    leases = [d.result for d in waiting if d.called]
    assert {lease.upstream.router_model for lease in leases} == {"beta"}
    for lease in leases:
        lease.release()
    for _ in range(8):
        fleet.step()
    leases = [d.result for d in waiting if d.called and d.result not in leases]
    assert all(d.called for d in waiting)
    for d in waiting:
        if not d.result.released:
            d.result.release()


def test_a_model_the_other_balancer_just_placed_is_not_evicted(pair, clock: Clock) -> None:
    """Both routers full (models_max 2: alpha and gamma, loaded long ago). Balancer A places
    beta on one of them, evicting that router's alpha. Balancer B's view missed the swap (its
    reading says beta has been loaded long): a request for alpha at B, with gamma busy there,
    would evict beta, but the store refuses (beta was placed less than 30 s ago) and B loads
    alpha nowhere meanwhile; past the residency B may place it."""
    fleet = pair(models_max=2)
    for host in fleet.hosts:
        host.load("alpha")
        host.load("gamma")
    a, b = fleet.balancers
    for _ in range(4):
        fleet.step()
    fleet.step(100)
    beta = a.pool.acquire("beta")
    for _ in range(8):
        fleet.step()
    lease = beta.result
    lease.release()
    index = [r.id for r in a.routers].index(lease.upstream.parent_id)
    assert a.states(index) == {"alpha": "unloaded", "beta": "loaded", "gamma": "loaded"}
    # B only reads the router where beta now lives; its gamma there is busy; other router down for B
    other = b.routers[1 - index]
    b.pool.drain(other.id)
    b.child(index, "beta").model_since = clock.seconds() - 100  # the view that missed the swap
    gamma = b.pool.acquire("gamma").result
    alpha = b.pool.acquire("alpha")
    for _ in range(20):
        clock.advance(0.25)
    assert a.states(index) == {"alpha": "unloaded", "beta": "loaded", "gamma": "loaded"}
    assert b.placement.loads_total == {}
    assert not alpha.called
    for _ in range(120):
        clock.advance(0.25)
    assert alpha.called and alpha.result.upstream.router_model == "alpha"
    assert a.states(index)["beta"] == "unloaded", "evicted once resident 30 s"
    alpha.result.release()
    gamma.release()
