"""Routing: learning prompt and generation speeds and drain rates (paddler.routing.speed)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from paddler.routing.speed import (
    DRAIN_HALF_LIFE_SECONDS,
    MAX_SPEED,
    PRIOR_GENERATION_SPEED,
    PRIOR_PROMPT_SPEED,
    Ewma,
    SpeedTracker,
    parse_timings,
)


def timings(prompt_n: int = 200, prompt_ms: float = 100.0, predicted_n: int = 50,
            predicted_ms: float = 1000.0, cache_n: int = 0, **extra: Any) -> dict[str, Any]:
    """A llama.cpp timings object (speeds derived as the server does)."""
    return {
        "cache_n": cache_n, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0,
        "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms else 0,
        "predicted_n": predicted_n, "predicted_ms": predicted_ms,
        "predicted_per_second": 1000 * predicted_n / predicted_ms if predicted_ms else 0,
        **extra,
    }


def test_priors_until_measured_then_the_measured_speed() -> None:
    """An unmeasured fleet answers the priors; one full-weight sample replaces them."""
    speeds = SpeedTracker(Clock())
    assert speeds.prompt_speed("a") == PRIOR_PROMPT_SPEED
    assert speeds.generation_speed("a") == PRIOR_GENERATION_SPEED
    speeds.observe("a", timings(prompt_n=400, prompt_ms=100, predicted_n=60, predicted_ms=1000))
    assert speeds.prompt_speed("a") == pytest.approx(4000)
    assert speeds.generation_speed("a") == pytest.approx(60)
    assert speeds.stats("a").prompt_measured and speeds.stats("a").samples == 1


def test_an_unmeasured_upstream_takes_the_fleet_mean() -> None:
    """A new upstream is assumed as fast as the measured ones on average, not the prior."""
    speeds = SpeedTracker(Clock())
    speeds.observe("fast", timings(prompt_n=600, prompt_ms=100, predicted_n=60, predicted_ms=1000))
    speeds.observe("slow", timings(prompt_n=200, prompt_ms=100, predicted_n=20, predicted_ms=1000))
    assert speeds.prompt_speed("new") == pytest.approx(4000)
    assert speeds.generation_speed("new") == pytest.approx(40)
    assert not speeds.stats("new").prompt_measured


def test_the_estimate_follows_a_change_with_the_documented_half_life() -> None:
    """After a speed change, 8 full-weight samples close half of the gap (EWMA half-life 8)."""
    speeds = SpeedTracker(Clock())
    for _ in range(50):
        speeds.observe("a", timings(predicted_n=100, predicted_ms=1000))  # 100 tok/s
    for _ in range(8):
        speeds.observe("a", timings(predicted_n=50, predicted_ms=1000))  # 50 tok/s
    assert speeds.generation_speed("a") == pytest.approx(75, abs=1.0)


def test_small_samples_weigh_less() -> None:
    """A cache hit that evaluated one token (a slow-looking 775 tok/s) barely moves a prompt
    speed learnt from full prompts (6800 tok/s)."""
    speeds = SpeedTracker(Clock())
    for _ in range(20):
        speeds.observe("a", timings(prompt_n=680, prompt_ms=100))
    speeds.observe("a", timings(prompt_n=1, prompt_ms=1.29))
    assert speeds.prompt_speed("a") > 6700


@pytest.mark.parametrize("bad", [
    {"prompt_n": 0, "prompt_ms": 0, "prompt_per_second": 0},
    {"prompt_n": 10, "prompt_ms": 0, "prompt_per_second": math.inf},
    {"prompt_n": "10", "prompt_ms": "1"},
    {"prompt_n": 10, "prompt_ms": -5, "prompt_per_second": -2000},
    {"prompt_n": True, "prompt_ms": True},
    {"prompt_n": 1e12, "prompt_ms": 1e-3},
    {"prompt_per_second": math.nan},
])
def test_garbage_timings_are_ignored(bad: dict[str, Any]) -> None:
    """Zeros, negatives, strings, booleans, NaN, infinities and absurd speeds change nothing."""
    speeds = SpeedTracker(Clock())
    speeds.observe("a", timings(prompt_n=500, prompt_ms=100))
    speeds.observe("a", bad)
    assert speeds.prompt_speed("a") == pytest.approx(5000)
    assert parse_timings("not an object") is None and parse_timings(None) is None
    assert parse_timings({"prompt_per_second": MAX_SPEED * 2}) is None


def test_drain_rate_counts_freed_slots_per_second_on_the_clock() -> None:
    """Two releases a second for a minute give about 2 per second; it halves in a half-life
    once they stop; fleet-wide is the sum."""
    clock = Clock()
    speeds = SpeedTracker(clock)
    speeds.track("a")
    assert speeds.drain_rate("a") == 0
    for _ in range(120):
        clock.advance(0.5)
        speeds.slot_released("a")
    assert speeds.drain_rate("a") == pytest.approx(2.0, rel=0.1)
    speeds.track("b")
    for _ in range(300):  # ten half-lives: the start-up correction is gone
        clock.advance(1.0)
        speeds.slot_released("b")
    assert speeds.drain_rate("b") == pytest.approx(1.0, rel=0.1)
    assert speeds.fleet_drain_rate() == pytest.approx(speeds.drain_rate("a") + speeds.drain_rate("b"))
    before = speeds.drain_rate("b")
    clock.advance(DRAIN_HALF_LIFE_SECONDS)
    assert speeds.drain_rate("b") == pytest.approx(before / 2, rel=0.01)


def test_drain_rate_is_not_inflated_by_a_first_release() -> None:
    """One release right after joining counts over the minimum window, not over 0 seconds."""
    clock = Clock()
    speeds = SpeedTracker(clock)
    speeds.track("a")
    clock.advance(0.01)
    speeds.slot_released("a")
    assert speeds.drain_rate("a") <= 1 / 5 * 1.1


def test_expected_wait_from_the_drain_rate_or_from_the_request_time() -> None:
    """With releases seen: (ahead + 1) / rate. Without: the mean request time x (ahead + 1) / slots."""
    clock = Clock()
    speeds = SpeedTracker(clock)
    speeds.observe("a", timings(prompt_n=1000, prompt_ms=500, predicted_n=100, predicted_ms=2000))
    assert speeds.mean_request_seconds("a") == pytest.approx(0.5 + 2.0)
    assert speeds.expected_wait("a", slots_total=4, ahead=1) == pytest.approx(2.5 * 2 / 4)
    speeds.track("b")
    for _ in range(100):
        clock.advance(0.25)
        speeds.slot_released("b")
    rate = speeds.drain_rate("b")
    assert speeds.expected_wait("b", slots_total=4, ahead=3) == pytest.approx(4 / rate)


def test_forget_drops_an_upstream() -> None:
    speeds = SpeedTracker(Clock())
    speeds.observe("a", timings(prompt_n=900, prompt_ms=100))
    speeds.forget("a")
    assert speeds.prompt_speed("a") == PRIOR_PROMPT_SPEED


@given(st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1)), max_size=50))
@settings(max_examples=200, deadline=None)
def test_ewma_stays_within_the_samples(samples: list[tuple[float, float]]) -> None:
    """Property: the smoothed value always lies between the smallest and largest finite sample."""
    ewma = Ewma()
    seen = []
    for value, weight in samples:
        if math.isfinite(value) and weight > 0:
            ewma.add(value, weight)
            seen.append(value)
    if seen:
        assert ewma.value is not None
        assert min(seen) - 1e-6 * abs(min(seen)) <= ewma.value <= max(seen) + 1e-6 * abs(max(seen))


def test_expected_output_learns_the_share_of_the_bound_requests_use() -> None:
    """Before any answer: the bound, at most the mean generated tokens (the prior 200); once
    requests with a bound of 100 generate 25, a bound of 400 is expected to give 100; without a
    bound, the upstream's mean generated tokens."""
    from twisted.internet.task import Clock

    from paddler.routing.speed import PRIOR_GENERATED_TOKENS, SpeedTracker

    speeds = SpeedTracker(Clock())
    assert speeds.expected_output("a", 50) == 50
    assert speeds.expected_output("a", 5000) == PRIOR_GENERATED_TOKENS
    for _ in range(3):
        speeds.observe("a", {"predicted_n": 25, "predicted_ms": 500.0}, max_tokens=100)
    assert speeds.expected_output("a", 400) == 100
    assert speeds.expected_output("a", None) == 25
    speeds.observe("b", {"predicted_n": 900, "predicted_ms": 500.0}, max_tokens=100)  # over the bound: share 1
    assert speeds.output_share.value is not None and speeds.output_share.value <= 1.0
