"""Prometheus: /metrics text parsed by prometheus_client's own parser."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from paddler.observability.prometheus import PrometheusMetrics
from paddler.observability.requests import RequestStats

from .helpers import healthy_upstream, make_pool, mark_unreachable


def scrape(metrics: PrometheusMetrics) -> dict[str, Any]:
    """Family name -> family, parsed from the rendered text."""
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode("utf-8"))}


def value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    family_name = sample_name
    for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
        if sample_name.endswith(suffix) and sample_name not in families:
            family_name = sample_name[: -len(suffix)]
    matches = [
        s.value for s in families[family_name].samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (sample_name, labels, matches)
    return matches[0]


def make_fleet():  # type: ignore[no-untyped-def]
    clock = Clock()
    clock.advance(500)
    pool = make_pool(clock, max_buffered=3)
    stats = RequestStats(clock)
    a = healthy_upstream("http://10.0.0.1:8080", total=4, processing=1, clock=clock)
    a.name = "gpu-1"
    a.last_probe_at = clock.seconds()
    b = healthy_upstream("http://10.0.0.2:8080", total=2, clock=clock)
    b.name = "gpu-2"
    mark_unreachable(b, "refused")
    pool.add(a)
    pool.add(b)
    return clock, pool, stats, a, b


def test_fleet_gauges_have_the_originals_names_and_values() -> None:
    """paddler_slots_idle, paddler_slots_processing, paddler_requests_buffered (as in the
    original Paddler), paddler_upstreams_healthy and the other totals, from the pool."""
    clock, pool, stats, a, b = make_fleet()
    metrics = PrometheusMetrics(pool, stats)
    lease = pool.acquire()
    families = scrape(metrics)
    assert value(families, "paddler_slots_idle") == 2
    assert value(families, "paddler_slots_processing") == 2
    assert value(families, "paddler_slots_capacity") == 4
    assert value(families, "paddler_requests_buffered") == 0
    assert value(families, "paddler_requests_in_flight") == 1
    assert value(families, "paddler_oldest_buffered_wait_seconds") == 0
    assert value(families, "paddler_upstreams_healthy") == 1
    assert value(families, "paddler_upstreams") == 2
    assert {f.type for n, f in families.items() if n.startswith("paddler_slots")} == {"gauge"}
    lease.result.release()  # type: ignore[attr-defined]


def test_per_upstream_gauges_carry_upstream_url_and_state_labels() -> None:
    """Every upstream has its slots, flight, health and update age with upstream/url/state labels."""
    clock, pool, stats, a, b = make_fleet()
    clock.advance(2.0)
    b.draining = True
    families = scrape(PrometheusMetrics(pool, stats))
    one = {"upstream": "gpu-1", "url": "http://10.0.0.1:8080", "state": "healthy"}
    two = {"upstream": "gpu-2", "url": "http://10.0.0.2:8080", "state": "draining"}
    assert value(families, "paddler_upstream_slots_idle", **one) == 3
    assert value(families, "paddler_upstream_slots_processing", **one) == 1
    assert value(families, "paddler_upstream_slots_capacity", **one) == 4
    assert value(families, "paddler_upstream_requests_in_flight", **one) == 0
    assert value(families, "paddler_upstream_healthy", **one) == 1
    assert value(families, "paddler_upstream_healthy", **two) == 0
    assert value(families, "paddler_upstream_last_update_age_seconds", **one) == 2.0
    # gpu-2 was never probed: no age sample rather than a made-up one
    assert not [s for s in families["paddler_upstream_last_update_age_seconds"].samples
                if s.labels["upstream"] == "gpu-2"]


def test_request_counters_by_status_class_and_per_upstream() -> None:
    """paddler_requests_total{status_class} counts finished requests; per-upstream counters
    count served and failed requests."""
    clock, pool, stats, a, b = make_fleet()
    metrics = PrometheusMetrics(pool, stats)
    stats.record(200, 1.0, ttfb=0.1, upstream=a)
    stats.record(200, 1.0, ttfb=0.1, upstream=a)
    stats.record(503, 0.0)
    stats.record(502, 0.0, upstream=b)
    stats.record(0, 2.0)
    families = scrape(metrics)
    assert families["paddler_requests"].type == "counter"
    assert value(families, "paddler_requests_total", status_class="2xx") == 2
    assert value(families, "paddler_requests_total", status_class="5xx") == 2
    assert value(families, "paddler_requests_total", status_class="cancelled") == 1
    assert value(families, "paddler_upstream_requests_served_total", upstream="gpu-1") == 2
    assert value(families, "paddler_upstream_requests_failed_total", upstream="gpu-2") == 1


def test_ttft_and_duration_are_histograms_fed_by_finished_requests() -> None:
    """paddler_time_to_first_token_seconds and paddler_request_duration_seconds observe every
    finished request (TTFT only when a first byte came)."""
    clock, pool, stats, a, b = make_fleet()
    metrics = PrometheusMetrics(pool, stats)
    stats.record(200, 1.2, ttfb=0.2, upstream=a)
    stats.record(200, 7.0, ttfb=3.0, upstream=a)
    stats.record(504, 30.0)
    families = scrape(metrics)
    ttft = families["paddler_time_to_first_token_seconds"]
    duration = families["paddler_request_duration_seconds"]
    assert ttft.type == duration.type == "histogram"
    assert value(families, "paddler_time_to_first_token_seconds_count") == 2
    assert value(families, "paddler_time_to_first_token_seconds_sum") == 3.2
    assert value(families, "paddler_time_to_first_token_seconds_bucket", le="0.25") == 1
    assert value(families, "paddler_request_duration_seconds_count") == 3
    assert value(families, "paddler_request_duration_seconds_bucket", le="10.0") == 2
    metrics.close()
    stats.record(200, 1.0, ttfb=0.1)
    assert value(scrape(metrics), "paddler_request_duration_seconds_count") == 3


def test_metrics_live_on_a_private_registry() -> None:
    """Two balancers in one process do not collide, and nothing lands in the global registry."""
    clock, pool, stats, a, b = make_fleet()
    one = PrometheusMetrics(pool, stats)
    two = PrometheusMetrics(pool, stats)
    stats.record(200, 1.0)
    assert value(scrape(one), "paddler_request_duration_seconds_count") == 1
    assert value(scrape(two), "paddler_request_duration_seconds_count") == 1
    assert REGISTRY.get_sample_value("paddler_slots_idle") is None
    assert one.content_type == CONTENT_TYPE_LATEST


def test_refused_timed_out_and_cancelled_requests_are_counted_by_reason() -> None:
    """Every known reason is exported from the start (0), and counts what the proxy recorded."""
    clock, pool, stats, a, b = make_fleet()
    metrics = PrometheusMetrics(pool, stats)
    stats.record(503, 0.0, outcome=("refused", "buffer_full"))
    stats.record(503, 0.0, outcome=("refused", "buffer_full"))
    stats.record(504, 30.0, outcome=("timed_out", "buffer"))
    stats.record(0, 1.0, outcome=("cancelled", "upstream"))
    families = scrape(metrics)
    assert value(families, "paddler_requests_refused_total", reason="buffer_full") == 2
    assert value(families, "paddler_requests_refused_total", reason="shutting_down") == 0
    assert value(families, "paddler_requests_timed_out_total", reason="buffer") == 1
    assert value(families, "paddler_requests_timed_out_total", reason="upstream_idle") == 0
    assert value(families, "paddler_requests_cancelled_total", stage="upstream") == 1
    assert value(families, "paddler_requests_cancelled_total", stage="buffered") == 0
    assert value(families, "paddler_buffer_capacity") == 3


def test_no_created_series_and_no_gauge_named_like_a_counter() -> None:
    """promtool's rules: counters end in _total, gauges do not; nothing exports _created."""
    clock, pool, stats, a, b = make_fleet()
    metrics = PrometheusMetrics(pool, stats)
    stats.record(200, 0.3, ttfb=0.1, upstream=a)
    text = metrics.render().decode()
    assert "_created" not in text
    for family in text_string_to_metric_families(text):
        if family.type == "gauge":
            assert not family.name.endswith("_total"), family.name
    families = scrape(metrics)
    assert value(families, "paddler_time_to_first_token_seconds_bucket", le="0.1") == 1
    assert value(families, "paddler_time_to_first_token_seconds_bucket", le="0.05") == 0
    assert value(families, "paddler_time_to_first_token_seconds_bucket", le="+Inf") == 1
