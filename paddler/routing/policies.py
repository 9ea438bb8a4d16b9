"""Policies that pick an upstream for a slot-taking request (``--policy``).

- ``cache-aware`` (the default): ``cost``, and for a prompt no upstream
  holds a quarter of, the request's expected generation time on each
  upstream too, with a short bounded hold-out for a much faster generator
  (L{paddler.routing.cost}; C{Router(weigh_output=True)});
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

import itertools
import weakref
from collections.abc import Hashable, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from paddler.fleet.upstream import Upstream
from paddler.interfaces import ISlotChooser
from paddler.routing.cost import Decision
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
    @ivar holding_for: the upstream it holds out for, or None.
    @ivar seq: arrival order (requests holding for the same upstream queue behind older ones).
    """

    __slots__ = ("routed", "hold_until", "recheck_at", "holding_for", "seq", "first_asked", "decision", "__weakref__")

    def __init__(self, routed: RoutedRequest, seq: int = 0) -> None:
        self.routed = routed
        self.hold_until: float | None = None
        self.recheck_at: float | None = None
        self.holding_for: Hashable | None = None
        self.seq = seq
        #: When the policy was first asked for it (None: not yet).
        self.first_asked: float | None = None
        #: The last decision made for it (for the debug log).
        self.decision: Decision | None = None


class _Estimates:
    """A decision's figures as one log field, rendered only when a debug line is written."""

    __slots__ = ("decision",)

    def __init__(self, decision: Decision | None) -> None:
        self.decision = decision

    def __str__(self) -> str:
        if self.decision is None:
            return "-"
        return " ".join(
            f"[{e.id} idle {e.candidate.slots_idle}/{e.candidate.slots_total} ours {e.candidate.in_flight} cached {e.candidate.cached_tokens} "
            f"wait {e.wait:.3f} prefill {e.prefill:.3f} cost {e.cost:.3f}]"
            for e in self.decision.ranked
        )


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
    log = Logger()

    def __init__(self, clock: IReactorTime, router: Router | None = None, name: str = "cost") -> None:
        self.name = name
        self.clock = clock
        self.router = router if router is not None else Router(clock)
        self._seq = itertools.count(1)
        #: Requests holding out, by the upstream they hold for (weak: a request
        #: whose client left is dropped with it).
        self._holding: dict[Hashable, weakref.WeakSet[Demand]] = {}
        #: Requests that were refused a slot and are not dispatched yet (weak, as above).
        self._waiting: weakref.WeakSet[Demand] = weakref.WeakSet()

    def prepare(self, body: Any, path: bytes, headers: Any) -> Demand:
        return Demand(self.router.prepare(body, path, headers), next(self._seq))

    def _ahead(self, upstream_id: Hashable, demand: Demand) -> int:
        """Older requests holding out for this upstream: they take its next slots first."""
        holders = self._holding.get(upstream_id)
        if not holders:
            return 0
        return sum(1 for other in holders if other.seq < demand.seq and other.holding_for == upstream_id)

    def _hold(self, demand: Demand, upstream_id: Hashable | None) -> None:
        previous = demand.holding_for
        if previous == upstream_id:
            return
        if previous is not None:
            holders = self._holding.get(previous)
            if holders is not None:
                holders.discard(demand)
                if not holders:
                    del self._holding[previous]
        demand.holding_for = upstream_id
        if upstream_id is not None:
            self._holding.setdefault(upstream_id, weakref.WeakSet()).add(demand)

    def choose(self, upstreams: Sequence[Upstream], model: str | None, demand: Any = None) -> Upstream | None:
        if not isinstance(demand, Demand):
            return MOST_IDLE.choose(upstreams, model)
        by_id: dict[Any, Upstream] = {u.id: u for u in upstreams}
        views = [
            UpstreamView(u.id, u.slots_idle, u.slots_total, u.in_flight, self._ahead(u.id, demand))
            for u in upstreams
        ]
        waiting = len(self._waiting) - (demand in self._waiting)
        decision = self.router.rank(demand.routed, views, waiting)
        now = self.clock.seconds()
        if demand.first_asked is None:
            demand.first_asked = now
        demand.decision = decision
        if decision.wait_for is not None:
            if demand.hold_until is None:
                demand.hold_until = now + decision.wait_up_to
            if now < demand.hold_until:
                if demand.holding_for != decision.wait_for:
                    self.log.debug(
                        "route {seq} ({tokens} tokens) holds for {upstream} until +{until:.3f}s: {estimates}",
                        seq=demand.seq, tokens=demand.routed.info.tokens, upstream=decision.wait_for,
                        until=demand.hold_until - demand.first_asked, estimates=_Estimates(decision),
                    )
                demand.recheck_at = demand.hold_until
                self._hold(demand, decision.wait_for)
                self._waiting.add(demand)
                return None
        demand.recheck_at = None
        self._hold(demand, None)
        best = decision.best
        if best is None:
            self._waiting.add(demand)
            return None
        return by_id[best.id]

    def rank(self, upstreams: Sequence[Upstream], model: str | None, demand: Any = None) -> list[Upstream]:
        if not isinstance(demand, Demand):
            return MOST_IDLE.rank(upstreams, model)
        by_id: dict[Any, Upstream] = {u.id: u for u in upstreams}
        views = [UpstreamView(u.id, u.slots_idle, u.slots_total, u.in_flight) for u in upstreams]
        return [by_id[key] for key in self.router.rank(demand.routed, views).order]

    def dispatched(self, upstream: Upstream, demand: Any) -> None:
        if isinstance(demand, Demand):
            self._hold(demand, None)
            self._waiting.discard(demand)
            demand.routed = self.router.dispatched(demand.routed, upstream.id)
            now = self.clock.seconds()
            self.log.debug(
                "route {seq} ({tokens} tokens) -> {upstream} after {waited:.3f}s, predicted cached {predicted} "
                "blocks: {estimates}",
                seq=demand.seq, tokens=demand.routed.info.tokens, upstream=upstream.id,
                waited=now - (demand.first_asked if demand.first_asked is not None else now),
                predicted=demand.routed.predicted_blocks(upstream.id), estimates=_Estimates(demand.decision),
            )
            demand.first_asked = now  # from here: time in the slot

    def finished(self, upstream: Upstream, demand: Any, timings: Any) -> None:
        if isinstance(demand, Demand):
            self.router.finished(demand.routed, upstream.id, timings)
            if isinstance(timings, dict):
                now = self.clock.seconds()
                self.log.debug(
                    "route {seq} done on {upstream} after {held:.3f}s: cache_n {cache_n} prompt_n {prompt_n} "
                    "prompt_ms {prompt_ms} predicted_n {predicted_n} predicted_ms {predicted_ms}",
                    seq=demand.seq, upstream=upstream.id,
                    held=now - (demand.first_asked if demand.first_asked is not None else now),
                    cache_n=timings.get("cache_n"), prompt_n=timings.get("prompt_n"),
                    prompt_ms=timings.get("prompt_ms"), predicted_n=timings.get("predicted_n"),
                    predicted_ms=timings.get("predicted_ms"),
                )

    def forget(self, upstream: Upstream) -> None:
        self.router.forget(upstream.id)

    def describe(self, upstream: Upstream) -> dict[str, Any]:
        return self.router.stats(upstream.id)


MOST_IDLE = MostIdleSlotsChooser()

#: The policies by name; each is built with the pool's clock.
CHOOSERS: dict[str, Any] = {
    "slots": lambda clock: MostIdleSlotsChooser(),
    "cache-aware": lambda clock: CostChooser(clock, Router(clock, weigh_output=True), name="cache-aware"),
    "cost": lambda clock: CostChooser(clock),
    "round-robin": lambda clock: RoundRobinChooser(),
    "least-connections": lambda clock: LeastConnectionsChooser(),
}
