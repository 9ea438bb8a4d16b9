"""Request figures: counters by status class, a sliding window of latencies, and the same
window per upstream (rate, TTFT, duration, 4xx/5xx) with bounded memory."""

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
        "buffer_full", "buffering_disabled", "no_upstream", "shutting_down", "connection_limit",
        "client_connection_limit", "body_memory",
    ),
    "timed_out": ("buffer", "upstream_headers", "upstream_idle", "client_head", "client_body"),
    "cancelled": ("buffered", "upstream"),
}


#: Latency samples kept per upstream for its percentiles (the most recent ones in the window).
UPSTREAM_SAMPLES = 128


class UpstreamWindow:
    """
    One upstream's requests of the last C{window} seconds: exact counts in
    one-second buckets (at most C{window} + 1 of them, so a request counts
    for up to a second longer than the window) and the latest
    C{UPSTREAM_SAMPLES} (time, TTFT, duration) samples for percentiles, so
    memory stays bounded whatever the request rate.
    """

    __slots__ = ("buckets", "samples", "last", "_described")

    def __init__(self, samples: int = UPSTREAM_SAMPLES) -> None:
        # [second, requests, 4xx, 5xx], oldest first
        self.buckets: deque[list[int]] = deque()
        self.samples: deque[tuple[float, float | None, float]] = deque(maxlen=samples)
        self.last = 0.0
        self._described: dict[str, Any] | None = None  # until a request comes or goes

    def add(self, now: float, status: int, ttfb: float | None, duration: float) -> None:
        second = int(now)
        if not self.buckets or self.buckets[-1][0] != second:
            self.buckets.append([second, 0, 0, 0])
        bucket = self.buckets[-1]
        bucket[1] += 1
        if 400 <= status < 500:
            bucket[2] += 1
        elif status >= 500:
            bucket[3] += 1
        self.samples.append((now, ttfb, duration))
        self.last = now
        self._described = None

    def prune(self, horizon: float) -> None:
        """Drop what finished before C{horizon}."""
        while self.buckets and self.buckets[0][0] + 1 <= horizon:  # the whole second is before it
            self.buckets.popleft()
            self._described = None
        while self.samples and self.samples[0][0] < horizon:
            self.samples.popleft()
            self._described = None

    def describe(self, window: float) -> dict[str, Any]:
        """The figures (computed again only after a request came or left the window); do not change it."""
        if self._described is None:
            self._described = self._describe(window)
        return self._described

    def _describe(self, window: float) -> dict[str, Any]:
        requests = sum(b[1] for b in self.buckets)
        ttfbs = sorted(s[1] for s in self.samples if s[1] is not None)
        durations = sorted(s[2] for s in self.samples)
        return {
            "requests": requests,
            "requests_per_second": _rounded(requests / window, 3),
            "ttft_p50": _rounded(percentile(ttfbs, 0.50), 3),
            "ttft_p95": _rounded(percentile(ttfbs, 0.95), 3),
            "duration_p50": _rounded(percentile(durations, 0.50), 3),
            "duration_p95": _rounded(percentile(durations, 0.95), 3),
            "responses_4xx": sum(b[2] for b in self.buckets),
            "responses_5xx": sum(b[3] for b in self.buckets),
        }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


#: What L{RequestStats.upstream_recent} says of an upstream with no request in the window.
NO_REQUESTS: dict[str, Any] = UpstreamWindow().describe(60.0)


class RequestStats:
    """
    What the proxy saw: totals since start (by status class, per upstream),
    the requests that finished in the last C{window} seconds, for rates and
    time-to-first-byte / duration percentiles, and the same window per
    upstream (L{UpstreamWindow}, dropped when the upstream leaves or has had
    no request for a window).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        window: float = 60.0,
        max_samples: int = 100_000,
        upstream_samples: int = UPSTREAM_SAMPLES,
    ) -> None:
        self._clock = clock
        self.window = window
        self.upstream_samples = upstream_samples
        self._upstreams: dict[str, UpstreamWindow] = {}
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
        if upstream is not None:
            key = upstream.id
            window = self._upstreams.get(key)
            if window is None:
                window = self._upstreams[key] = UpstreamWindow(self.upstream_samples)
            window.add(now, status, ttfb, duration)
        if upstream is not None and status:  # a client leaving is nobody's failure
            if 200 <= status < 500:
                upstream.requests_served += 1
            else:
                self.upstream_failed(upstream)
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

    def upstream_failed(self, upstream: Any) -> None:
        """
        Count one failure of C{upstream}: the one place per-upstream failures
        are counted. L{record} calls it for an answer relayed with a 5xx; the
        proxy for an attempt that failed before answering (refused, reset,
        no headers or no body byte in time), retried or not.
        """
        upstream.requests_failed += 1

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

    def upstream_recent(self, upstream_id: str) -> dict[str, Any]:
        """One upstream's figures over the last C{window} seconds (L{UpstreamWindow.describe})."""
        window = self._upstreams.get(upstream_id)
        if window is None:
            return dict(NO_REQUESTS)
        window.prune(self._clock.seconds() - self.window)
        return window.describe(self.window)

    def forget(self, upstream_id: str) -> None:
        """The upstream left the fleet: drop its window."""
        self._upstreams.pop(upstream_id, None)

    def prune(self) -> int:
        """Drop the windows of upstreams with no request in the last C{window} seconds; how many are kept."""
        horizon = self._clock.seconds() - self.window
        for key in [k for k, w in self._upstreams.items() if w.last < horizon]:
            del self._upstreams[key]
        return len(self._upstreams)
