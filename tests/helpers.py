"""Shared test helpers: fake upstreams and small builders."""

from __future__ import annotations

from twisted.internet.task import Clock

from paddler.routing.policies import MostIdleSlotsChooser
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import FailureSeen, SlotsSeen, Upstream


def healthy_upstream(
    url: str, total: int = 4, processing: int = 0, models: tuple[str, ...] = (), clock: Clock | None = None
) -> Upstream:
    """An upstream seen healthy with C{total} slots (by the test: no probe or report time is set)."""
    upstream = Upstream(url, clock=clock)
    upstream.record(SlotsSeen(total, processing, upstream.probe_mark(), source="test", models=models), 0.0)
    return upstream


def mark_healthy(upstream: Upstream, total: int | None = None) -> None:
    """Drive C{upstream} (outside a pool) to healthy, keeping or setting its slot count."""
    slots = upstream.slots_total if total is None else total
    upstream.record(SlotsSeen(slots, upstream.external_processing, upstream.probe_mark(), source="test"), 0.0)


def mark_unreachable(upstream: Upstream, reason: str = "connection refused") -> None:
    """Drive C{upstream} (outside a pool) to unreachable."""
    upstream.record(FailureSeen(reason, source="test"), 0.0)


def make_pool(clock: Clock, max_buffered: int = 30, timeout: float = 30.0, chooser=None) -> UpstreamPool:
    return UpstreamPool(clock, chooser or MostIdleSlotsChooser(), max_buffered, timeout)
