"""The pool driven by the ``cost`` policy, as a property: random arrivals (with shared and
private prefixes and conversation keys), completions with llama.cpp timings, clients that
leave, and time passing, on a fake clock.

After every step:

- no upstream runs more requests than it has slots;
- a request still waiting while some upstream has an idle slot is holding out for a warm
  upstream, and has been doing so for at most ``max_wait`` seconds (the documented bound,
  docs/routing.md);
- when a request is dispatched, every older request still waiting is holding out: FIFO order
  is kept except for requests holding out, which let younger ones pass for at most
  ``max_wait`` seconds.

At the end, with every request finished or gone: no lease is out, nobody waits, no timer is
left behind.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from paddler.errors import BufferTimeout
from paddler.fleet.pool import Lease, UpstreamPool
from paddler.fleet.upstream import SlotsSeen, Upstream
from paddler.routing.policies import CostChooser
from paddler.routing.router import Router

MAX_WAIT = 1.5
PREFIXES = [f"Guide {i}: you know the river, its boats and its water. " * 300 for i in range(6)] + [""]

arrival = st.tuples(st.just("arrive"), st.integers(0, len(PREFIXES) - 1), st.integers(0, 5),
                    st.sampled_from([None, "alice", "bob"]), st.integers(1, 40))
finish = st.tuples(st.just("finish"), st.integers(0, 50), st.integers(0, 3000), st.booleans())
leave = st.tuples(st.just("leave"), st.integers(0, 50))
advance = st.tuples(st.just("advance"), st.floats(0.0, 1.0))
steps = st.lists(st.one_of(arrival, arrival, finish, leave, advance), max_size=60)


class Request:
    def __init__(self, number: int, deferred: Any, demand: Any, now: float) -> None:
        self.number = number
        self.deferred = deferred
        self.demand = demand
        self.arrived = now
        self.lease: Lease | None = None
        self.gone = False
        self.held_since: float | None = None


def make_pool(clock: Clock, slots: list[int], buffer_timeout: float) -> UpstreamPool:
    router = Router(clock, max_wait=MAX_WAIT)
    # Prefill of a cold long prefix (about 1 s) outweighs a warm upstream's wait: hold-outs are common.
    router.speeds.prior_prompt_speed = 4000.0
    router.speeds.prior_generation_speed = 100.0
    pool = UpstreamPool(clock, CostChooser(clock, router), max_buffered=1000, buffer_timeout=buffer_timeout)
    for index, count in enumerate(slots):
        upstream = Upstream(f"http://127.0.0.{index + 1}:8080", clock=clock)
        upstream.record(SlotsSeen(count, 0, upstream.probe_mark(), models=("m",)), clock.seconds())
        pool.add(upstream)
    return pool


@settings(max_examples=150, deadline=None)
@given(slots=st.lists(st.integers(1, 3), min_size=2, max_size=3), program=steps,
       buffer_timeout=st.sampled_from([0.5, 3.0, 1000.0]))
def test_the_cost_policy_keeps_slots_bounds_and_fifo_outside_bounded_hold_outs(
    slots: list[int], program: list[tuple[Any, ...]], buffer_timeout: float
) -> None:
    clock = Clock()
    pool = make_pool(clock, slots, buffer_timeout)
    requests: list[Request] = []

    def waiting() -> list[Request]:
        return [r for r in requests if r.lease is None and not r.gone]

    def granted(lease: Lease, request: Request) -> None:
        for older in waiting():
            if older.number < request.number:
                assert older.demand.holding_for is not None, "a younger request passed one not holding out"
        request.lease = lease

    def failed(failure: Failure, request: Request) -> None:
        failure.trap(CancelledError, BufferTimeout)
        request.gone = True

    def check() -> None:
        now = clock.seconds()
        for upstream in pool.upstreams.values():
            assert upstream.in_flight <= upstream.slots_total
        idle = any(u.slots_idle > 0 for u in pool.upstreams.values())
        for request in waiting():
            if request.demand.holding_for is not None:
                if request.held_since is None:
                    request.held_since = now
            if idle:
                assert request.demand.holding_for is not None, "waiting although a slot is idle"
                assert request.held_since is not None and now - request.held_since <= MAX_WAIT + 1e-9

    for step in program:
        kind = step[0]
        if kind == "arrive":
            _, prefix, turn, user, n = step
            body: dict[str, Any] = {"messages": [{"role": "system", "content": PREFIXES[prefix]}] + [
                {"role": "user", "content": f"question {i} of {len(requests)}"} for i in range(turn + 1)],
                "max_tokens": n}
            if user is not None:
                body["user"] = user
            demand = pool.chooser.prepare(body, b"/v1/chat/completions", {})
            request = Request(len(requests), None, demand, clock.seconds())
            requests.append(request)
            request.deferred = pool.acquire("m", (), demand)
            request.deferred.addCallbacks(granted, failed, callbackArgs=(request,), errbackArgs=(request,))
        elif kind == "finish":
            running = [r for r in requests if r.lease is not None and not r.lease.released]
            if running:
                request = running[step[1] % len(running)]
                assert request.lease is not None
                timings = {"cache_n": step[2], "prompt_n": 100, "prompt_ms": 25.0, "predicted_n": 20,
                           "predicted_ms": 200.0} if step[3] else None
                request.lease.release(timings)
        elif kind == "leave":
            queued = waiting()
            if queued:
                queued[step[1] % len(queued)].deferred.cancel()
        else:
            clock.advance(step[1])
        check()

    # Drain: finish everything that runs, let every hold-out and timeout play out.
    for _ in range(10_000):
        running = [r for r in requests if r.lease is not None and not r.lease.released]
        for request in running:
            assert request.lease is not None
            request.lease.release(None)
        check()
        if not waiting() and not running:
            break
        clock.advance(0.25)
    assert not waiting()
    assert all(u.in_flight == 0 for u in pool.upstreams.values())
    assert pool.requests_buffered == 0
    assert clock.getDelayedCalls() == []
