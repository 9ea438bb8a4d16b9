"""ProbeService's one timer: probes spread over the interval, idle quiet upstreams probed less often."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from paddler.fleet.probe import ProbeService
from paddler.fleet.upstream import FailureSeen, SlotsSeen, Upstream
from paddler.interfaces import IUpstreamProber

from .helpers import make_pool


@implementer(IUpstreamProber)
class AnsweringProber:
    """Records when each upstream is probed; after a first reading (news), says 'nothing new' (False)
    unless told otherwise."""

    def __init__(self, clock: Clock, pool: Any) -> None:
        self.clock = clock
        self.pool = pool
        self.times: dict[str, list[float]] = {}
        self.changed = False
        self.healthy = True

    def probe(self, upstream: Upstream) -> Any:
        self.times.setdefault(upstream.name, []).append(self.clock.seconds())
        if self.healthy:
            self.pool.observe(upstream, SlotsSeen(4, 0, upstream.probe_mark(), models=("m",)))
        else:
            self.pool.observe(upstream, FailureSeen("refused"))
        return succeed(self.changed or len(self.times[upstream.name]) == 1)


def setup(n: int = 1, interval: float = 1.0) -> tuple[Clock, Any, AnsweringProber, ProbeService, list[Upstream]]:
    clock = Clock()
    pool = make_pool(clock)
    prober = AnsweringProber(clock, pool)
    upstreams = [pool.add(Upstream(f"http://u{i}:1", name=f"u{i}", clock=clock)) for i in range(n)]
    service = ProbeService(pool, prober, clock, interval=interval)
    service.startService()
    return clock, pool, prober, service, upstreams


def advance(clock: Clock, seconds: float, step: float = 0.01) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


def test_many_upstreams_are_probed_spread_over_the_interval():
    """200 upstreams added at once: after the first 32, probes are spread over the interval, never more
    than a small share of them in any tenth of it."""
    clock, _, prober, service, _ = setup(200)
    assert sum(len(t) for t in prober.times.values()) == ProbeService.BURST
    advance(clock, 3.0)
    tenths = [0] * 10
    for times in prober.times.values():
        for t in times:
            if 1.0 <= t < 2.0:
                tenths[int((t - 1.0) * 10)] += 1
    assert sum(tenths) >= 195 and max(tenths) <= 30, tenths
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_an_idle_unchanged_upstream_is_probed_every_third_interval():
    """Quiet (two unchanged readings), healthy and idle: every third interval."""
    clock, _, prober, service, _ = setup()
    advance(clock, 10.0)
    times = prober.times["u0"]
    gaps = [round(b - a, 1) for a, b in zip(times, times[1:])]
    assert gaps[:2] == [1.0, 1.0] and set(gaps[2:]) == {3.0}, gaps
    assert service.probes_skipped > 0
    service.stopService()


def test_a_request_brings_the_upstream_back_to_every_interval():
    """A lease taken on a quiet upstream: its next probe comes within one interval."""
    clock, pool, prober, service, [upstream] = setup()
    advance(clock, 6.0)
    before = len(prober.times["u0"])
    lease = pool.acquire("m").result
    advance(clock, 1.0)
    assert len(prober.times["u0"]) == before + 1
    advance(clock, 1.0)  # the lease is still held: every interval
    assert len(prober.times["u0"]) == before + 2
    lease.release()
    service.stopService()


def test_a_waiting_request_keeps_every_upstream_at_every_interval():
    """Requests waiting for a slot: every upstream's picture matters, none is probed less often."""
    clock, pool, prober, service, [upstream] = setup()
    advance(clock, 6.0)
    leases = [pool.acquire("m").result for _ in range(4)]
    waiting = pool.acquire("m")
    waiting.addErrback(lambda _: None)
    count = len(prober.times["u0"])
    advance(clock, 3.0)
    assert len(prober.times["u0"]) == count + 3
    waiting.cancel()
    for lease in leases:
        lease.release()
    service.stopService()


def test_a_changing_answer_keeps_the_upstream_at_every_interval():
    """An upstream whose answers change (other clients use it) is probed every interval."""
    clock, _, prober, service, _ = setup()
    prober.changed = True
    advance(clock, 6.0)
    times = prober.times["u0"]
    assert {round(b - a, 1) for a, b in zip(times, times[1:])} == {1.0}
    service.stopService()


def test_an_unhealthy_upstream_is_probed_every_interval():
    """A failing upstream is never probed less often, however alike its failures."""
    clock, _, prober, service, _ = setup()
    prober.healthy = False
    advance(clock, 6.0)
    times = prober.times["u0"]
    assert {round(b - a, 1) for a, b in zip(times, times[1:])} == {1.0}
    service.stopService()


@pytest.mark.parametrize("interval", [0.5, 2.0])
def test_the_interval_can_change_while_running(interval):
    """set_interval applies from each upstream's next probe on."""
    clock, _, prober, service, _ = setup()
    prober.changed = True
    service.set_interval(interval)
    advance(clock, 1.0)
    start = len(prober.times["u0"])
    advance(clock, 4 * interval + 0.05)
    assert len(prober.times["u0"]) - start == 4
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_a_router_with_a_live_event_stream_is_polled_every_third_interval_while_idle():
    """Two routers: the one whose /models/sse is followed (events_live) and that runs nothing of
    ours is probed every third interval (a check: its status changes come as events); the other
    every interval; a request held on a model of the followed router brings it back to every
    interval, and so does losing its stream."""
    from paddler.fleet.routers import new_child

    clock, pool, prober, service, [live, polled] = setup(2)
    for upstream in (live, polled):
        upstream.role = "router"
    live.events_live = True
    child = pool.add(new_child(live, "alpha"))
    child.model_state = "loaded"
    pool.observe(child, SlotsSeen(2, 0, child.probe_mark(), models=("alpha",)))
    advance(clock, 10.0)
    gaps = {name: [round(b - a, 1) for a, b in zip(t, t[1:])] for name, t in prober.times.items()}
    assert set(gaps["u1"][1:]) == {1.0}, gaps
    assert set(gaps["u0"][1:]) == {3.0}, gaps
    lease = pool.acquire("alpha").result
    assert lease.upstream is child
    before = len(prober.times["u0"])
    advance(clock, 2.0)
    assert len(prober.times["u0"]) == before + 2
    lease.release()
    live.events_live = False
    advance(clock, 3.0)
    assert len(prober.times["u0"]) == before + 5
    service.stopService()
