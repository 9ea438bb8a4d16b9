"""Edge case: per-upstream counters must not move to a new series when the upstream's state changes."""

from __future__ import annotations

from paddler.observability.prometheus import PrometheusMetrics

from .test_prometheus import make_fleet, scrape


def _series(families, name, upstream):
    family = families[name[: -len("_total")]]
    return [(dict(s.labels), s.value) for s in family.samples
            if s.name == name and s.labels["upstream"] == upstream]


def test_upstream_request_counters_keep_one_series_when_the_upstream_drains():
    """paddler_upstream_requests_served_total of gpu-1 is the same series before and after a drain
    (a 'state' label on a counter restarts it under new labels: rate() and increase() lose counts)."""
    clock, pool, stats, a, b = make_fleet()
    metrics = PrometheusMetrics(pool, stats)
    stats.record(200, 1.0, ttfb=0.1, upstream=a)
    before = _series(scrape(metrics), "paddler_upstream_requests_served_total", "gpu-1")
    pool.drain(a.id)
    stats.record(200, 1.0, ttfb=0.1, upstream=a)
    after = _series(scrape(metrics), "paddler_upstream_requests_served_total", "gpu-1")
    assert len(before) == len(after) == 1
    assert before[0][0] == after[0][0], (before, after)
    assert (before[0][1], after[0][1]) == (1, 2)
