"""bench/multimodel_real.py without real servers: its trace and its count of loads and evictions
from the routers' /models (the part that turns polled states into figures)."""

from __future__ import annotations

from typing import Any

import pytest

import bench.multimodel_real as real
from bench.multimodel_real import MODELS, STATIC, Poller, make_trace, summary


def test_the_trace_is_seeded_and_shifts_popularity_halfway() -> None:
    """Same seed, same trace; the first half's hottest model (m0) is the second half's coldest;
    arrivals come at about the asked rate."""
    trace = make_trace(21, 120.0, 2.0)
    assert trace == make_trace(21, 120.0, 2.0) and trace != make_trace(22, 120.0, 2.0)
    first = [m for t, m in trace if t < 60]
    second = [m for t, m in trace if t >= 60]
    assert first.count("m0") > first.count("m5") and second.count("m5") > second.count("m0")
    assert 180 <= len(trace) <= 300
    assert {m for _, m in trace} <= set(MODELS)


def test_static_pools_pin_four_of_six_models_once_each() -> None:
    """Two hosts of two places: m0..m3 pinned once (hot with cold), m4 and m5 have no pool."""
    pinned = [m for host in STATIC for m in host]
    assert sorted(pinned) == ["m0", "m1", "m2", "m3"]


def test_the_poller_counts_loads_evictions_and_failures_but_not_the_starting_picture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Readings of one router: m0 loaded at the start (not a load); m1 unloaded -> loading ->
    loaded (one load), m0 loaded -> unloaded (one eviction), m2 -> failed (one failure); an
    unreadable router is skipped, not fatal."""
    readings: list[Any] = [
        {"m0": "loaded", "m1": "unloaded", "m2": "unloaded"},
        {"m0": "loaded", "m1": "loading", "m2": "unloaded"},
        OSError("down"),
        {"m0": "unloaded", "m1": "loaded", "m2": "failed"},
    ]

    def model_states(url: str) -> dict[str, str]:
        reading = readings.pop(0)
        if isinstance(reading, Exception):
            raise reading
        return reading

    monkeypatch.setattr(real, "model_states", model_states)
    poller = Poller(["http://router-1"])
    assert poller.loaded_somewhere("m0") and not poller.loaded_somewhere("m1")
    for _ in range(3):
        poller.poll()
    assert [m for _, _, m in poller.loads] == ["m1"]
    assert [m for _, _, m in poller.evictions] == ["m0"]
    assert [m for _, _, m in poller.failures] == ["m2"]
    assert poller.loaded_somewhere("m1") and not poller.loaded_somewhere("m0")


def test_the_summary_is_median_min_max_per_configuration() -> None:
    """Three repetitions of one configuration: [median, min, max] of each figure."""
    rows = [{"config": "placement", "ttft_p50": v, "ttft_p99": v, "ttft_p50_after_shift": v,
             "ttft_p99_after_shift": v, "cold_requests": v, "loads": v, "evictions": v, "unserved": 0,
             "served": 10} for v in (3.0, 1.0, 2.0)]
    assert summary(rows)["placement"]["loads"] == [2.0, 1.0, 3.0]
    assert "static" not in summary(rows)
