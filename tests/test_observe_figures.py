"""The dashboard's figures: per-upstream request windows, the fleet event log and the state fields
an operator acts on (buffer limit, not-served counts, time in state, policy figures)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from paddler.fleet.upstream import FailureSeen, LoadingSeen, SlotsSeen, Upstream
from paddler.observability.events import FleetEvents
from paddler.observability.requests import UPSTREAM_SAMPLES, RequestStats
from paddler.observability.snapshot import FleetView, StateHistory
from paddler.observability.stream import ObservabilityService, StateStream
from paddler.routing.policies import CostChooser

from .helpers import make_pool


class Named:
    """The part of an upstream RequestStats reads."""

    def __init__(self, key: str) -> None:
        self.id = key
        self.name = key
        self.requests_served = 0
        self.requests_failed = 0


def started(clock: Clock, **pool_options: Any) -> tuple[Any, RequestStats, FleetEvents, ObservabilityService]:
    pool = make_pool(clock, **pool_options)
    stats = RequestStats(clock)
    events = FleetEvents(clock)
    history = StateHistory()
    view = FleetView(pool, stats, clock, history, events)
    service = ObservabilityService(pool, stats, clock, history, StateStream(clock, view), events)
    service.startService()
    return pool, stats, events, service


# -- per-upstream windows ------------------------------------------------------


def test_upstream_window_counts_rate_latencies_and_4xx_5xx_of_the_last_minute() -> None:
    """Each upstream has its own last-minute figures: requests and their rate, TTFT and duration
    p50/p95, 4xx and 5xx answers; a request older than the window no longer counts."""
    clock = Clock()
    clock.advance(100.0)
    stats = RequestStats(clock)
    a, b = Named("a"), Named("b")
    stats.record(200, 9.0, 5.0, a)  # leaves the window below
    clock.advance(30.5)
    for i in range(1, 11):
        stats.record(200, i * 1.0, i * 0.1, a)
    stats.record(404, 0.01, 0.01, a)
    stats.record(503, 0.02, None, a)
    stats.record(200, 2.0, 0.5, b)
    clock.advance(31.0)

    recent = stats.upstream_recent("a")
    assert recent["requests"] == 12
    assert recent["requests_per_second"] == pytest.approx(12 / 60, abs=0.001)
    assert recent["responses_4xx"] == 1 and recent["responses_5xx"] == 1
    assert recent["ttft_p50"] == 0.5  # 6th of 11 TTFTs: 0.01, 0.1 ... 1.0
    assert recent["ttft_p95"] == 1.0
    assert recent["duration_p50"] == 4.0  # 6th of 12: 0.01, 0.02, 1.0 ... 10.0
    assert recent["duration_p95"] == 10.0
    assert stats.upstream_recent("b")["requests"] == 1
    assert stats.upstream_recent("nobody")["requests"] == 0


def test_upstream_windows_keep_bounded_samples_and_are_dropped_when_idle_or_removed() -> None:
    """Whatever the rate, an upstream keeps at most UPSTREAM_SAMPLES latency samples (its counts
    stay exact); a window with no request for a minute is dropped, and so is a removed upstream's."""
    clock = Clock()
    stats = RequestStats(clock)
    busy, idle = Named("busy"), Named("idle")
    for _ in range(5000):
        stats.record(200, 0.5, 0.1, busy)
        clock.advance(0.001)
    stats.record(200, 0.5, 0.1, idle)
    window = stats._upstreams["busy"]
    assert len(window.samples) == UPSTREAM_SAMPLES
    assert stats.upstream_recent("busy")["requests"] == 5000
    clock.advance(61.0)
    assert stats.prune() == 0
    stats.record(200, 0.5, 0.1, busy)
    stats.forget("busy")
    assert stats.prune() == 0


def test_a_removed_upstream_loses_its_window() -> None:
    """The observability service drops an upstream's request window when the pool removes it."""
    clock = Clock()
    pool, stats, _, service = started(clock)
    upstream = pool.add(Upstream("http://10.0.0.1:8080", clock=clock))
    stats.record(200, 0.5, 0.1, upstream)
    assert stats.upstream_recent(upstream.id)["requests"] == 1
    pool.remove(upstream.id)
    assert upstream.id not in stats._upstreams
    service.stopService()


# -- the event log ---------------------------------------------------------------


def test_event_log_records_adds_state_changes_drains_and_removals_not_every_probe() -> None:
    """The log has one entry per upstream added or removed, per health state change (with the
    reason) and per drain or undrain; probes that change nothing add nothing."""
    clock = Clock()
    clock.advance(50.0)
    pool, _, events, service = started(clock, max_buffered=5)
    upstream = pool.add(Upstream("http://10.0.0.1:8080", "gpu-1", clock=clock))
    for _ in range(3):
        clock.advance(1.0)
        pool.observe(upstream, SlotsSeen(4, 0, upstream.probe_mark()))
    pool.observe(upstream, LoadingSeen())
    pool.observe(upstream, FailureSeen("connection refused"))
    pool.drain(upstream.id, requested=True)
    pool.drain(upstream.id, requested=True)
    pool.undrain(upstream.id)
    pool.remove(upstream.id)

    assert [(e["kind"], e.get("previous"), e.get("state"), e.get("reason")) for e in events.entries] == [
        ("added", None, "unknown", None),
        ("state", "unknown", "healthy", None),
        ("state", "healthy", "loading", "Loading model"),
        ("state", "loading", "unreachable", "connection refused"),
        ("draining", None, None, None),
        ("undrained", None, None, None),
        ("removed", None, None, None),
    ]
    assert [e["seq"] for e in events.entries] == [1, 2, 3, 4, 5, 6, 7]
    assert {e["upstream"] for e in events.entries} == {"gpu-1"}
    assert events.entries[1]["time"] == 51.0
    assert [e["seq"] for e in events.since(5)] == [6, 7]
    service.stopService()


def test_event_log_is_a_bounded_ring_and_starts_from_the_upstreams_already_there() -> None:
    """Upstreams in the pool before the service starts are logged as added at start; the log
    keeps the last `size` entries while seq keeps counting."""
    clock = Clock()
    pool = make_pool(clock)
    for i in range(3):
        pool.add(Upstream(f"http://10.0.0.{i}:8080", clock=clock))
    events = FleetEvents(clock, size=4)
    events.watch(pool.upstreams.values())
    events.watch(pool.upstreams.values())  # once only
    assert [e["kind"] for e in events.entries] == ["added"] * 3
    pool.subscribe(events.pool_changed)
    for upstream in list(pool.upstreams.values()):
        pool.drain(upstream.id)
    assert len(events.entries) == 4
    assert events.seq == 6
    assert [e["seq"] for e in events.since(0)] == [3, 4, 5, 6]


def test_draining_since_is_when_the_drain_began() -> None:
    """The state says since when an upstream drains (null when it does not), and how long it has
    been in its health state."""
    clock = Clock()
    clock.advance(10.0)
    pool, stats, events, service = started(clock)
    upstream = pool.add(Upstream("http://10.0.0.1:8080", clock=clock))
    clock.advance(5.0)
    pool.observe(upstream, SlotsSeen(4, 0, upstream.probe_mark()))
    clock.advance(2.0)
    pool.drain(upstream.id)
    clock.advance(3.0)
    [described] = FleetView(pool, stats, clock, events=events).state()["upstreams"]
    assert described["draining_since"] == 17.0
    assert described["state_since"] == 15.0
    assert described["time_in_state"] == 5.0
    pool.undrain(upstream.id)
    assert events.draining_since(upstream.id) is None
    service.stopService()


# -- what the state adds for the dashboard ------------------------------------


def test_state_has_the_buffer_limit_not_served_counts_policy_and_token_flag() -> None:
    """The state carries the buffer's capacity and timeout ("2 / 30"), refused / timed-out /
    cancelled counts by reason, the policy's name and whether drains need a token."""
    clock = Clock()
    pool = make_pool(clock, max_buffered=30, timeout=12.0)
    stats = RequestStats(clock)
    stats.record(503, 0.0, outcome=("refused", "buffer_full"))
    stats.record(504, 12.0, outcome=("timed_out", "buffer"))
    stats.record(0, 1.0, outcome=("cancelled", "upstream"))
    state = FleetView(pool, stats, clock, token_required=True).state()
    assert state["buffer"] == {"capacity": 30, "timeout": 12.0}
    assert state["requests"]["outcomes"]["refused"]["buffer_full"] == 1
    assert state["requests"]["outcomes"]["timed_out"]["buffer"] == 1
    assert state["requests"]["outcomes"]["cancelled"]["upstream"] == 1
    assert state["policy"] == "slots"
    assert state["management"] == {"token_required": True}
    assert state["events"] == []


def test_state_has_the_cost_policys_figures_per_upstream() -> None:
    """With the cost policy each upstream carries its prefix hits, tokens saved and measured
    prompt / generation speeds; slot-blind policies give an empty object."""
    clock = Clock()
    pool = make_pool(clock, chooser=CostChooser(clock))
    upstream = pool.add(Upstream("http://10.0.0.1:8080", clock=clock))
    pool.observe(upstream, SlotsSeen(4, 0, upstream.probe_mark()))
    [described] = FleetView(pool, RequestStats(clock), clock).state()["upstreams"]
    routing = described["routing"]
    assert {"prefix_hits", "tokens_saved", "prompt_tokens_per_second", "generation_tokens_per_second"} <= set(routing)
    assert FleetView(make_pool(clock), RequestStats(clock), clock).state()["policy"] == "slots"
