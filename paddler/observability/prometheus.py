"""Prometheus metrics of the balancer (C{GET /metrics} on the management port).

Everything lives on a private C{CollectorRegistry}, never the global default
one, so several balancers (or tests) in one process do not collide. Every
figure is read at scrape time by L{FleetCollector}: fleet and per-upstream
gauges from the pool, request counters and latency histograms from
L{RequestStats}. Names pass ``promtool check metrics`` (no gauge ends in
``_total``) and no ``_created`` series is exported. Names are listed in
C{docs/observability.md}.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from paddler.fleet.pool import UpstreamPool
from paddler.observability.requests import RequestStats

#: Buckets of C{paddler_time_to_first_token_seconds}.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Buckets of C{paddler_request_duration_seconds}.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

UPSTREAM_LABELS = ["upstream", "url", "state"]
#: Counters carry no C{state}: a label that changes would restart the counter as a new series.
UPSTREAM_COUNTER_LABELS = ["upstream", "url"]

#: The labels of the counters of requests that were not served.
OUTCOME_COUNTERS = {
    "refused": ("paddler_requests_refused", "reason", "Requests refused at once (503), by reason."),
    "timed_out": ("paddler_requests_timed_out", "reason", "Requests that timed out (504; 408 for a client too slow to send one), by what they waited for."),
    "cancelled": ("paddler_requests_cancelled", "stage", "Requests whose client left, by where they were."),
}


def upstream_state_label(upstream: Any) -> str:
    """The C{state} label: C{draining} or the health state (not C{busy}, which would churn series)."""
    return "draining" if upstream.draining else upstream.state.value


class Histogram:
    """Cumulative buckets, a sum and a count, filled by L{observe} and read by the collector."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            running += count
            cumulative.append((bound, running))
        return HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=self.sum)


class FleetCollector(Collector):
    """Reads the pool, the request counters and the histograms at every scrape."""

    def __init__(self, pool: UpstreamPool, stats: RequestStats, histograms: Sequence[Histogram] = ()) -> None:
        self.pool = pool
        self.stats = stats
        self.histograms = list(histograms)
        self.extra: list[Any] = []  # more collectors' collect() (shared state)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._fleet()
        yield from self._requests()
        for histogram in self.histograms:
            yield histogram.family()
        yield from self._upstreams()
        for extra in self.extra:
            yield from extra()

    def _fleet(self) -> Iterator[Metric]:
        totals = self.pool.totals()
        for name, value, text in (
            ("paddler_slots_idle", totals["slots_idle"], "Idle slots on upstreams that take requests."),
            ("paddler_slots_processing", totals["slots_processing"], "Busy slots on all upstreams."),
            ("paddler_slots_capacity", totals["slots_total"], "Slots on upstreams that take requests."),
            ("paddler_requests_buffered", totals["requests_buffered"], "Requests waiting for a free slot."),
            ("paddler_buffer_capacity", self.pool.max_buffered, "Requests the buffer may hold (--max-buffered-requests)."),
            ("paddler_requests_in_flight", totals["requests_in_flight"], "Requests being served by an upstream."),
            (
                "paddler_oldest_buffered_wait_seconds",
                totals["oldest_buffered_wait"],
                "How long the oldest buffered request has waited.",
            ),
            (
                "paddler_upstreams_healthy",
                totals["upstreams"]["healthy"],
                "Upstreams that take requests (healthy, not draining).",
            ),
            ("paddler_upstreams", totals["upstreams"]["total"], "Upstreams the balancer knows."),
        ):
            yield GaugeMetricFamily(name, text, value=value)

    def _requests(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "paddler_requests",
            "Finished requests by status class (cancelled: the client left).",
            labels=["status_class"],
        )
        for status_class, count in sorted(self.stats.by_status.items()):
            requests.add_metric([status_class], count)
        yield requests
        for kind, (name, label, text) in OUTCOME_COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=[label])
            for reason, count in sorted(self.stats.outcomes[kind].items()):
                family.add_metric([reason], count)
            yield family

    def _upstreams(self) -> Iterator[Metric]:
        gauges = {
            key: GaugeMetricFamily(name, text, labels=UPSTREAM_LABELS)
            for key, name, text in (
                ("slots_idle", "paddler_upstream_slots_idle", "Idle slots of one upstream."),
                ("slots_processing", "paddler_upstream_slots_processing", "Busy slots of one upstream."),
                ("slots_capacity", "paddler_upstream_slots_capacity", "Slots of one upstream."),
                (
                    "requests_in_flight",
                    "paddler_upstream_requests_in_flight",
                    "Requests this balancer is running on one upstream.",
                ),
                ("healthy", "paddler_upstream_healthy", "1 when the upstream takes requests, else 0."),
                (
                    "last_update_age",
                    "paddler_upstream_last_update_age_seconds",
                    "Seconds since the last probe answer or agent report (absent: never).",
                ),
                (
                    "prompt_speed",
                    "paddler_upstream_prompt_tokens_per_second",
                    "Measured prompt speed (smoothed llama.cpp timings; a prior until measured).",
                ),
                (
                    "generation_speed",
                    "paddler_upstream_generation_tokens_per_second",
                    "Measured generation speed (smoothed llama.cpp timings; a prior until measured).",
                ),
            )
        }
        counters = {
            key: CounterMetricFamily(name, text, labels=UPSTREAM_COUNTER_LABELS)
            for key, name, text in (
                ("served", "paddler_upstream_requests_served", "Requests an upstream answered (status below 500)."),
                ("failed", "paddler_upstream_requests_failed", "Requests that failed on an upstream."),
                (
                    "dropped",
                    "paddler_upstream_connections_dropped",
                    "Kept-alive connections to an upstream closed for unexpected bytes (a framing disagreement).",
                ),
                ("prefix_hits", "paddler_upstream_prefix_hits", "Requests whose predicted prompt prefix the upstream had cached."),
                (
                    "tokens_saved",
                    "paddler_upstream_prompt_tokens_saved",
                    "Prompt tokens the upstream took from its cache instead of evaluating them.",
                ),
            )
        }
        now = self.pool.clock.seconds()
        chooser = self.pool.chooser
        for upstream in sorted(self.pool.upstreams.values(), key=lambda u: (u.name, u.url)):
            labels = [upstream.name, upstream.url, upstream_state_label(upstream)]
            routing = chooser.describe(upstream)
            gauges["slots_idle"].add_metric(labels, upstream.slots_idle)
            gauges["slots_processing"].add_metric(labels, upstream.slots_processing)
            gauges["slots_capacity"].add_metric(labels, upstream.slots_total)
            gauges["requests_in_flight"].add_metric(labels, upstream.in_flight)
            gauges["healthy"].add_metric(labels, 1 if upstream.accepts_requests else 0)
            if upstream.last_update_at is not None:
                gauges["last_update_age"].add_metric(labels, max(0.0, now - upstream.last_update_at))
            if routing:
                gauges["prompt_speed"].add_metric(labels, routing["prompt_tokens_per_second"])
                gauges["generation_speed"].add_metric(labels, routing["generation_tokens_per_second"])
            counters["served"].add_metric(labels[:2], upstream.requests_served)
            counters["failed"].add_metric(labels[:2], upstream.requests_failed)
            counters["dropped"].add_metric(labels[:2], upstream.connections_dropped)
            counters["prefix_hits"].add_metric(labels[:2], routing.get("prefix_hits", 0))
            counters["tokens_saved"].add_metric(labels[:2], routing.get("tokens_saved", 0))
        yield from gauges.values()
        yield from counters.values()


class PrometheusMetrics:
    """A private registry with the fleet collector and the latency histograms."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, pool: UpstreamPool, stats: RequestStats) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.ttft = Histogram(
            "paddler_time_to_first_token_seconds",
            "Time from receiving a request to the first byte of the upstream's answer.",
            TTFT_BUCKETS,
        )
        self.duration = Histogram(
            "paddler_request_duration_seconds",
            "Time from receiving a request to the end of its answer.",
            DURATION_BUCKETS,
        )
        self.collector = FleetCollector(pool, stats, [self.ttft, self.duration])
        self.registry.register(self.collector)
        self._unsubscribe = stats.subscribe(self.observe)

    def observe(self, record: dict[str, Any]) -> None:
        """Put one finished request (a L{RequestStats} record) into the histograms."""
        if record.get("ttfb") is not None:
            self.ttft.observe(record["ttfb"])
        self.duration.observe(record["duration"])

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def close(self) -> None:
        """Stop observing requests."""
        self._unsubscribe()
