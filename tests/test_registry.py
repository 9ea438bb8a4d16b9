"""AgentRegistry: agent reports become upstreams; silent agents expire without breaking requests."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from paddler.fleet.registry import AgentRegistry, AgentReport, RegistryConflict
from paddler.fleet.upstream import Upstream, UpstreamState, upstream_id

from .helpers import healthy_upstream, make_pool


def report(url="http://10.0.0.5:8080", name="gpu-1", total=4, processing=1, **kw) -> AgentReport:
    return AgentReport(url=url, name=name, slots_total=total, slots_processing=processing, **kw)


def started(expiry=3.0):
    clock = Clock()
    pool = make_pool(clock)
    registry = AgentRegistry(pool, clock, expiry=expiry)
    registry.startService()
    return clock, pool, registry


def test_first_report_adds_a_healthy_agent_upstream_with_its_slots():
    """A report creates an upstream of source "agent", healthy, with the reported slots and model."""
    clock, pool, registry = started()
    clock.advance(5)
    up = registry.report("a1", report(models=("qwen",)))
    assert pool.upstreams[up.id] is up and up.source == "agent"
    assert up.id == upstream_id("http://10.0.0.5:8080")
    assert up.state is UpstreamState.HEALTHY and up.accepts_requests
    assert (up.slots_total, up.slots_processing, up.slots_idle) == (4, 1, 3)
    assert up.model == "qwen" and up.last_report_at == 5
    assert registry.agents["a1"].upstream_id == up.id
    registry.stopService()


def test_report_is_absolute_and_not_counted_twice_with_our_leases():
    """processing includes our own requests: with 1 lease out and 1 reported busy, 3 stay idle."""
    clock, pool, registry = started()
    up = registry.report("a1", report(processing=0))
    lease = []
    pool.acquire().addCallback(lease.append)
    assert up.slots_idle == 3
    registry.report("a1", report(processing=1))
    assert up.slots_idle == 3
    lease[0].release()
    assert up.slots_idle == 4  # the reported busy slot was ours: freed at once
    registry.report("a1", report(processing=2))
    assert up.slots_idle == 2  # someone else's requests count
    registry.stopService()


def test_report_with_error_marks_unreachable_or_loading():
    """A report's state and error are the upstream's: unreachable/loading take no traffic."""
    clock, pool, registry = started()
    up = registry.report("a1", report(state=UpstreamState.UNREACHABLE, error="connection refused",
                                      total=0, processing=0))
    assert up.state is UpstreamState.UNREACHABLE and up.last_error == "connection refused"
    assert not up.accepts_requests
    registry.report("a1", report(state=UpstreamState.LOADING, error="Loading model"))
    assert up.state is UpstreamState.LOADING
    registry.report("a1", report())
    assert up.state is UpstreamState.HEALTHY and up.last_error is None
    registry.stopService()


def test_a_report_hands_new_slots_to_buffered_requests():
    """A buffered request gets the slot of an agent's first report in the same turn."""
    clock, pool, registry = started()
    waiting = []
    pool.acquire().addCallback(waiting.append)
    assert waiting == []
    up = registry.report("a1", report(processing=0))
    assert waiting and waiting[0].upstream is up
    waiting[0].release()
    registry.stopService()


def test_report_conflicts_name_the_field():
    """A URL held by a non-agent upstream, another upstream's name, another agent's URL: 409s."""
    clock, pool, registry = started()
    pool.add(healthy_upstream("http://static:1"))
    with pytest.raises(RegistryConflict) as e:
        registry.report("a1", report(url="http://static:1"))
    assert e.value.field == "url"
    registry.report("a1", report())
    with pytest.raises(RegistryConflict) as e:
        registry.report("a2", report(url="http://10.0.0.6:8080", name="gpu-1"))
    assert e.value.field == "name"
    with pytest.raises(RegistryConflict) as e:
        registry.report("a2", report(name="gpu-2"))
    assert e.value.field == "url"
    assert len(pool.upstreams) == 2 and set(registry.agents) == {"a1"}
    registry.stopService()


def test_silent_agent_expires_and_its_idle_upstream_is_removed():
    """No report for longer than agent_expiry: the upstream goes, and so does the agent record."""
    clock, pool, registry = started(expiry=3.0)
    up = registry.report("a1", report())
    clock.advance(2.9)
    assert up.id in pool.upstreams
    clock.advance(0.6)
    assert up.id not in pool.upstreams and registry.agents == {}
    registry.stopService()
    assert clock.getDelayedCalls() == []


def test_expiry_lets_in_flight_requests_finish():
    """An expired agent's upstream with a request running drains; it goes when the request ends."""
    clock, pool, registry = started(expiry=1.0)
    up = registry.report("a1", report())
    lease = []
    pool.acquire().addCallback(lease.append)
    clock.advance(1.5)
    assert up.id in pool.upstreams and up.draining and up.in_flight == 1
    lease[0].release()
    assert up.id not in pool.upstreams
    registry.stopService()


def test_agent_back_before_idle_undoes_the_expiry_drain():
    """A report arriving while an expired upstream waits for idle keeps it and takes traffic again."""
    clock, pool, registry = started(expiry=1.0)
    up = registry.report("a1", report())
    lease = []
    pool.acquire().addCallback(lease.append)
    clock.advance(1.5)
    assert up.draining
    registry.report("a1", report())
    assert not up.draining and not pool.removal_pending(up.id)
    lease[0].release()
    assert up.id in pool.upstreams
    registry.stopService()


def test_operator_drain_survives_reports_and_expiry_recovery():
    """Reports never undrain; recovery from expiry keeps a drain an operator asked for."""
    clock, pool, registry = started(expiry=1.0)
    up = registry.report("a1", report())
    pool.drain(up.id)
    registry.report("a1", report())
    assert up.draining
    lease = []
    up.draining = False
    pool.acquire().addCallback(lease.append)
    pool.drain(up.id)
    clock.advance(1.5)
    registry.report("a1", report())
    assert up.draining and not pool.removal_pending(up.id)
    lease[0].release()
    assert up.id in pool.upstreams
    registry.stopService()


def test_slow_agents_get_three_of_their_intervals():
    """An agent reporting every 5 s expires after 15 s, not after the 3 s floor."""
    clock, pool, registry = started(expiry=3.0)
    up = registry.report("a1", report(interval=5.0))
    clock.advance(14)
    assert up.id in pool.upstreams
    clock.advance(2)
    assert up.id not in pool.upstreams
    registry.stopService()


def test_agent_moving_to_a_new_url_retires_the_old_upstream():
    """A report with another URL from the same agent replaces its upstream (the old one drains out)."""
    clock, pool, registry = started()
    old = registry.report("a1", report())
    new = registry.report("a1", report(url="http://10.0.0.7:8080"))
    assert old.id not in pool.upstreams and new.id in pool.upstreams
    assert registry.agents["a1"].upstream_id == new.id
    registry.stopService()


def test_forced_removal_forgets_the_agent_until_it_reports_again():
    """Removing an agent upstream drops the agent record; the next report registers it anew."""
    clock, pool, registry = started()
    up = registry.report("a1", report())
    pool.remove(up.id)
    assert registry.agents == {}
    again = registry.report("a1", report())
    assert again is not up and again.id == up.id
    registry.stopService()


def test_static_upstreams_never_expire():
    """Only agent upstreams expire."""
    clock, pool, registry = started(expiry=1.0)
    static = pool.add(Upstream("http://static:1", clock=clock))
    clock.advance(10)
    assert static.id in pool.upstreams
    registry.stopService()
    assert clock.getDelayedCalls() == []


def test_operator_drain_during_expiry_survives_the_agent_coming_back():
    """An operator's drain that arrives while an expiry is pending is kept when the agent reports again."""
    clock, pool, registry = started(expiry=1.0)
    up = registry.report("a1", report())
    lease = []
    pool.acquire().addCallback(lease.append)
    clock.advance(1.5)  # expiry drains and waits for the request to end
    assert up.draining and pool.removal_pending(up.id)
    pool.drain(up.id, requested=True)  # the operator drains it too
    registry.report("a1", report())
    assert up.draining and not pool.removal_pending(up.id)
    pool.undrain(up.id)
    assert not up.draining and not up.drain_requested
    lease[0].release()
    registry.stopService()
