"""Routing: the cost model (paddler.routing.cost)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paddler.routing.cost import GENERATION_MAX_WAIT, TIE_SECONDS, Candidate, estimate, rank


def candidate(id: str, idle: int = 1, total: int = 4, **kwargs: Any) -> Candidate:
    values: dict[str, Any] = dict(
        slots_idle=idle, slots_total=total, in_flight=total - idle, expected_wait=1.0,
        cached_tokens=0, prompt_speed=1000.0, generation_speed=50.0,
    )
    values.update(kwargs)
    return Candidate(id=id, **values)


def test_ttft_is_wait_plus_uncached_tokens_over_prompt_speed() -> None:
    """An idle upstream waits 0; a full one its expected wait; at least one token is evaluated."""
    free = estimate(candidate("a", cached_tokens=600), prompt_tokens=1000)
    assert (free.wait, free.prefill, free.ttft) == (0.0, pytest.approx(0.4), pytest.approx(0.4))
    full = estimate(candidate("b", idle=0, expected_wait=2.5), prompt_tokens=1000)
    assert full.ttft == pytest.approx(3.5) and not full.free
    everything = estimate(candidate("c", cached_tokens=5000), prompt_tokens=1000)
    assert everything.prefill == pytest.approx(1 / 1000)
    generation = estimate(candidate("d", generation_speed=20), 1000, output_tokens=100)
    assert generation.cost == pytest.approx(1.0 + 5.0)


def test_the_warm_upstream_wins_and_so_does_the_fast_one() -> None:
    """With idle slots everywhere: the one holding the prefix ranks first; with no cache, the
    faster prompt evaluator does; generation speed counts when output tokens are expected."""
    warm = rank([candidate("cold"), candidate("warm", cached_tokens=1500)], 2000)
    assert warm.order == ["warm", "cold"] and warm.wait_for is None
    fast = rank([candidate("slow", prompt_speed=500), candidate("fast", prompt_speed=3000)], 2000)
    assert fast.order == ["fast", "slow"]
    long_reply = rank(
        [candidate("gen-slow", generation_speed=20, prompt_speed=3000),
         candidate("gen-fast", generation_speed=60, prompt_speed=2000)],
        1000, output_tokens=200,
    )
    assert long_reply.order == ["gen-fast", "gen-slow"]


def test_full_upstreams_rank_after_every_free_one() -> None:
    """A full upstream, however warm, is never ranked before one that can take the request now
    (the load guard: no upstream gets more requests than slots)."""
    decision = rank([candidate("full-warm", idle=0, cached_tokens=4000, expected_wait=50.0),
                     candidate("free-cold")], 4000)
    assert decision.order == ["free-cold", "full-warm"]
    assert decision.best is not None and decision.best.id == "free-cold"
    nothing = rank([candidate("x", idle=0), candidate("y", idle=0)], 100)
    assert nothing.best is None and nothing.wait_for is None


def test_wait_for_a_busy_warm_upstream_only_while_the_wait_is_below_the_prefill_saved() -> None:
    """Prefill elsewhere takes 4 s: waiting ~1 s for the warm server is better (wait up to the
    3.99 s break-even, capped at max_wait); a 5 s wait is not; nor past max_wait."""
    cold = candidate("cold", prompt_speed=1000)
    warm = candidate("warm", idle=0, expected_wait=1.0, cached_tokens=3990)
    decision = rank([cold, warm], 4000, max_wait=10.0)
    assert decision.order == ["cold", "warm"]
    assert decision.wait_for == "warm"
    assert decision.wait_up_to == pytest.approx(4.0 - 0.01)
    capped = rank([cold, warm], 4000, max_wait=2.0)
    assert capped.wait_for == "warm" and capped.wait_up_to == 2.0
    too_slow = rank([cold, candidate("warm", idle=0, expected_wait=5.0, cached_tokens=3990)], 4000,
                    max_wait=10.0)
    assert too_slow.wait_for is None
    beyond = rank([cold, candidate("warm", idle=0, expected_wait=3.0, cached_tokens=3990)], 4000,
                  max_wait=2.0)
    assert beyond.wait_for is None
    small = rank([candidate("cold"), candidate("warm", idle=0, expected_wait=0.001, cached_tokens=10)],
                 20, max_wait=10.0)
    assert small.wait_for is None  # saves less than min_gain


def test_a_hot_shared_prefix_spreads_by_load() -> None:
    """Every upstream holds the shared prompt: costs tie, so the one with the most idle slots
    (then the lowest load, then the least recently chosen) goes first."""
    same = dict(cached_tokens=1500)
    decision = rank([candidate("a", idle=1, **same), candidate("b", idle=3, **same),
                     candidate("c", idle=3, total=8, **same)], 1600)
    assert decision.order == ["b", "c", "a"]  # b and c: 3 idle each; b runs 1 of 4, c 5 of 8
    by_time = rank([candidate("x", last_chosen=10.0, **same), candidate("y", last_chosen=5.0, **same)], 1600)
    assert by_time.order == ["y", "x"]


def test_costs_within_the_tie_window_are_ties() -> None:
    """A prefill difference below TIE_SECONDS does not beat an idle-slot difference."""
    a = candidate("a", idle=1, prompt_speed=1000.0)
    b = candidate("b", idle=3, prompt_speed=1000.0 * (1 - TIE_SECONDS / 10))
    assert rank([a, b], 1000).order == ["b", "a"]  # 1.0 s and 1.0005 s: a tie
    slower = candidate("c", idle=3, prompt_speed=900.0)
    assert rank([a, slower], 1000).order == ["a", "c"]  # 1.0 s and 1.11 s: not a tie


def test_zero_or_broken_speeds_and_waits_rank_last_among_their_kind() -> None:
    """A zero, negative or NaN speed is treated as hopelessly slow; a NaN wait as infinite."""
    decision = rank([candidate("broken", prompt_speed=0.0), candidate("nan", prompt_speed=math.nan),
                     candidate("ok")], 500)
    assert decision.order[0] == "ok"
    full = rank([candidate("free"), candidate("nan-wait", idle=0, expected_wait=math.nan)], 500)
    assert full.order == ["free", "nan-wait"] and full.wait_for is None


candidates = st.lists(
    st.builds(
        lambda i, total, idle, wait, cached, ps, gs, last: Candidate(
            id=f"u{i}", slots_idle=min(idle, total), slots_total=total,
            in_flight=total - min(idle, total), expected_wait=wait, cached_tokens=cached,
            prompt_speed=ps, generation_speed=gs, last_chosen=last,
        ),
        st.integers(0, 10_000), st.integers(1, 16), st.integers(0, 16),
        st.floats(0, 100, allow_nan=False), st.integers(0, 5000),
        st.floats(1, 10_000, allow_nan=False), st.floats(1, 500, allow_nan=False),
        st.floats(0, 1000, allow_nan=False),
    ),
    max_size=12,
    unique_by=lambda c: c.id,
)


@given(candidates, st.integers(0, 20_000))
@settings(max_examples=300, deadline=None)
def test_ranking_is_a_permutation_with_free_upstreams_first(cands: list[Candidate], tokens: int) -> None:
    """Property: every candidate appears once; those with an idle slot come first; a wait-for
    names a full candidate and a wait within the bound."""
    decision = rank(cands, tokens, max_wait=2.0)
    assert sorted(decision.order) == sorted(c.id for c in cands)
    flags = [e.free for e in decision.ranked]
    assert flags == sorted(flags, reverse=True)
    if decision.wait_for is not None:
        chosen = next(e for e in decision.ranked if e.id == decision.wait_for)
        assert not chosen.free and 0 < decision.wait_up_to <= 2.0
        assert chosen.wait <= 2.0


@given(st.lists(st.tuples(st.integers(1, 16), st.integers(0, 16)), min_size=1, max_size=12),
       st.integers(1, 20_000), st.floats(1, 10_000, allow_nan=False))
@settings(max_examples=300, deadline=None)
def test_without_cache_and_with_equal_speeds_the_order_is_most_idle_slots_first(
    shapes: list[tuple[int, int]], tokens: int, speed: float
) -> None:
    """Property: no cache information and one speed for all: the ranking is the ``slots``
    policy's, most idle slots first."""
    cands = [
        Candidate(id=f"u{i}", slots_idle=min(idle, total), slots_total=total,
                  in_flight=total - min(idle, total), expected_wait=1.0, cached_tokens=0,
                  prompt_speed=speed, generation_speed=30.0)
        for i, (total, idle) in enumerate(shapes)
    ]
    decision = rank(cands, tokens)
    idle = [e.candidate.slots_idle for e in decision.ranked if e.free]
    assert idle == sorted(idle, reverse=True)
    assert decision.wait_for is None


def test_queue_pressure_weighs_prefill_in_the_cost_not_in_the_ttft() -> None:
    """pressure p multiplies prefill by 1 + p in the cost (capped at MAX_PRESSURE); the ttft
    stays wait + prefill; without pressure cost == ttft."""
    from paddler.routing.cost import MAX_PRESSURE

    c = candidate("a", idle=0, expected_wait=0.5)
    plain = estimate(c, 1000)
    assert plain.cost == plain.ttft == pytest.approx(1.5)
    pressed = estimate(c, 1000, pressure=2.0)
    assert pressed.ttft == pytest.approx(1.5) and pressed.cost == pytest.approx(0.5 + 3.0)
    capped = estimate(c, 1000, pressure=100.0)
    assert capped.cost == pytest.approx(0.5 + 1.0 * (1 + MAX_PRESSURE))


def test_pressure_turns_a_borderline_wait_into_a_hold_out() -> None:
    """A warm full upstream 1.2 s away saves 1 s of prefill: not worth it without a queue, worth
    it when prefill counts double."""
    cold = candidate("cold", idle=1)
    warm = candidate("warm", idle=0, expected_wait=1.2, cached_tokens=1000)
    assert rank([cold, warm], 1001).wait_for is None
    assert rank([cold, warm], 1001, pressure=1.0).wait_for == "warm"


def test_a_tie_is_measured_from_the_cheapest_not_by_fixed_buckets() -> None:
    """Two upstreams with no cache whose measured prompt speeds differ by a hair (costs
    0.1249 s and 0.1251 s, across a 5 ms boundary) are a tie: the one with more idle slots
    wins, as with the slots policy; a real difference (10 ms) still decides."""
    hair = rank([candidate("fast-ish", idle=1, prompt_speed=2001.6), candidate("idle", idle=3, prompt_speed=1998.4)],
                250)
    assert hair.order == ["idle", "fast-ish"]
    real = rank([candidate("fast", idle=1, prompt_speed=2000.0), candidate("idle", idle=3, prompt_speed=1850.0)],
                250)
    assert real.order == ["fast", "idle"]


def test_among_ties_with_equal_idle_slots_the_faster_generator_wins() -> None:
    """No cache, same prompt speed, two idle slots each: the upstream that generates faster
    ranks first, even though the slower one is less loaded."""
    order = rank([candidate("slow", idle=2, total=2, generation_speed=20.0),
                  candidate("fast", idle=2, total=4, generation_speed=60.0)], 300).order
    assert order == ["fast", "slow"]


def test_a_long_answer_holds_out_briefly_for_a_busy_faster_generator() -> None:
    """Nothing is cached anywhere. A 400-token answer takes 20 s on the free 20 tokens/s
    upstream and 6.7 s on the busy 60 tokens/s one: it waits for the fast one (0.5 s expected,
    below a quarter of the 13.3 s saved), up to that quarter past break-even, capped by max_wait.
    A 10-token answer saves 0.33 s, a quarter of which is below the wait: it takes the free
    slot; and a wait above GENERATION_MAX_WAIT (1 s) is never taken for generation speed."""
    slow = candidate("slow", generation_speed=20.0)
    fast = candidate("fast", idle=0, expected_wait=0.5, generation_speed=60.0)
    long = rank([slow, fast], 200, output_tokens=400, max_wait=5.0)
    assert long.best is not None and long.best.id == "slow"
    assert long.wait_for == "fast"
    assert long.wait_up_to == pytest.approx(min(5.0, 0.2 - 0.2 + 0.25 * (400 / 20 - 400 / 60)))
    short = rank([slow, fast], 200, output_tokens=10, max_wait=5.0)
    assert short.wait_for is None
    far = candidate("fast", idle=0, expected_wait=GENERATION_MAX_WAIT + 0.1, generation_speed=60.0)
    assert rank([slow, far], 200, output_tokens=400, max_wait=5.0).wait_for is None
    assert rank([slow, fast], 200, output_tokens=400, max_wait=5.0, generation_share=0.0).wait_for is None


def test_with_a_queue_a_long_answer_waits_less_for_a_faster_generator() -> None:
    """The generation share a request may wait for is divided by 1 + pressure (the slot it takes
    is one the waiting requests cannot have): a 1 s wait for 13.3 s saved is taken with an empty
    buffer (below a quarter of it), not with 3 requests waiting per slot (a sixteenth: 0.83 s)."""
    slow = candidate("slow", generation_speed=20.0)
    fast = candidate("fast", idle=0, expected_wait=1.0, generation_speed=60.0)
    assert rank([slow, fast], 200, output_tokens=400, max_wait=5.0).wait_for == "fast"
    assert rank([slow, fast], 200, output_tokens=400, max_wait=5.0, pressure=3.0).wait_for is None


def test_generation_speeds_within_a_factor_of_two_of_the_fastest_tie() -> None:
    """Two servers of one kind measured at 200 and 120 tokens/s (noise): for a cold request they
    tie on generation, so the one with more idle slots goes first (conversations spread); at
    60 against 20 tokens/s the faster one wins."""
    noisy = rank([candidate("a", idle=1, generation_speed=200.0), candidate("b", idle=2, generation_speed=120.0)],
                 100, output_tokens=30)
    assert noisy.order == ["b", "a"]
    real = rank([candidate("a", idle=1, generation_speed=60.0), candidate("b", idle=2, generation_speed=20.0)],
                100, output_tokens=30)
    assert real.order == ["a", "b"]
