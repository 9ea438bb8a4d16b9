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
