"""Request figures: counters by status class and a sliding window of latencies."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of already sorted values, or C{None} when empty."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values), math.ceil(fraction * len(sorted_values))) - 1)
    return sorted_values[rank]


def status_class(status: int) -> str:
    return f"{status // 100}xx"


#: Why requests were not served, by kind: the labels of the refused / timed-out / cancelled counters.
OUTCOMES: dict[str, tuple[str, ...]] = {
    "refused": (
        "buffer_full", "buffering_disabled", "no_upstream", "shutting_down", "connection_limit", "body_memory",
    ),
    "timed_out": ("buffer", "upstream_headers", "upstream_idle", "client_head", "client_body"),
    "cancelled": ("buffered", "upstream"),
}


class RequestStats:
    """
    What the proxy saw: totals since start (by status class, per upstream) and
    the requests that finished in the last C{window} seconds, for rates and
    time-to-first-byte / duration percentiles.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, window: float = 60.0, max_samples: int = 100_000) -> None:
        self._clock = clock
        self.window = window
        self.requests_total = 0
        self.by_status: dict[str, int] = {}
        self.outcomes: dict[str, dict[str, int]] = {
            kind: dict.fromkeys(reasons, 0) for kind, reasons in OUTCOMES.items()
        }
        self._samples: deque[tuple[float, float | None, float]] = deque(maxlen=max_samples)
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call C{listener(record)} for every finished request; return an unsubscriber."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def record(
        self,
        status: int,
        duration: float,
        ttfb: float | None = None,
        upstream: Any = None,
        path: str = "",
        outcome: tuple[str, str] | None = None,
    ) -> None:
        """
        Count one finished request (C{status} 0 means the client left).
        C{outcome} says why one was not served: C{("refused", "buffer_full")},
        C{("timed_out", "buffer")}, C{("cancelled", "upstream")}... (L{OUTCOMES}).
        """
        now = self._clock.seconds()
        self.requests_total += 1
        key = status_class(status) if status else "cancelled"
        self.by_status[key] = self.by_status.get(key, 0) + 1
        if outcome is not None:
            kind, reason = outcome
            counts = self.outcomes[kind]
            counts[reason] = counts.get(reason, 0) + 1
        self._samples.append((now, ttfb, duration))
        if upstream is not None and status:  # a client leaving is nobody's failure
            if 200 <= status < 500:
                upstream.requests_served += 1
            else:
                upstream.requests_failed += 1
        record = {
            "status": status,
            "duration": duration,
            "ttfb": ttfb,
            "upstream": None if upstream is None else upstream.name,
            "path": path,
            "outcome": outcome,
        }
        for listener in list(self._listeners):
            try:
                listener(record)
            except Exception:
                self.log.failure("request stats listener failed")

    def _recent(self) -> list[tuple[float, float | None, float]]:
        horizon = self._clock.seconds() - self.window
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        return list(self._samples)

    def recent(self) -> dict[str, Any]:
        """Rates and percentiles over the last C{window} seconds."""
        samples = self._recent()
        ttfbs = sorted(s[1] for s in samples if s[1] is not None)
        durations = sorted(s[2] for s in samples)
        return {
            "window_seconds": self.window,
            "requests": len(samples),
            "requests_per_second": len(samples) / self.window,
            "ttft_p50": percentile(ttfbs, 0.50),
            "ttft_p95": percentile(ttfbs, 0.95),
            "ttft_p99": percentile(ttfbs, 0.99),
            "duration_p50": percentile(durations, 0.50),
            "duration_p95": percentile(durations, 0.95),
            "duration_p99": percentile(durations, 0.99),
        }
