"""The state machines: every upstream state change goes through the pool and its table;
the agent's link to its balancer follows its own table."""

from __future__ import annotations

import itertools

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from paddler.agent.service import AGENT_TRANSITIONS, AgentEvent, AgentState
from paddler.fleet.upstream import (
    TRANSITIONS,
    Event,
    FailureSeen,
    LoadingSeen,
    SlotsSeen,
    Upstream,
    UpstreamState,
)

from .helpers import make_pool


def test_the_table_has_one_target_for_every_state_and_event():
    """No (state, event) pair is left to chance: 4 states x 4 events, each with a target."""
    assert set(TRANSITIONS) == set(itertools.product(UpstreamState, Event))


def test_the_state_cannot_be_assigned():
    """state is read-only: only an observation moves it."""
    upstream = Upstream("http://a:1")
    with pytest.raises(AttributeError):
        upstream.state = UpstreamState.HEALTHY  # type: ignore[misc]


@pytest.mark.parametrize(
    "observations, expected",
    [
        ([SlotsSeen(4, 0, 0)], UpstreamState.HEALTHY),
        ([LoadingSeen()], UpstreamState.LOADING),
        ([FailureSeen("refused", unreachable_after=2)], UpstreamState.UNKNOWN),
        ([FailureSeen("refused", unreachable_after=2)] * 2, UpstreamState.UNREACHABLE),
        ([SlotsSeen(4, 0, 0), FailureSeen("x", unreachable_after=2)], UpstreamState.HEALTHY),
        ([SlotsSeen(4, 0, 0), FailureSeen("reset", source="proxy")], UpstreamState.UNREACHABLE),
        ([LoadingSeen(), FailureSeen("x", unreachable_after=3)], UpstreamState.LOADING),
        ([FailureSeen("x"), LoadingSeen()], UpstreamState.LOADING),
        ([FailureSeen("x"), SlotsSeen(2, 1, 0)], UpstreamState.HEALTHY),
    ],
)
def test_observations_move_the_state_as_the_table_says(observations, expected):
    clock = Clock()
    pool = make_pool(clock)
    upstream = pool.add(Upstream("http://a:1", clock=clock))
    for observation in observations:
        pool.observe(upstream, observation)
    assert upstream.state is expected


def test_observe_notifies_once_per_observation_and_hands_freed_slots_to_waiters():
    """Two upstreams, two waiters: an observation of each frees one slot for one waiter, in order."""
    clock = Clock()
    pool = make_pool(clock)
    a = pool.add(Upstream("http://a:1", clock=clock))
    b = pool.add(Upstream("http://b:1", clock=clock))
    events: list[tuple[str, object]] = []
    pool.subscribe(lambda event, upstream: events.append((event, upstream)))
    granted: list[str] = []
    for _ in range(2):
        pool.acquire().addCallback(lambda lease: granted.append(lease.upstream.name))
    assert granted == []
    pool.observe(a, SlotsSeen(1, 0, a.probe_mark()))
    assert granted == ["a:1"]
    pool.observe(b, SlotsSeen(1, 0, b.probe_mark()))
    assert granted == ["a:1", "b:1"]
    assert [e for e in events if e == ("changed", a)]
    assert [e for e in events if e == ("changed", b)]


def test_an_observation_of_a_removed_upstream_changes_nothing():
    """A probe answering after its upstream left the pool is dropped: no state, no event."""
    clock = Clock()
    pool = make_pool(clock)
    upstream = pool.add(Upstream("http://a:1", clock=clock))
    pool.remove(upstream.id)
    events: list[str] = []
    pool.subscribe(lambda event, _: events.append(event))
    pool.observe(upstream, SlotsSeen(4, 0, 0))
    assert upstream.state is UpstreamState.UNKNOWN and events == []


def test_a_state_change_is_logged_once_with_its_reason():
    clock = Clock()
    pool = make_pool(clock)
    upstream = pool.add(Upstream("http://a:1", name="gpu-1", clock=clock))
    with capturedLogs() as events:
        pool.observe(upstream, FailureSeen("connection refused", source="proxy"))
        pool.observe(upstream, FailureSeen("connection refused", source="proxy"))
    changes = [e for e in events if "previous" in e]
    assert len(changes) == 1
    assert (changes[0]["previous"], changes[0]["state"], changes[0]["reason"]) == (
        "unknown", "unreachable", ": connection refused"
    )


def test_probe_and_agent_observations_stamp_their_own_times():
    clock = Clock()
    pool = make_pool(clock)
    upstream = pool.add(Upstream("http://a:1", clock=clock))
    clock.advance(5)
    pool.observe(upstream, SlotsSeen(4, 0, 0, source="probe"))
    clock.advance(2)
    pool.observe(upstream, SlotsSeen(4, 0, 0, source="agent"))
    assert (upstream.last_probe_at, upstream.last_report_at, upstream.state_since) == (5, 7, 5)


def test_the_agent_table_lets_no_report_land_after_stop():
    """Reports move between the four reporting states; once stopping only 'drained' is allowed."""
    reporting = {AgentState.STARTING, AgentState.REPORTING, AgentState.UNREACHABLE, AgentState.REJECTED}
    for state in reporting:
        for event in (AgentEvent.REPORTED, AgentEvent.FAILED, AgentEvent.REJECTED, AgentEvent.STOP):
            assert (state, event) in AGENT_TRANSITIONS
    for event in (AgentEvent.REPORTED, AgentEvent.FAILED, AgentEvent.REJECTED, AgentEvent.STOP):
        assert (AgentState.DRAINING, event) not in AGENT_TRANSITIONS
        assert (AgentState.STOPPED, event) not in AGENT_TRANSITIONS
    assert AGENT_TRANSITIONS[AgentState.DRAINING, AgentEvent.DRAINED] is AgentState.STOPPED
