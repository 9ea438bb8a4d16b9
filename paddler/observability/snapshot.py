"""One snapshot of the fleet, JSON-ready: the state API, the state stream and the history
charts all read it (field list in docs/observability.md).

L{FleetView} is what the management port shows: L{FleetView.state} is the
whole state (``GET /api/v1/state``, the stream's first event);
L{FleetView.headline} and L{FleetView.rows} are the parts the stream sends
changes of.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from paddler import __version__
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import Upstream
from paddler.observability.events import FleetEvents
from paddler.observability.requests import RequestStats

#: Seconds of history the dashboard charts show.
HISTORY_WINDOW = 900.0
#: Seconds between two history samples.
HISTORY_INTERVAL = 3.0


def _age(at: float | None, now: float) -> float | None:
    return None if at is None else max(0.0, now - at)


def build_state(
    pool: UpstreamPool,
    stats: RequestStats,
    clock: IReactorTime,
    history: StateHistory | None = None,
) -> dict[str, Any]:
    """
    The whole fleet at C{clock.seconds()}, JSON-ready: totals, every upstream
    (sorted by name), request counters, last-minute figures and, when
    C{history} is given, its samples (L{FleetView.state} without an event log).
    """
    return FleetView(pool, stats, clock, history).state(history is not None)


#: Upstream fields the stream leaves out: the page computes them from the time stamps.
DERIVED_FIELDS = frozenset({"last_update_age", "last_probe_age", "last_report_age", "time_in_state"})


def _rounded_floats(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}


class FleetView:
    """
    What the state API, the stream and the dashboard show of the fleet: the
    pool, the request figures, the history (optional), the event log
    (optional) and whether mutating management calls need a token.
    """

    def __init__(
        self,
        pool: UpstreamPool,
        stats: RequestStats,
        clock: IReactorTime,
        history: StateHistory | None = None,
        events: FleetEvents | None = None,
        token_required: bool = False,
    ) -> None:
        self.pool = pool
        self.stats = stats
        self.clock = clock
        self.history = history
        self.events = events
        self.token_required = token_required

    def headline(self, with_recent: bool = True) -> dict[str, Any]:
        """
        The fleet-wide figures: small, sent on every push of the stream.
        C{with_recent}: with the last minute's rate and percentiles (they sort
        the minute's requests, so the stream sends them only once a second).
        """
        pool, stats = self.pool, self.stats
        headline = {
            "time": self.clock.seconds(),
            "policy": getattr(pool.chooser, "name", ""),
            "buffer": {"capacity": pool.max_buffered, "timeout": pool.buffer_timeout},
            "totals": pool.totals(),
            "requests": {
                "total": stats.requests_total,
                "by_status": dict(sorted(stats.by_status.items())),
                "outcomes": {kind: dict(counts) for kind, counts in stats.outcomes.items()},
            },
        }
        if with_recent:
            headline["recent"] = stats.recent()
        return headline

    def row(self, upstream: Upstream, now: float) -> dict[str, Any]:
        """One upstream without the ages (L{DERIVED_FIELDS}): what the stream compares."""
        row = upstream.describe(now)
        for field in DERIVED_FIELDS:
            row.pop(field, None)
        row["last_update_at"] = upstream.last_update_at
        row["last_probe_at"] = upstream.last_probe_at
        row["last_report_at"] = upstream.last_report_at
        row["state_since"] = upstream.state_since
        row["draining_since"] = None if self.events is None else self.events.draining_since(upstream.id)
        row["removal_pending"] = self.pool.removal_pending(upstream.id)
        row["recent"] = self.stats.upstream_recent(upstream.id)
        row["routing"] = _rounded_floats(self.pool.chooser.describe(upstream))
        return row

    def rows(self) -> list[dict[str, Any]]:
        """Every upstream (sorted by name, then URL) as L{row} gives it."""
        now = self.clock.seconds()
        self.stats.prune()
        return [self.row(u, now) for u in sorted(self.pool.upstreams.values(), key=lambda u: (u.name, u.url))]

    def upstream(self, upstream: Upstream, now: float) -> dict[str, Any]:
        """One upstream with every field: L{row} plus the ages."""
        described = self.row(upstream, now)
        described["last_update_age"] = _age(upstream.last_update_at, now)
        described["last_probe_age"] = _age(upstream.last_probe_at, now)
        described["last_report_age"] = _age(upstream.last_report_at, now)
        described["time_in_state"] = max(0.0, now - upstream.state_since)
        return described

    def state(self, with_history: bool = True) -> dict[str, Any]:
        """
        The whole fleet, JSON-ready: L{headline}, every upstream (sorted by
        name), the event log and, when C{with_history}, the history samples.
        """
        state: dict[str, Any] = {"version": __version__}
        state.update(self.headline())
        now = state["time"]
        state["management"] = {"token_required": self.token_required}
        self.stats.prune()
        state["upstreams"] = [
            self.upstream(u, now) for u in sorted(self.pool.upstreams.values(), key=lambda u: (u.name, u.url))
        ]
        state["events"] = [] if self.events is None else self.events.describe()
        if with_history and self.history is not None:
            state["history"] = self.history.describe()
        return state


class StateHistory:
    """
    A ring of fleet samples (the last C{window} seconds, one every
    C{interval}), so the dashboard charts have data as soon as they load.
    """

    def __init__(self, interval: float = HISTORY_INTERVAL, window: float = HISTORY_WINDOW) -> None:
        self.interval = interval
        self.window = window
        self.samples: deque[dict[str, Any]] = deque(maxlen=max(1, int(window / interval)))
        self._previous: tuple[float, int] | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call C{listener(sample)} for every new sample; return an unsubscriber."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def take(self, pool: UpstreamPool, stats: RequestStats, now: float) -> dict[str, Any]:
        """Add one sample of the fleet at C{now} and tell the listeners."""
        totals = pool.totals()
        recent = stats.recent()
        rate: float | None = None
        if self._previous is not None and now > self._previous[0]:
            rate = (stats.requests_total - self._previous[1]) / (now - self._previous[0])
        self._previous = (now, stats.requests_total)
        sample = {
            "time": now,
            "slots_processing": totals["slots_processing"],
            "slots_total": totals["slots_total"],
            "requests_buffered": totals["requests_buffered"],
            "requests_per_second": rate,
            "ttft_p95": recent["ttft_p95"],
        }
        self.samples.append(sample)
        for listener in list(self._listeners):
            listener(sample)
        return sample

    def describe(self) -> dict[str, Any]:
        return {"interval": self.interval, "window": self.window, "samples": list(self.samples)}
