"""Property: hostile and normal answers interleaved on a pool of 2 connections never cross clients.

In memory (L{tests.memory_network.MemoryNetwork}: bytes move only when the
test flushes, time only when it advances the clock), two clients send
requests through the production L{UpstreamClient} to the hostile upstream,
in every order hypothesis finds; what each got is checked against the
request id its answer must echo.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.python.failure import Failure

from paddler.upstream.client import UpstreamClient
from tests.hostile_upstream import DELAY, LATE_SHAPES, SHAPES, HostileFactory, verdict
from tests.memory_network import MemoryNetwork

ORIGIN = b"http://10.0.0.1:8080"
#: Shapes whose extra bytes come with the answer (or never): paddler sees them before any next request.
PROMPT_SHAPES = sorted(set(SHAPES) - LATE_SHAPES)


class World:
    """The upstream, the client with a pool of two, and what each request got."""

    def __init__(self, suspect: float) -> None:
        self.net = MemoryNetwork()
        self.upstream = HostileFactory(self.net, "hostile")
        self.net.listenTCP(8080, self.upstream, interface="10.0.0.1")
        self.drops: list[int] = []  # the request count when each drop happened
        self.client = UpstreamClient(
            self.net, max_idle_per_host=2, idle_timeout=4.0, suspect_seconds=suspect,
            on_dropped=lambda origin, what: self.drops.append(next(self.order)),
        )
        self.order = itertools.count()
        self.ids = itertools.count()
        self.busy = [False, False]
        #: rid -> (client, shape, when it was sent, verdict or None while running)
        self.results: dict[str, list[Any]] = {}

    def send(self, who: int, shape: str) -> None:
        if self.busy[who]:
            return
        self.busy[who] = True
        rid = f"c{who}-{next(self.ids)}"
        entry = self.results[rid] = [who, shape, next(self.order), None]
        headers = [(b"Host", b"up"), (b"X-Request-Id", rid.encode()), (b"X-Hostile-Shape", shape.encode())]
        d = self.client.send(b"POST", ORIGIN, b"/completion", headers, b"{}")

        def got(response: Any) -> None:
            pieces: list[bytes] = []

            class Body:
                def body_data(self, data: bytes) -> None:
                    pieces.append(data)

                def body_done(self, failure: Failure | None) -> None:
                    self_done(response.code, b"".join(pieces), failure is None)

            response.deliver(Body())

        def self_done(code: int | None, body: bytes, complete: bool) -> None:
            entry[3] = verdict(rid, SHAPES[shape], code, body, complete)
            self.busy[who] = False

        def failed(failure: Failure) -> None:
            entry[3] = "502"
            self.busy[who] = False

        d.addCallbacks(got, failed)

    def settle(self) -> None:
        for _ in range(20):
            self.net.flush()
            self.net.advance(DELAY)
        self.net.flush()


steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 1), st.sampled_from(PROMPT_SHAPES + ["normal"] * 4)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("advance"), st.sampled_from([0.001, DELAY / 5, DELAY, 1.0])),
    ),
    min_size=1,
    max_size=40,
)


def run(world: World, plan: list[tuple[Any, ...]]) -> None:
    for step in plan:
        if step[0] == "send":
            world.send(step[1], step[2])
        elif step[0] == "flush":
            world.net.flush()
        else:
            world.net.advance(step[1])
            world.net.flush()  # a real socket is peeked before each write: what arrived is seen first
    world.settle()


def allowed(shape: str, got: str) -> bool:
    expected = SHAPES[shape]
    if got == "502":
        return True
    if expected in ("204", "304"):
        return got == "own"
    return got == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_interleaved_hostile_answers_on_a_pool_of_two_never_reach_another_client(plan):
    """Whatever the order of sends, reads and time, with the shapes whose extra bytes paddler can see
    (with the answer, or on an idle connection): no client ever gets another's answer, each gets what
    its shape allows, and every request ends."""
    world = World(suspect=0.0)  # the framing and reuse rules alone, without the suspect period
    run(world, plan)
    for rid, (_, shape, _, got) in world.results.items():
        assert got is not None, (rid, shape)
        assert got != "cross", (rid, shape)
        assert allowed(shape, got), (rid, shape, got)


late_steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 1), st.sampled_from(sorted(SHAPES))),
        st.tuples(st.just("advance"), st.sampled_from([0.001, DELAY / 5, DELAY, 1.0])),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(late_steps)
def test_once_an_upstream_is_caught_no_later_request_is_cross_delivered(plan):
    """With every shape, late ones included (bytes written after the next request went out cannot be
    told from its answer), as in production: from the first dropped connection on, every request sent
    gets its own answer or a 502 -- the upstream no longer has a used connection to poison."""
    world = World(suspect=600.0)
    run(world, plan)
    first_drop = world.drops[0] if world.drops else None
    for rid, (_, shape, sent, got) in world.results.items():
        assert got is not None, (rid, shape)
        if first_drop is not None and sent > first_drop:
            assert got != "cross" and allowed(shape, got), (rid, shape, got)
