"""Shared test helpers: fake upstreams and small builders."""

from __future__ import annotations

from twisted.internet.task import Clock

from paddler.routing.policies import MostIdleSlotsChooser
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import Upstream, UpstreamState


def healthy_upstream(
    url: str, total: int = 4, processing: int = 0, models: tuple[str, ...] = (), clock: Clock | None = None
) -> Upstream:
    """An upstream that a probe has just seen healthy with C{total} slots."""
    upstream = Upstream(url, clock=clock)
    upstream.set_state(UpstreamState.HEALTHY)
    upstream.apply_slots(total, processing, upstream.probe_mark())
    upstream.set_models(models)
    return upstream


def make_pool(clock: Clock, max_buffered: int = 30, timeout: float = 30.0, chooser=None) -> UpstreamPool:
    return UpstreamPool(clock, chooser or MostIdleSlotsChooser(), max_buffered, timeout)
