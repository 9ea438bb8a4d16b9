"""Prometheus metrics of the balancer (C{GET /metrics} on the management port).

Everything lives on a private C{CollectorRegistry}, never the global default
one, so several balancers (or tests) in one process do not collide. Fleet
figures are read from the pool at scrape time by L{FleetCollector};
latencies are observed into histograms from L{RequestStats.subscribe}.
Names are listed in C{docs/observability.md}.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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


def upstream_state_label(upstream: Any) -> str:
    """The C{state} label: C{draining} or the health state (not C{busy}, which would churn series)."""
    return "draining" if upstream.draining else upstream.state.value


class FleetCollector(Collector):
    """Reads the pool and the request counters at every scrape."""

    def __init__(self, pool: UpstreamPool, stats: RequestStats) -> None:
        self.pool = pool
        self.stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        totals = self.pool.totals()
        for name, key, text in (
            ("paddler_slots_idle", "slots_idle", "Idle slots on upstreams that take requests."),
            ("paddler_slots_processing", "slots_processing", "Busy slots on all upstreams."),
            ("paddler_slots_total", "slots_total", "Slots on upstreams that take requests."),
            ("paddler_requests_buffered", "requests_buffered", "Requests waiting for a free slot."),
            ("paddler_requests_in_flight", "requests_in_flight", "Requests being served by an upstream."),
            (
                "paddler_oldest_buffered_wait_seconds",
                "oldest_buffered_wait",
                "How long the oldest buffered request has waited.",
            ),
        ):
            yield GaugeMetricFamily(name, text, value=totals[key])
        yield GaugeMetricFamily(
            "paddler_upstreams_healthy",
            "Upstreams that take requests (healthy, not draining).",
            value=totals["upstreams"]["healthy"],
        )
        yield GaugeMetricFamily(
            "paddler_upstreams", "Upstreams the balancer knows.", value=totals["upstreams"]["total"]
        )

        requests = CounterMetricFamily(
            "paddler_requests",
            "Finished requests by status class (cancelled: the client left).",
            labels=["status_class"],
        )
        for status_class, count in sorted(self.stats.by_status.items()):
            requests.add_metric([status_class], count)
        yield requests

        per_upstream = {
            "slots_idle": GaugeMetricFamily(
                "paddler_upstream_slots_idle", "Idle slots of one upstream.", labels=UPSTREAM_LABELS
            ),
            "slots_processing": GaugeMetricFamily(
                "paddler_upstream_slots_processing", "Busy slots of one upstream.", labels=UPSTREAM_LABELS
            ),
            "slots_total": GaugeMetricFamily(
                "paddler_upstream_slots_total", "Slots of one upstream.", labels=UPSTREAM_LABELS
            ),
            "requests_in_flight": GaugeMetricFamily(
                "paddler_upstream_requests_in_flight",
                "Requests this balancer is running on one upstream.",
                labels=UPSTREAM_LABELS,
            ),
            "healthy": GaugeMetricFamily(
                "paddler_upstream_healthy",
                "1 when the upstream takes requests, else 0.",
                labels=UPSTREAM_LABELS,
            ),
            "last_update_age": GaugeMetricFamily(
                "paddler_upstream_last_update_age_seconds",
                "Seconds since the last probe answer or agent report (absent: never).",
                labels=UPSTREAM_LABELS,
            ),
        }
        served = CounterMetricFamily(
            "paddler_upstream_requests_served",
            "Requests an upstream answered (status below 500).",
            labels=UPSTREAM_COUNTER_LABELS,
        )
        failed = CounterMetricFamily(
            "paddler_upstream_requests_failed",
            "Requests that failed on an upstream.",
            labels=UPSTREAM_COUNTER_LABELS,
        )
        now = self.pool.clock.seconds()
        for upstream in sorted(self.pool.upstreams.values(), key=lambda u: (u.name, u.url)):
            labels = [upstream.name, upstream.url, upstream_state_label(upstream)]
            per_upstream["slots_idle"].add_metric(labels, upstream.slots_idle)
            per_upstream["slots_processing"].add_metric(labels, upstream.slots_processing)
            per_upstream["slots_total"].add_metric(labels, upstream.slots_total)
            per_upstream["requests_in_flight"].add_metric(labels, upstream.in_flight)
            per_upstream["healthy"].add_metric(labels, 1 if upstream.accepts_requests else 0)
            if upstream.last_update_at is not None:
                per_upstream["last_update_age"].add_metric(
                    labels, max(0.0, now - upstream.last_update_at)
                )
            served.add_metric(labels[:2], upstream.requests_served)
            failed.add_metric(labels[:2], upstream.requests_failed)
        yield from per_upstream.values()
        yield served
        yield failed


class PrometheusMetrics:
    """A private registry with the fleet collector and the latency histograms."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, pool: UpstreamPool, stats: RequestStats) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(pool, stats))
        self.ttft = Histogram(
            "paddler_time_to_first_token_seconds",
            "Time from receiving a request to the first byte of the upstream's answer.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "paddler_request_duration_seconds",
            "Time from receiving a request to the end of its answer.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
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
