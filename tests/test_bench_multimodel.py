"""The multi-model replay of bench/multimodel.py on a short trace: every configuration serves
every request, static pools load nothing, and a trace's shape is what the docstring says."""

from __future__ import annotations

from bench.multimodel import (
    CONFIGS,
    HOSTS,
    MODELS,
    make_trace,
    replay,
    static_assignment,
)


def test_the_trace_shifts_popularity_halfway() -> None:
    """The most requested model of the first half (m0) is the least requested of the second."""
    trace = make_trace(5, 200.0, 0.7)
    first = [m for t, m in trace if t < 100]
    second = [m for t, m in trace if t >= 100]
    assert first.count("m0") > first.count("m5") and second.count("m5") > second.count("m0")
    assert {m for _, m in trace} <= set(MODELS)


def test_every_configuration_serves_the_whole_trace() -> None:
    """A 40 s trace through static pools, the routers' autoload and placement: all served;
    static loads nothing, the two others load the models the shift made popular."""
    trace = make_trace(7, 40.0, 0.5)
    results = {config: replay(trace, config, 40.0) for config in CONFIGS}
    for result in results.values():
        assert result["served"] == result["requests"] == len(trace)
    assert results["static"]["loads"] == 0
    assert results["placement"]["loads"] >= 1
    assert sorted(m for pair in static_assignment() for m in pair) == sorted([*MODELS, "m0", "m1"])


def test_the_oracle_loads_nothing_for_models_already_loaded() -> None:
    """Sparse requests for m2 and m3, each loaded on one host already: the oracle loads nothing."""
    trace = [(float(t), "m2" if t % 2 else "m3") for t in range(1, 40, 4)]
    result = replay(trace, "oracle", 40.0)
    assert result["served"] == len(trace)
    assert result["loads"] == 0


def test_the_oracle_loads_only_the_model_that_will_be_needed() -> None:
    """A burst for m4 alone (one copy loaded, more demand than its two slots): the oracle adds
    copies of m4 only, at most one per host, and every request is served."""
    trace = [(5.0 + 0.25 * i, "m4") for i in range(80)]
    result = replay(trace, "oracle", 30.0)
    assert result["served"] == len(trace)
    others = {m: n for m, n in result["loads_by_model"].items() if m != "m4"}
    assert set(others.values()) == {0}
    assert 1 <= result["loads_by_model"]["m4"] <= HOSTS - 1


def test_placement_loads_only_for_the_models_the_shift_made_hot() -> None:
    """A 120 s trace at 70 % of capacity: placement adds a few copies of the models the shift
    made popular (m3 to m5) and loads no model the shift made cold (m0, m1, m2): no churn."""
    trace = make_trace(21, 120.0, 0.7)
    result = replay(trace, "placement", 120.0)
    assert result["served"] == len(trace)
    assert 1 <= result["loads"] <= 3, result["loads_by_model"]
    assert {m: result["loads_by_model"][m] for m in ("m0", "m1", "m2")} == {"m0": 0, "m1": 0, "m2": 0}
