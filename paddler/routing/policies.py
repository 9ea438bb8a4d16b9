"""Policies that pick an upstream for a slot-taking request (``--policy``)."""

from __future__ import annotations

from collections.abc import Sequence

from zope.interface import implementer

from paddler.interfaces import ISlotChooser
from paddler.fleet.upstream import Upstream


@implementer(ISlotChooser)
class MostIdleSlotsChooser:
    """
    The default: the upstream with the most idle slots; ties go to the one
    chosen least recently. No idle slot anywhere means no choice: the request
    waits in the buffer instead of queueing blind inside one llama.cpp server.
    """

    name = "slots"

    def choose(self, upstreams: Sequence[Upstream], model: str | None) -> Upstream | None:
        best: Upstream | None = None
        best_key = (0, 0)
        for upstream in upstreams:
            idle = upstream.slots_idle
            if idle <= 0:
                continue
            key = (idle, -upstream.last_chosen)
            if best is None or key > best_key:
                best, best_key = upstream, key
        return best


@implementer(ISlotChooser)
class RoundRobinChooser:
    """Slot-blind round robin, as nginx does it; for comparison in benchmarks."""

    name = "round-robin"

    def choose(self, upstreams: Sequence[Upstream], model: str | None) -> Upstream | None:
        if not upstreams:
            return None
        return min(upstreams, key=lambda u: u.last_chosen)


@implementer(ISlotChooser)
class LeastConnectionsChooser:
    """Slot-blind least connections, as HAProxy ``leastconn``; for comparison."""

    name = "least-connections"

    def choose(self, upstreams: Sequence[Upstream], model: str | None) -> Upstream | None:
        if not upstreams:
            return None
        return min(upstreams, key=lambda u: (u.in_flight, u.last_chosen))


CHOOSERS: dict[str, type] = {
    chooser.name: chooser
    for chooser in (MostIdleSlotsChooser, RoundRobinChooser, LeastConnectionsChooser)
}
