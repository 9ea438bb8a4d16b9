"""Three balancers sharing two upstreams through a slot store that goes away and comes back, as a
property: clients ask for slots on any balancer, finish, leave while they wait; the store goes
away and comes back; time passes; balancers probe (and the probes tell the truth: the requests
holding a lease on each upstream, across the balancers, capped at its slots).

After every step:

- every request still waiting began waiting at most the buffer timeout (5 s) plus 1 s ago:
  nothing hangs, whether or not the store went away meanwhile; none times out early;
- a lease granted through the store never puts more requests on its upstream than its slots plus
  the leases taken during an outage that the store does not count yet (outages over-commit, by
  design; once every balancer adopted its outage leases the store grants nothing until enough of
  them ended);
- a lease a balancer takes on its own while the store is away keeps that balancer within its share
  of the upstream (slots / balancers, rounded up), so the fleet never runs more than slots +
  balancers x share on an upstream;
- a request fails only with a buffer error (full, timed out, disabled), or as cancelled when its
  client left;
- nothing was logged as a failure or at critical level (unhandled Deferred errors included).

At the end the store answers and every request settles: the store counts exactly the requests
running on each upstream; then every lease is released: no lease, waiter or pending release is left
in the store, in any balancer or in any pool, and stopping the balancers leaves no timer behind.

Two stricter properties, each with the smallest example that broke it (both found by this test,
both fixed): a slot whose client left while llama.cpp goes on with the request is not handed on
before a reading says it is free; and no lease granted through the store right after an outage puts
an upstream above its slots (a balancer back from an outage waits for fresh readings first; the
final phase has every balancer probe once a second, as running ones do).
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

from paddler.errors import BufferFull, BufferingDisabled, BufferTimeout
from paddler.fleet.pool import Lease

from .test_shared_fleet import A_URL, B_URL, Balancer, World, three

SLOTS = {A_URL: 2, B_URL: 1}
BALANCERS = 3
BUFFER_TIMEOUT = 5.0
SLACK = 1.0

acquire = st.tuples(st.just("acquire"), st.integers(0, BALANCERS - 1))
release = st.tuples(st.just("release"), st.integers(0, 20))
leave = st.tuples(st.just("leave"), st.integers(0, 20))
down = st.tuples(st.just("down"))
up = st.tuples(st.just("up"))
# 0.05 s to 1.5 s: syncs (0.25 s), polls, renewals (1 s), reaps, lease ttl (3 s) and buffer timeouts (5 s) all happen
advance = st.tuples(st.just("advance"), st.integers(1, 30).map(lambda n: round(n * 0.05, 2)))
probe = st.tuples(st.just("probe"), st.integers(0, BALANCERS - 1))
steps = st.lists(
    st.one_of(acquire, acquire, acquire, release, release, leave, down, up, advance, advance, advance, probe),
    min_size=20,
    max_size=80,
)
# the client of a running non-streaming request leaves (llama.cpp goes on); llama.cpp finishes one of those
leave_running = st.tuples(st.just("leave_running"), st.integers(0, 20))
finish_ghost = st.tuples(st.just("finish_ghost"), st.integers(0, 20))
steps_with_clients_leaving_running_requests = st.lists(
    st.one_of(acquire, acquire, acquire, release, leave_running, finish_ghost, leave, advance, advance, probe),
    min_size=10,
    max_size=60,
)


def share(url: str) -> int:
    return math.ceil(SLOTS[url] / BALANCERS)


@dataclass
class Request:
    number: int
    balancer: int
    started: float
    deferred: Deferred[Lease]
    lease: Lease | None = None
    failure: Failure | None = None
    left: bool = False

    @property
    def settled(self) -> bool:
        return self.lease is not None or self.failure is not None


class Run:
    """
    One example: the world, its requests, and what went wrong (checked after every step).

    @param strict: a lease granted through the store must not put more requests on its upstream than
        it has slots even while leases taken during an outage are still to be adopted.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.world = World()
        self.balancers: list[Balancer] = three(self.world)
        self.requests: list[Request] = []
        self.held: list[Request] = []
        self.ghosts: list[str] = []  # upstreams running a request whose client left (llama.cpp goes on)
        self.problems: list[str] = []
        self.logged: list[str] = []

        @provider(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") == LogLevel.critical or "log_failure" in event:
                failure = event.get("log_failure")
                self.logged.append(formatEvent(event) + ("\n" + failure.getTraceback() if failure else ""))

        self.observer = observe
        globalLogPublisher.addObserver(observe)

    @property
    def now(self) -> float:
        return self.world.clock.seconds()

    def holders(self, url: str) -> int:
        return sum(1 for request in self.held if request.lease is not None and request.lease.upstream.url == url)

    def running(self, url: str) -> int:
        """What the server runs: the requests holding a lease, and those whose client left meanwhile."""
        return self.holders(url) + self.ghosts.count(url)

    def not_adopted(self, upstream_id: str) -> int:
        """Leases taken while the store was away that it does not count yet (not adopted)."""
        return sum(
            1
            for balancer in self.balancers
            for server_id, lease in balancer.fleet._fallback.values()
            if server_id == upstream_id and not lease.released
        )

    # -- steps --------------------------------------------------------------

    def acquire(self, index: int) -> None:
        balancer = self.balancers[index]
        request = Request(len(self.requests), index, self.now, balancer.pool.acquire())
        self.requests.append(request)
        request.deferred.addCallbacks(self._granted, self._failed, callbackArgs=(request,), errbackArgs=(request,))

    def _granted(self, lease: Lease, request: Request) -> None:
        request.lease = lease
        self.held.append(request)
        balancer = self.balancers[request.balancer]
        url = lease.upstream.url
        if balancer.fleet.up:
            unknown = 0 if self.strict else self.not_adopted(lease.upstream.id)
            if self.running(url) > SLOTS[url] + unknown:
                self.problems.append(
                    f"request {request.number} got {url} through the store with {self.running(url)} requests "
                    f"running on its {SLOTS[url]} slots ({self.not_adopted(lease.upstream.id)} taken during an "
                    f"outage not adopted yet, {self.ghosts.count(url)} whose client left)"
                )
        else:
            held_here = balancer.pool.upstreams[lease.upstream.id].slots_held
            if held_here > share(url):
                self.problems.append(
                    f"request {request.number} got {url} on its own with balancer {request.balancer} holding "
                    f"{held_here} slots there, above its share {share(url)}"
                )

    def _failed(self, failure: Failure, request: Request) -> None:
        request.failure = failure
        if failure.check(BufferTimeout) and self.now - request.started < BUFFER_TIMEOUT - 0.01:
            self.problems.append(f"request {request.number} timed out after {self.now - request.started:.2f} s")
        if failure.check(BufferFull, BufferTimeout, BufferingDisabled):
            return
        if failure.check(CancelledError) and request.left:
            return
        self.problems.append(f"request {request.number} failed with {failure.getErrorMessage()!r} ({failure.type})")

    def release(self, index: int) -> None:
        if self.held:
            request = self.held.pop(index % len(self.held))
            assert request.lease is not None
            request.lease.release()

    def leave_running(self, index: int) -> None:
        """The client of a running non-streaming request left; llama.cpp goes on with it."""
        if self.held:
            request = self.held.pop(index % len(self.held))
            assert request.lease is not None
            self.ghosts.append(request.lease.upstream.url)
            request.lease.release(still_running=True)

    def finish_ghost(self, index: int) -> None:
        if self.ghosts:
            self.ghosts.pop(index % len(self.ghosts))

    def leave(self, index: int) -> None:
        waiting = [request for request in self.requests if not request.settled]
        if waiting:
            request = waiting[index % len(waiting)]
            request.left = True
            request.deferred.cancel()

    def probe(self, index: int) -> None:
        for url, slots in SLOTS.items():
            self.world.slots[url] = (slots, min(slots, self.running(url)))
        self.balancers[index].probe_all()

    def step(self, operation: tuple[Any, ...]) -> None:
        kind = operation[0]
        if kind == "down":
            self.world.state.set_available(False)
        elif kind == "up":
            self.world.state.set_available(True)
        elif kind == "advance":
            self.world.clock.advance(operation[1])
        else:
            getattr(self, kind)(operation[1])

    # -- checks ---------------------------------------------------------------

    def check(self, after: str) -> None:
        for request in self.requests:
            if not request.settled and self.now - request.started > BUFFER_TIMEOUT + SLACK:
                self.problems.append(
                    f"request {request.number} on balancer {request.balancer} still waits "
                    f"{self.now - request.started:.2f} s after it began"
                )
        for url, slots in SLOTS.items():
            bound = slots + BALANCERS * share(url)
            if self.holders(url) > bound:
                self.problems.append(f"{self.holders(url)} requests hold {url} ({slots} slots, bound {bound})")
        assert not self.problems, f"after {after}: " + "; ".join(self.problems)
        assert not self.logged, f"after {after}: logged\n" + "\n".join(self.logged)

    def settle_and_check_nothing_leaks(self) -> None:
        world = self.world
        world.state.set_available(True)
        for tick in range(int((BUFFER_TIMEOUT + 2 * SLACK) / 0.25)):
            world.clock.advance(0.25)
            if tick % 4 == 3:  # every balancer probes once a second, as a running one does
                for index in range(BALANCERS):
                    self.probe(index)
        self.check("the store came back and every request settled")
        assert all(request.settled for request in self.requests)
        for url in SLOTS:
            counted = sum(1 for rec in world.state.lease.values() if rec[0] == self._id(url))
            assert counted == self.holders(url), f"the store counts {counted} leases on {url}, {self.holders(url)} run"
        while self.held:
            self.release(0)
        self.ghosts.clear()
        for _ in range(16):
            world.clock.advance(0.25)
        for index in range(BALANCERS):
            self.probe(index)  # a probe settles the slots kept for clients that left
        self.check("every lease was released")
        assert world.state.lease == {} and world.state.leases == {} and world.state.w == {}
        for name, balancer in zip("abc", self.balancers):
            assert balancer.store.leases == {}, name
            assert balancer.store.waiters == {}, name
            assert not balancer.store._unsettled, name
            assert balancer.fleet._fallback == {} and balancer.fleet._homeless == [], name
            assert len(balancer.pool._waiters) == 0, name
            assert all(u.slots_held == 0 for u in balancer.pool.upstreams.values()), name

    def _id(self, url: str) -> str:
        return next(u.id for u in self.balancers[0].pool.upstreams.values() if u.url == url)

    def stop(self, check: bool = True) -> None:
        try:
            self.world.stop()
            gc.collect()  # an unhandled error in a Deferred is logged when it is collected
        finally:
            globalLogPublisher.removeObserver(self.observer)
        if not check:
            return
        assert not self.logged, "logged\n" + "\n".join(self.logged)
        assert self.world.clock.getDelayedCalls() == []


def play(operations: list[tuple[Any, ...]], strict: bool) -> None:
    run = Run(strict=strict)
    try:
        run.check("start")
        for number, operation in enumerate(operations):
            run.step(operation)
            run.check(f"step {number} {operation}")
        run.settle_and_check_nothing_leaks()
    except BaseException:
        run.stop(check=False)
        raise
    run.stop()


@settings(max_examples=int(os.environ.get("PADDLER_PROPERTY_EXAMPLES", "150")), deadline=None)
@given(steps)
def test_shared_fleet_through_outages_never_hangs_overcommits_past_its_bounds_or_leaks(operations):
    """Every request settles in time, the store never grants past the slots, outages stay within each
    balancer's share, and nothing is left behind once every request has ended."""
    play(operations, strict=False)


@settings(max_examples=50, deadline=None)
@example([("acquire", 0), ("acquire", 0), ("acquire", 0), ("release", 0), ("down",), ("acquire", 0), ("acquire", 1), ("up",)])
@given(steps)
def test_no_lease_granted_through_the_store_puts_an_upstream_above_its_slots_right_after_an_outage(operations):
    """a holds A, A, B and frees one A; the store goes away; a buffers a request (it holds its share of
    each), b takes the free A on its own; the store comes back: a's request was given A through the store
    before b's outage lease was adopted, and A ran 3 requests on 2 slots. Now each balancer back from an
    outage waits for readings of the fleet taken since (they count b's request) before taking slots."""
    play(operations, strict=True)


@settings(max_examples=50, deadline=None)
@example([("acquire", 0), ("acquire", 0), ("acquire", 0), ("acquire", 2), ("leave_running", 0)])
@given(steps_with_clients_leaving_running_requests)
def test_a_slot_still_running_for_a_client_that_left_is_not_handed_to_another_request(operations):
    """a holds every slot; c waits; a's client of a non-streaming request leaves (llama.cpp goes on with
    it): the store must not give that slot to c until a reading says it is free (it did at once, and the
    upstream ran one request more than its slots, until the release carried "still running")."""
    play(operations, strict=False)
