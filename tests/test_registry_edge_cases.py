"""Edge case: expiry must not get stuck when the pending removal is cancelled by someone else."""

from __future__ import annotations

from twisted.internet.task import Clock

from paddler.fleet.registry import AgentRegistry, AgentReport
from paddler.fleet.upstream import upstream_id

from .helpers import make_pool

URL = "http://10.0.0.5:8080"


def test_undrain_during_expiry_does_not_make_a_silent_agent_upstream_permanent():
    """An operator undrain cancels the expiry's pending removal; the agent is still silent, so
    the next sweep expires the upstream again instead of sending it traffic forever."""
    clock = Clock()
    pool = make_pool(clock)
    registry = AgentRegistry(pool, clock, expiry=3.0)
    registry.startService()
    registry.report("a1", AgentReport(url=URL, name="gpu-1", slots_total=4, slots_processing=0))
    uid = upstream_id(URL)
    leases = []
    pool.acquire().addCallback(leases.append)  # a request in flight: expiry must wait for it
    clock.advance(4)
    assert pool.removal_pending(uid) and pool.upstreams[uid].draining
    pool.undrain(uid)  # operator: POST /api/v1/upstreams/{id}/undrain
    assert pool.upstreams[uid].accepts_requests
    clock.advance(10)  # the agent never comes back
    up = pool.upstreams.get(uid)
    assert up is None or (up.draining and pool.removal_pending(uid)), "silent agent upstream never expires"
    leases[0].release()
    assert uid not in pool.upstreams
    registry.stopService()
    assert clock.getDelayedCalls() == []
