"""One snapshot of the fleet, JSON-ready: the state API, the state stream and the history
charts all read it (field list in docs/observability.md)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from paddler import __version__
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import Upstream
from paddler.observability.requests import RequestStats

#: Seconds of history the dashboard charts show.
HISTORY_WINDOW = 900.0
#: Seconds between two history samples.
HISTORY_INTERVAL = 3.0


def _age(at: float | None, now: float) -> float | None:
    return None if at is None else max(0.0, now - at)


def describe_upstream(upstream: Upstream, now: float) -> dict[str, Any]:
    """L{Upstream.describe} plus the ages of the last probe and the last agent report."""
    description = upstream.describe(now)
    description["last_probe_age"] = _age(upstream.last_probe_at, now)
    description["last_report_age"] = _age(upstream.last_report_at, now)
    return description


def build_state(
    pool: UpstreamPool,
    stats: RequestStats,
    clock: IReactorTime,
    history: StateHistory | None = None,
) -> dict[str, Any]:
    """
    The whole fleet at C{clock.seconds()}, JSON-ready: totals, every upstream
    (sorted by name), request counters, last-minute figures and, when
    C{history} is given, its samples.
    """
    now = clock.seconds()
    state: dict[str, Any] = {
        "version": __version__,
        "time": now,
        "totals": pool.totals(),
        "requests": {
            "total": stats.requests_total,
            "by_status": dict(sorted(stats.by_status.items())),
        },
        "recent": stats.recent(),
        "upstreams": [
            describe_upstream(u, now)
            for u in sorted(pool.upstreams.values(), key=lambda u: (u.name, u.url))
        ],
    }
    if history is not None:
        state["history"] = history.describe()
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
