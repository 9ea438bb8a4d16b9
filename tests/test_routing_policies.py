"""The ``cost`` policy in the pool (paddler.routing.policies.CostChooser), on a fake clock:
bounded hold-outs for a warm upstream, who passes whom while one holds, waits estimated from
the requests running there."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from paddler.fleet.pool import Lease, UpstreamPool
from paddler.fleet.upstream import SlotsSeen, Upstream
from paddler.routing.policies import CostChooser
from paddler.routing.router import Router, UpstreamView

SYSTEM = "You are the river guide; answer about boats, water and bridges. " * 160  # ~2,600 tokens
TIMINGS = {"cache_n": 0, "prompt_n": 1000, "prompt_ms": 1000.0, "predicted_n": 50, "predicted_ms": 1000.0}
#: A warm answer: the server reused the whole system prompt.
HIT = {**TIMINGS, "cache_n": 2600, "prompt_n": 6, "prompt_ms": 6.0}


def pool_of(clock: Clock, max_wait: float = 2.0) -> UpstreamPool:
    chooser = CostChooser(clock, Router(clock, max_wait=max_wait))
    return UpstreamPool(clock, chooser, max_buffered=100, buffer_timeout=600)


def add(pool: UpstreamPool, number: int, slots: int) -> Upstream:
    upstream = Upstream(f"http://127.0.0.{number}:8080", clock=pool.clock)
    upstream.record(SlotsSeen(slots, 0, upstream.probe_mark(), models=("m",)), pool.clock.seconds())
    return pool.add(upstream)


def warm_and_cold(clock: Clock, max_wait: float) -> tuple[UpstreamPool, Upstream, Upstream]:
    """A 1-slot upstream that served (and so caches) SYSTEM, then an idle 2-slot one that never did."""
    pool = pool_of(clock, max_wait)
    warm = add(pool, 1, 1)
    _, first = ask(pool, SYSTEM, "how deep?")
    assert first[0].upstream is warm
    first[0].release(TIMINGS)
    return pool, warm, add(pool, 2, 2)


def ask(pool: UpstreamPool, system: str, question: str, max_tokens: int = 10) -> tuple[Any, list[Lease]]:
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": max_tokens}
    demand = pool.chooser.prepare(body, b"/v1/chat/completions", {})
    got: list[Lease] = []
    pool.acquire("m", (), demand).addCallback(got.append)
    return demand, got


def test_a_request_holds_out_for_its_warm_upstream_for_at_most_max_wait() -> None:
    """The long prefix is cached on one upstream, which is busy; the other is idle but cold.
    The request holds out (its expected wait is below the prefill it saves), a younger request
    without a prefix passes it meanwhile (the documented reordering), and when the hold-out
    bound (1 s here) runs out before the warm upstream frees, it takes the cold one."""
    clock = Clock()
    pool, warm, cold = warm_and_cold(clock, max_wait=1.0)
    _, second = ask(pool, SYSTEM, "how wide?", max_tokens=40)  # expected to end in 0.8 s; runs longer
    assert second[0].upstream is warm
    demand, third = ask(pool, SYSTEM, "how fast?")
    assert third == [] and demand.holding_for == warm.id
    _, passer = ask(pool, "", "no prefix at all")
    assert passer and passer[0].upstream is cold
    clock.advance(0.9)
    assert third == [] and demand.hold_until == pytest.approx(1.0)
    clock.advance(demand.hold_until - clock.seconds())
    assert third and third[0].upstream is cold and third[0].waited <= 1.0 + 1e-9
    assert demand.holding_for is None


def test_a_hold_out_ends_as_soon_as_the_warm_upstream_frees() -> None:
    """The warm upstream frees within the bound: the holding request gets it at once."""
    clock = Clock()
    pool, warm, _ = warm_and_cold(clock, max_wait=5.0)
    _, second = ask(pool, SYSTEM, "how wide?", max_tokens=20)
    demand, third = ask(pool, SYSTEM, "how fast?")
    assert third == [] and demand.holding_for == warm.id
    clock.advance(0.3)
    second[0].release(HIT)
    assert third and third[0].upstream is warm


def test_requests_holding_for_the_same_upstream_queue_behind_each_other() -> None:
    """A second request holding for the same busy upstream counts the first one ahead of it:
    its expected wait is longer (the second slot to free, not the first)."""
    clock = Clock()
    router = Router(clock)
    request = router.prepare({"prompt": "p" * 400, "max_tokens": 10}, "/completion")
    router.dispatched(request, "a")
    router.dispatched(request, "a")
    alone = router.expected_wait(UpstreamView("a", 0, 2, 2, waiting_ahead=0))
    behind = router.expected_wait(UpstreamView("a", 0, 2, 2, waiting_ahead=1))
    lap = router.expected_wait(UpstreamView("a", 0, 2, 2, waiting_ahead=2))
    assert 0 < alone <= behind < lap


def test_the_expected_wait_comes_from_the_running_requests_not_the_release_rate() -> None:
    """A full upstream whose requests end soon has a short expected wait, however rarely it
    released slots before (the drain rate measures traffic, not capacity)."""
    clock = Clock()
    router = Router(clock)
    for _ in range(2):  # measured: 1,000 prompt tokens/s, 50 generated tokens/s
        warm = router.dispatched(router.prepare({"prompt": "x" * 40}, "/completion"), "a")
        router.finished(warm, "a", TIMINGS)
    clock.advance(100.0)
    short = router.prepare({"prompt": "y" * 400, "max_tokens": 10}, "/completion")
    running = router.dispatched(short, "a")
    assert router.expected_duration(short, "a") == pytest.approx(100 / 1000 + 10 / 50)
    assert router.expected_wait(UpstreamView("a", 0, 1, 1)) == pytest.approx(0.3)
    clock.advance(0.25)
    assert router.expected_wait(UpstreamView("a", 0, 1, 1)) == pytest.approx(0.05)
    clock.advance(1.0)  # overran its estimate: a tenth of its duration more
    assert router.expected_wait(UpstreamView("a", 0, 1, 1)) == pytest.approx(0.03)
    router.finished(running, "a", None)
    assert router.expected_wait(UpstreamView("a", 0, 1, 1)) == pytest.approx(
        router.speeds.expected_wait("a", 1, 0))


def test_queue_pressure_leans_toward_the_warm_upstream() -> None:
    """With no queue a request takes a free cold upstream over waiting 1.2 s for a warm one
    that saves 1 s of prefill; with requests waiting in the buffer (each second of prefill
    delays them too), it holds out for the warm one."""
    clock = Clock()
    router = Router(clock, max_wait=5.0)
    router.speeds.prior_prompt_speed = 1000.0
    body = {"prompt": "z" * 4000, "max_tokens": 10}
    request = router.prepare(body, "/completion")
    router.index.record("warm", request.blocks)
    views = [UpstreamView("warm", 0, 1, 1), UpstreamView("cold", 1, 1, 0)]
    router._running["warm"] = {1: (0.0, 1.2)}
    calm = router.rank(request, views, waiting=0)
    assert calm.wait_for is None and calm.order[0] == "cold"
    busy = router.rank(request, views, waiting=4)
    assert busy.wait_for == "warm"


def test_requests_of_a_replaced_router_do_not_end_the_new_ones_running_requests() -> None:
    """After a reload (a new Router), a request the old one sent finishing on the new one
    leaves the new one's record of what runs where untouched."""
    clock = Clock()
    old, new = Router(clock), Router(clock)
    sent_before = old.dispatched(old.prepare({"prompt": "a" * 400}, "/completion"), "u")
    running = new.dispatched(new.prepare({"prompt": "b" * 400, "max_tokens": 10}, "/completion"), "u")
    new.finished(sent_before, "u", None)
    assert new.expected_wait(UpstreamView("u", 0, 1, 1)) == pytest.approx(
        new.expected_duration(running, "u"))


def generation_fleet(clock: Clock) -> tuple[UpstreamPool, Upstream, Upstream]:
    """The ``cache-aware`` policy over a 1-slot upstream measured at 60 generated tokens/s and a
    1-slot one at 20 (prompts at 1,000 tokens/s on both)."""
    chooser = CostChooser(clock, Router(clock, weigh_output=True), name="cache-aware")
    pool = UpstreamPool(clock, chooser, max_buffered=100, buffer_timeout=600)
    fast, slow = add(pool, 1, 1), add(pool, 2, 1)
    for upstream, ms in ((fast, 1000.0 / 60), (slow, 1000.0 / 20)):
        chooser.router.speeds.observe(upstream.id, {"prompt_n": 1000, "prompt_ms": 1000.0,
                                                    "predicted_n": 1, "predicted_ms": ms}, None)
        chooser.router.speeds.observe(upstream.id, {"prompt_n": 1000, "prompt_ms": 1000.0,
                                                    "predicted_n": 100, "predicted_ms": ms * 100}, 100)
    return pool, fast, slow


def test_two_cold_requests_long_answer_waits_for_the_fast_generator_short_one_takes_the_slow() -> None:
    """Two concurrent cold requests while the fast upstream is busy for 0.3 s more: the one
    asking for 400 tokens holds out for the fast upstream (20 s on the slow one, 6.7 s there),
    the one asking for 8 takes the free slow upstream at once (it passes the holder), and the
    holder gets the fast upstream as soon as it frees. Under ``cost`` (time to first token
    only) the long one takes the slow upstream at once."""
    for weigh, expect_hold in ((True, True), (False, False)):
        clock = Clock()
        pool, fast, slow = generation_fleet(clock)
        pool.chooser.router.weigh_output = weigh
        _, busy = ask(pool, "", "what is a river? " * 20, max_tokens=20)
        assert busy[0].upstream is fast
        long_demand, long = ask(pool, "", "tell me the whole history of boats " * 5, max_tokens=400)
        if not expect_hold:
            assert long and long[0].upstream is slow
            continue
        assert long == [] and long_demand.holding_for == fast.id
        _, short = ask(pool, "", "and a bridge? " * 5, max_tokens=8)
        assert short and short[0].upstream is slow
        clock.advance(0.3)
        busy[0].release(TIMINGS)
        assert long and long[0].upstream is fast and long[0].waited == pytest.approx(0.3)


def test_a_warm_request_stays_with_its_cache_on_the_slower_generator() -> None:
    """Cache first: a conversation whose history is cached on the slow upstream goes back there
    while it is free, even with the fast one free, under ``cache-aware`` too (the generation
    term only ranks requests no upstream holds a quarter of)."""
    clock = Clock()
    pool, fast, slow = generation_fleet(clock)
    _, hog = ask(pool, "", "occupy the fast one " * 5, max_tokens=10)
    assert hog[0].upstream is fast
    _, first = ask(pool, SYSTEM, "how deep?", max_tokens=4)  # too short to wait for the fast one
    assert first[0].upstream is slow
    first[0].release(TIMINGS)
    hog[0].release(TIMINGS)
    _, second = ask(pool, SYSTEM, "how deep? and how wide?", max_tokens=200)
    assert second and second[0].upstream is slow


def test_a_short_shared_head_of_a_long_cached_prompt_does_not_attract_a_second_conversation() -> None:
    """Two upstreams, two concurrent conversations. The first (a 40-word head + 1,500 words) runs
    on one upstream; the second shares only the head (under a quarter of the first's cached
    entry, which llama-server never restores): it is cold everywhere and goes to the upstream
    with more idle slots, not to the one whose index holds the head."""
    clock = Clock()
    pool = UpstreamPool(clock, CostChooser(clock, Router(clock)), max_buffered=100, buffer_timeout=600)
    first_upstream, other = add(pool, 1, 2), add(pool, 2, 2)
    head = "the shared head of both prompts, river boat water " * 8
    _, first = ask(pool, head + "a long private history of one conversation " * 200, "go on", max_tokens=50)
    assert first[0].upstream is first_upstream
    _, second = ask(pool, head + "another conversation", "hello", max_tokens=50)
    assert second and second[0].upstream is other
