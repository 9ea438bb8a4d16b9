"""The fleet's event log: upstreams added and removed, health state changes, drains.

A bounded ring fed by the pool's listeners (L{FleetEvents.pool_changed}); the
state API, the stream and the dashboard read it. The pool says "changed" on
every probe and lease, so the log keeps each upstream's last seen health state
and drain flag and records an entry only when one of them moved.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from paddler.fleet.upstream import Upstream, UpstreamState

#: Entries the log keeps (the oldest go first).
EVENT_LOG_SIZE = 200


class FleetEvents:
    """
    The last C{size} things that happened to the fleet, oldest first. Each
    entry is JSON-ready: C{seq} (1, 2, ...: increases by one per entry),
    C{time}, C{kind} (C{added}, C{removed}, C{state}, C{draining},
    C{undrained}), C{upstream} (its name), C{id}, and for C{state} the
    C{previous} and new C{state} and the C{reason} (its last error).
    """

    def __init__(self, clock: IReactorTime, size: int = EVENT_LOG_SIZE) -> None:
        self.clock = clock
        self.entries: deque[dict[str, Any]] = deque(maxlen=size)
        self.seq = 0
        # upstream id -> (health state, draining) as last seen, and since when it drains
        self._seen: dict[str, tuple[UpstreamState, bool]] = {}
        self._draining_since: dict[str, float] = {}

    def watch(self, upstreams: Iterable[Upstream]) -> None:
        """Start from the upstreams already in the pool: each is logged as added."""
        for upstream in upstreams:
            if upstream.id not in self._seen:
                self.pool_changed("added", upstream)

    def pool_changed(self, event: str, upstream: Upstream | None = None) -> None:
        """A pool listener: record what moved (C{event} is C{added}, C{removed} or C{changed})."""
        if upstream is None:
            return  # the buffer changed, not an upstream
        if event == "removed":
            if self._seen.pop(upstream.id, None) is not None:
                self._draining_since.pop(upstream.id, None)
                self._add("removed", upstream)
            return
        previous = self._seen.get(upstream.id)
        now = (upstream.state, upstream.draining)
        if previous == now:
            return
        self._seen[upstream.id] = now
        if previous is None:
            self._add("added", upstream, state=upstream.state.value)
            if upstream.draining:
                self._draining_since[upstream.id] = self.clock.seconds()
            return
        if previous[0] is not upstream.state:
            reason = None if upstream.state is UpstreamState.HEALTHY else upstream.last_error
            self._add("state", upstream, previous=previous[0].value, state=upstream.state.value, reason=reason)
        if previous[1] != upstream.draining:
            if upstream.draining:
                self._draining_since[upstream.id] = self.clock.seconds()
            else:
                self._draining_since.pop(upstream.id, None)
            self._add("draining" if upstream.draining else "undrained", upstream)

    def draining_since(self, upstream_id: str) -> float | None:
        """When the upstream started draining (as this log saw it), or C{None}."""
        return self._draining_since.get(upstream_id)

    def record(self, kind: str, upstream: Upstream, **fields: Any) -> None:
        """Add an entry of C{kind} about C{upstream} with C{fields} (e.g. C{model_load} from placement)."""
        self._add(kind, upstream, **fields)

    def _add(self, kind: str, upstream: Upstream, **fields: Any) -> None:
        self.seq += 1
        entry = {"seq": self.seq, "time": self.clock.seconds(), "kind": kind, "upstream": upstream.name,
                 "id": upstream.id}
        entry.update(fields)
        self.entries.append(entry)

    def since(self, seq: int) -> list[dict[str, Any]]:
        """The entries after number C{seq} that the ring still holds."""
        if seq >= self.seq:
            return []
        return [e for e in self.entries if e["seq"] > seq]

    def describe(self) -> list[dict[str, Any]]:
        return list(self.entries)
