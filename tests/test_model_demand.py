"""A model's demand in slots (paddler.fleet.demand) on a fake clock: arrivals over a sliding
window times lease seconds, waiting requests counted, aliases summed, the busy floor, and the
pool feeding it (arrivals, not retries; lease seconds of router models)."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from paddler.fleet.demand import DEFAULT_SERVICE_SECONDS, ModelDemand, SlidingSum
from .helpers import healthy_upstream, make_pool


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1000)
    return clock


def test_a_sliding_sum_forgets_what_left_its_window(clock: Clock) -> None:
    """Two values 10 s apart in a 30 s window: both count, then only the second, then none;
    the mean is over the values in the window."""
    window = SlidingSum(clock, 30.0)
    window.add(4.0)
    clock.advance(10)
    window.add(2.0)
    assert window.total() == 6.0 and window.mean() == 3.0
    clock.advance(25)
    assert window.total() == 2.0 and window.mean() == 2.0
    clock.advance(10)
    assert window.total() == 0.0 and window.mean() == 0.0


def test_demand_is_arrivals_per_second_times_lease_seconds(clock: Clock) -> None:
    """alpha: 30 requests in 30 s, each holding a slot 3 s: 3 slots; beta: 3 requests, lease
    seconds not learned (the mean of the models learned, 3 s): 0.3 slots. A minute later, with
    nothing new, both are 0."""
    demand = ModelDemand(clock, window=30.0)
    clock.advance(30)
    for _ in range(30):
        demand.arrived("alpha")
        demand.served("alpha", 3.0)
        clock.advance(1)
    for _ in range(3):
        demand.arrived("beta")
    assert demand.slots("alpha") == pytest.approx(3.0, rel=0.05)
    assert demand.slots("beta") == pytest.approx(0.3, rel=0.05)
    clock.advance(60)
    assert demand.slots("alpha") == 0.0 and demand.slots("beta") == 0.0


def test_waiting_requests_aliases_and_busy_slots_raise_the_demand(clock: Clock) -> None:
    """Nothing learned (1 s leases): gamma with 6 requests waiting that arrived before the
    window counts 6 in 30 s; requests for alias "g" count for gamma; the fleet-wide busy slots
    sampled (other balancers' requests) are a floor."""
    demand = ModelDemand(clock, window=30.0)
    clock.advance(60)
    assert demand.slots("gamma", waiting=6) == pytest.approx(6 * DEFAULT_SERVICE_SECONDS / 30.0)
    for _ in range(15):
        demand.arrived("g")
    assert demand.slots("gamma") == 0.0
    assert demand.slots("gamma", ("gamma", "g")) == pytest.approx(0.5)
    demand.observe_busy("gamma", 2)
    demand.observe_busy("gamma", 4)
    assert demand.slots("gamma", ("gamma", "g")) == pytest.approx(3.0)


def test_a_young_demand_is_not_blown_up_by_its_first_request(clock: Clock) -> None:
    """Ten seconds after start one request: 1 in 10 s (not 1 in a second); two copies of a
    1 s lease model would not be called for by it."""
    demand = ModelDemand(clock, window=30.0)
    clock.advance(10)
    demand.arrived("alpha")
    assert demand.slots("alpha") == pytest.approx(0.1)


def test_the_pool_counts_arrivals_not_retries_and_the_lease_seconds_of_router_models(clock: Clock) -> None:
    """A request for beta counts as an arrival, its retry (another upstream excluded) does not;
    a lease on a router's beta child held 4 s teaches beta's lease seconds; a lease on a
    single-model server teaches nothing."""
    pool = make_pool(clock, max_buffered=10, timeout=60.0)
    single = pool.add(healthy_upstream("http://10.0.0.9:8080", total=2, models=("beta",), clock=clock))
    lease = pool.acquire("beta").result
    pool.acquire("beta", exclude=["other"]).result.release()
    clock.advance(4)
    lease.release()
    assert pool.demand.arrivals("beta") == 1.0
    assert pool.demand.service == {}
    single.router_model = "beta"  # as a router's child is
    lease = pool.acquire("beta").result
    clock.advance(4)
    lease.release()
    assert pool.demand.service == {"beta": 4.0}
    pool.stop()
