"""Policies that pick an upstream for a slot-taking request (``--policy``).

- ``slots``: the most idle slots, ties to the least recently chosen;
- ``cost``: the lowest estimated time to first token: wait for a slot +
  the prompt tokens its cache does not hold ÷ its measured prompt speed
  (L{paddler.routing.router.Router}); explicit conversations stay on their
  upstream while it is healthy and not overloaded;
- ``round-robin`` and ``least-connections``: slot-blind, for comparison.

Every policy sends a request only where a slot is free; none of them lets
an upstream run more requests than it has slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from paddler.fleet.upstream import Upstream
from paddler.interfaces import ISlotChooser
from paddler.routing.router import RoutedRequest, Router, UpstreamView


class _Policy:
    """What a policy that learns nothing from requests does with them: nothing."""

    name = ""

    def prepare(self, body: Any, path: bytes, headers: Any) -> Any:
        return None

    def dispatched(self, upstream: Upstream, demand: Any) -> None:
        pass

    def finished(self, upstream: Upstream, demand: Any, timings: Any) -> None:
        pass

    def forget(self, upstream: Upstream) -> None:
        pass

    def describe(self, upstream: Upstream) -> dict[str, Any]:
        return {}

    def rank(self, upstreams: Sequence[Upstream], model: str | None, demand: Any = None) -> list[Upstream]:
        return sorted(upstreams, key=self._order)

    def _order(self, upstream: Upstream) -> Any:
        return upstream.last_chosen


@implementer(ISlotChooser)
class MostIdleSlotsChooser(_Policy):
    """
    The upstream with the most idle slots; ties go to the one chosen least
    recently. No idle slot anywhere means no choice: the request waits in
    the buffer instead of queueing blind inside one llama.cpp server.
    """

    name = "slots"

    def choose(self, upstreams: Sequence[Upstream], model: str | None, demand: Any = None) -> Upstream | None:
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

    def _order(self, upstream: Upstream) -> Any:
        return (-upstream.slots_idle, upstream.last_chosen)


@implementer(ISlotChooser)
class RoundRobinChooser(_Policy):
    """Slot-blind round robin, as nginx does it; for comparison in benchmarks."""

    name = "round-robin"

    def choose(self, upstreams: Sequence[Upstream], model: str | None, demand: Any = None) -> Upstream | None:
        if not upstreams:
            return None
        return min(upstreams, key=lambda u: u.last_chosen)


@implementer(ISlotChooser)
class LeastConnectionsChooser(_Policy):
    """Slot-blind least connections, as HAProxy ``leastconn``; for comparison."""

    name = "least-connections"

    def choose(self, upstreams: Sequence[Upstream], model: str | None, demand: Any = None) -> Upstream | None:
        if not upstreams:
            return None
        return min(upstreams, key=self._order)

    def _order(self, upstream: Upstream) -> Any:
        return (upstream.in_flight, upstream.last_chosen)


class Demand:
    """A request as the ``cost`` policy sees it: its prompt, and how long it may hold out for a warm upstream.

    @ivar recheck_at: when the pool should ask again for a request holding
        out for a busy upstream whose cache suits it (C{None}: not holding).
    """

    __slots__ = ("routed", "hold_until", "recheck_at")

    def __init__(self, routed: RoutedRequest) -> None:
        self.routed = routed
        self.hold_until: float | None = None
        self.recheck_at: float | None = None


@implementer(ISlotChooser)
class CostChooser(_Policy):
    """
    The lowest estimated time to first token (L{paddler.routing.cost}): a
    free slot on an upstream whose prompt cache holds more of the request,
    or whose prompt speed is higher, wins. A request may hold out for a busy
    upstream only while its expected wait is below the prefill it saves, and
    never longer than C{max_wait} seconds: then it takes the best free one.
    """

    name = "cost"

    def __init__(self, clock: IReactorTime, router: Router | None = None) -> None:
        self.clock = clock
        self.router = router if router is not None else Router(clock)

    def prepare(self, body: Any, path: bytes, headers: Any) -> Demand:
        return Demand(self.router.prepare(body, path, headers))

    def choose(self, upstreams: Sequence[Upstream], model: str | None, demand: Any = None) -> Upstream | None:
        if not isinstance(demand, Demand):
            return MOST_IDLE.choose(upstreams, model)
        by_id: dict[Any, Upstream] = {u.id: u for u in upstreams}
        views = [UpstreamView(u.id, u.slots_idle, u.slots_total, u.in_flight) for u in upstreams]
        decision = self.router.rank(demand.routed, views)
        now = self.clock.seconds()
        if decision.wait_for is not None:
            if demand.hold_until is None:
                demand.hold_until = now + decision.wait_up_to
            if now < demand.hold_until:
                demand.recheck_at = demand.hold_until
                return None
        demand.recheck_at = None
        best = decision.best
        return by_id[best.id] if best is not None else None

    def rank(self, upstreams: Sequence[Upstream], model: str | None, demand: Any = None) -> list[Upstream]:
        if not isinstance(demand, Demand):
            return MOST_IDLE.rank(upstreams, model)
        by_id: dict[Any, Upstream] = {u.id: u for u in upstreams}
        views = [UpstreamView(u.id, u.slots_idle, u.slots_total, u.in_flight) for u in upstreams]
        return [by_id[key] for key in self.router.rank(demand.routed, views).order]

    def dispatched(self, upstream: Upstream, demand: Any) -> None:
        if isinstance(demand, Demand):
            demand.routed = self.router.dispatched(demand.routed, upstream.id)

    def finished(self, upstream: Upstream, demand: Any, timings: Any) -> None:
        if isinstance(demand, Demand):
            self.router.finished(demand.routed, upstream.id, timings)

    def forget(self, upstream: Upstream) -> None:
        self.router.forget(upstream.id)

    def describe(self, upstream: Upstream) -> dict[str, Any]:
        return self.router.stats(upstream.id)


MOST_IDLE = MostIdleSlotsChooser()

#: The policies by name; each is built with the pool's clock.
CHOOSERS: dict[str, Any] = {
    "slots": lambda clock: MostIdleSlotsChooser(),
    "cost": lambda clock: CostChooser(clock),
    "round-robin": lambda clock: RoundRobinChooser(),
    "least-connections": lambda clock: LeastConnectionsChooser(),
}
