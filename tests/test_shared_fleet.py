"""Three balancers sharing one fleet through a slot store (in memory, on a Clock): membership,
one prober per upstream, atomic leases and one FIFO across balancers, the store going away
and coming back."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from zope.interface import implementer

from paddler.errors import BufferTimeout
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import SlotsSeen, Upstream, UpstreamState, upstream_id
from paddler.interfaces import IUpstreamProber
from paddler.llamacpp.slots import SlotReading
from paddler.routing.policies import MostIdleSlotsChooser
from paddler.sharedstate.fleet import SharedFleet, SharedProber, rendezvous
from paddler.sharedstate.memory import MemorySlotState, MemorySlotStore

A_URL, B_URL = "http://10.0.0.1:8080", "http://10.0.0.2:8080"


@implementer(IUpstreamProber)
class ScriptedProber:
    """Reads what the test says each upstream has, like HTTPProber: observe + on_reading."""

    def __init__(self, pool: UpstreamPool, slots: dict[str, tuple[int, int]]) -> None:
        self.pool = pool
        self.slots = slots  # url -> (total, busy)
        self.on_reading: Any = None
        self.probed: list[str] = []

    def probe(self, upstream: Upstream) -> Any:
        from twisted.internet.defer import succeed

        self.probed.append(upstream.url)
        total, busy = self.slots[upstream.url]
        mark = upstream.probe_mark()
        reading = SlotReading(total, busy, "slots", (), None, mark)
        if self.on_reading is not None:
            self.on_reading(upstream, reading)
        self.pool.observe(upstream, SlotsSeen(total, busy, mark))
        return succeed(None)


class Balancer:
    def __init__(self, world: World, name: str, static: list[str]) -> None:
        self.pool = UpstreamPool(world.clock, MostIdleSlotsChooser(), max_buffered=10, buffer_timeout=5.0)
        self.store = MemorySlotStore(world.state, name, lease_ttl=3.0, reap_interval=0.5)
        self.fleet = SharedFleet(
            self.pool, self.store, world.clock, static_ids=frozenset(upstream_id(u) for u in static)
        )
        self.pool.shared = self.fleet
        self.inner = ScriptedProber(self.pool, world.slots)
        self.prober = SharedProber(self.inner, self.fleet)
        for url in static:
            self.pool.add(Upstream(url, source="static", clock=world.clock))
        self.fleet.startService()

    def probe_all(self) -> None:
        for upstream in list(self.pool.upstreams.values()):
            self.prober.probe(upstream)


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000)
        self.state = MemorySlotState(self.clock)
        self.slots: dict[str, tuple[int, int]] = {A_URL: (2, 0), B_URL: (1, 0)}
        self.balancers: list[Balancer] = []

    def add(self, name: str, static: list[str]) -> Balancer:
        balancer = Balancer(self, name, static)
        self.balancers.append(balancer)
        return balancer

    def sync(self, seconds: float = 0.3) -> None:
        self.clock.advance(seconds)

    def stop(self) -> None:
        for balancer in self.balancers:
            balancer.fleet.stopService()
            balancer.pool.stop()


@pytest.fixture
def world():
    w = World()
    yield w
    w.stop()


def three(world: World) -> list[Balancer]:
    balancers = [world.add("a", [A_URL]), world.add("b", [B_URL]), world.add("c", [])]
    world.sync()
    for balancer in balancers:
        balancer.probe_all()
    world.sync()
    return balancers


def test_every_balancer_learns_every_upstream_and_its_figures(world):
    """a registers A, b registers B, c registers nothing: after a sync all three know both, healthy."""
    balancers = three(world)
    for balancer in balancers:
        assert sorted(u.url for u in balancer.pool.upstreams.values()) == [A_URL, B_URL]
        assert all(u.state is UpstreamState.HEALTHY for u in balancer.pool.upstreams.values())
        assert balancer.pool.totals()["slots_total"] == 3


def test_each_upstream_is_probed_by_exactly_one_balancer(world):
    balancers = three(world)
    for url in (A_URL, B_URL):
        uid = upstream_id(url)
        probers = [b for b in balancers if b.fleet.probes(b.pool.upstreams[uid])]
        assert len(probers) == 1
        assert probers[0].store.owner == rendezvous(("a", "b", "c"), uid)
    for balancer in balancers:
        balancer.inner.probed.clear()
        balancer.probe_all()
    assert sorted(url for b in balancers for url in b.inner.probed) == [A_URL, B_URL]


def test_leases_across_three_balancers_never_exceed_the_slots_and_wait_in_one_fifo(world):
    """Three slots in all; six requests, two per balancer: three granted, three wait, served oldest first
    as slots free through any balancer."""
    balancers = three(world)
    granted: list[tuple[str, Any]] = []
    order: list[str] = []
    for round_ in range(2):
        for balancer in balancers:
            name = f"{balancer.store.owner}{round_}"
            order.append(name)
            d = balancer.pool.acquire()
            d.addCallback(lambda lease, name=name: granted.append((name, lease)) or lease)
    world.sync(0.05)
    assert len(granted) == 3
    busy = Counter(lease.upstream.url for _, lease in granted)
    assert busy == {A_URL: 2, B_URL: 1}
    waiting = order[3:]
    while len(granted) < 6:
        _, lease = granted[len(granted) - 3]  # free the oldest running one, through its own balancer
        lease.release()
        world.sync(0.05)
        busy = Counter(
            lease.upstream.url for _, lease in granted if not lease.released
        )
        assert busy[A_URL] <= 2 and busy[B_URL] <= 1
    assert [name for name, _ in granted[3:]] == waiting


def test_a_freed_slot_wakes_a_request_waiting_on_another_balancer_at_once(world):
    balancers = three(world)
    leases = [balancers[0].pool.acquire() for _ in range(3)]
    held = [d.result for d in leases]
    waiting = balancers[2].pool.acquire()
    assert not waiting.called
    held[0].release()  # through balancer a
    assert waiting.called and waiting.result.upstream.url == held[0].upstream.url


def test_a_waiting_request_cancelled_by_its_client_leaves_the_shared_buffer(world):
    balancers = three(world)
    held = [balancers[0].pool.acquire().result for _ in range(3)]
    gone = balancers[1].pool.acquire()
    stays = balancers[2].pool.acquire()
    gone.addErrback(lambda f: f.trap(CancelledError))
    gone.cancel()
    world.sync(0.05)
    held[0].release()
    assert stays.called and stays.result.upstream.url == held[0].upstream.url


def test_a_wait_past_the_buffer_timeout_is_a_504(world):
    balancers = three(world)
    [balancers[0].pool.acquire() for _ in range(3)]
    late = balancers[1].pool.acquire()
    failures: list[Any] = []
    late.addErrback(failures.append)
    world.sync(5.1)
    assert failures and failures[0].check(BufferTimeout)


def test_drains_and_removals_travel_to_every_balancer(world):
    a, b, c = three(world)
    uid = upstream_id(B_URL)
    a.pool.drain(uid, requested=True)
    world.sync()
    assert b.pool.upstreams[uid].draining and c.pool.upstreams[uid].draining
    api = upstream_id(A_URL)
    # b did not configure A: a removal there reaches a and c, but a registers its static A again
    b.pool.remove(api)
    world.sync()
    world.sync()
    assert api in a.pool.upstreams and api in b.pool.upstreams and api in c.pool.upstreams
    registered = c.pool.add(Upstream("http://10.0.0.3:8080", "api-one", source="api", clock=world.clock))
    world.sync()
    assert registered.id in a.pool.upstreams and a.pool.upstreams[registered.id].source == "api"
    c.pool.remove(registered.id)
    world.sync()
    assert registered.id not in a.pool.upstreams and registered.id not in b.pool.upstreams


def test_with_the_store_down_each_balancer_takes_only_its_share_then_running_requests_are_adopted(world):
    """Store down: a and b each take at most ceil(2/3) = 1 slot of A; back up: the running ones become shared."""
    a, b, c = three(world)
    world.state.set_available(False)
    world.sync()
    assert not a.fleet.up
    uid = upstream_id(A_URL)
    local = [a.pool.acquire() for _ in range(2)]
    on_a = [d.result for d in local if d.called and d.result.upstream.id == uid]
    assert len(on_a) <= 1
    health = a.pool.health()[1]
    assert health["shared_state"]["up"] is False
    world.state.set_available(True)
    world.sync(0.3)
    assert a.pool.health()[1]["shared_state"]["settling"] is True
    for balancer in (a, b, c):
        balancer.probe_all()  # fresh readings end the settling
    world.sync(0.3)
    assert a.fleet.up and a.pool.health()[1]["shared_state"]["settling"] is False
    assert {lease_id for lease_id in a.store.leases} and not a.fleet._fallback
    for d in local:
        if d.called:
            d.result.release()
    for d in local:
        d.addErrback(lambda f: None)


def test_an_agent_reporting_to_another_balancer_keeps_its_upstream_alive(world):
    """The age of the last report anywhere (the store's reading time) is what expiry looks at."""
    a, b, c = three(world)
    uid = upstream_id(A_URL)
    assert a.fleet.report_age(uid) is not None and a.fleet.report_age(uid) < 1.0
    world.sync(2.0)
    assert a.fleet.report_age(uid) >= 1.9


def test_a_shared_buffer_timeout_says_whether_a_retry_is_useful(world):
    """The shared path's 504 carries x-should-retry like the local one (no slot freed: false)."""
    balancers = three(world)
    [balancers[0].pool.acquire() for _ in range(3)]
    late = balancers[1].pool.acquire()
    failures: list[Any] = []
    late.addErrback(failures.append)
    world.sync(5.1)
    assert failures[0].value.headers[b"x-should-retry"] == b"false"


def test_requests_waiting_in_the_shared_buffer_wait_here_when_the_store_goes_away(world):
    """Store down: c's two waiting requests leave the shared FIFO (in order) for c's own buffer and take a
    slot that frees, within c's share; their deadline stays the one they had."""
    a, b, c = three(world)
    held = [a.pool.acquire().result for _ in range(3)]  # every slot of A (2) and B (1)
    first, second = c.pool.acquire(), c.pool.acquire()
    assert not first.called and len(c.store.waiters) == 2
    world.sync(1.0)
    world.state.set_available(False)
    world.sync()
    assert not c.fleet.up and c.store.waiters == {} and c.pool.health()[1]["requests_buffered"] == 2
    on_a = next(lease for lease in held if lease.upstream.url == A_URL)
    on_a.release()
    world.slots.update({A_URL: (2, 1), B_URL: (1, 1)})  # what c's own probes see now
    c.probe_all()
    assert first.called and first.result.upstream.url == A_URL and not second.called
    failures: list[Any] = []
    second.addErrback(failures.append)
    world.sync(5.0 - 1.3 + 0.1)  # the 5 s buffer timeout counts from when it began waiting
    assert failures and failures[0].check(BufferTimeout)
    first.result.release()


def test_requests_waiting_here_join_the_shared_buffer_when_the_store_answers_again(world):
    """Back up: the requests c buffered while the store was down wait in the shared FIFO, oldest first, and
    the slots they get are leases the store counts (none taken behind its back)."""
    a, b, c = three(world)
    held = [a.pool.acquire().result for _ in range(3)]
    world.sync(1.0)  # every balancer's last view has them
    world.state.set_available(False)
    world.sync()
    early, late = c.pool.acquire(), c.pool.acquire()
    assert not early.called and c.pool.health()[1]["requests_buffered"] == 2
    world.state.set_available(True)
    world.sync(0.3)
    assert c.fleet.settling and not c.fleet.up and not early.called  # no slot until fresh readings
    world.slots.update({A_URL: (2, 2), B_URL: (1, 1)})
    for balancer in (a, b, c):
        balancer.probe_all()
    world.sync(0.3)
    assert c.fleet.up and [w.id for w in sorted(c.store.waiters.values(), key=lambda w: w.seq)] == list(c.store.waiters)
    assert len(c.store.waiters) == 2 and c.pool.health()[1]["requests_buffered"] == 2
    held[0].release()
    assert early.called and not late.called
    assert early.result.upstream.id in {lease.server_id for lease in c.store.leases.values()}
    assert sum(1 for rec in world.state.lease.values()) == 3  # two of a's, one of c's: no slot above A and B
    early.result.release()
    assert late.called
    late.result.release()


def test_a_request_handed_to_the_shared_buffer_can_still_be_cancelled_by_its_client(world):
    a, b, c = three(world)
    [a.pool.acquire().result for _ in range(3)]
    world.sync(1.0)
    world.state.set_available(False)
    world.sync()
    leaving = c.pool.acquire()
    world.state.set_available(True)
    world.sync(3.1)  # no reading came: the settling ends at its deadline
    assert c.fleet.up and len(c.store.waiters) == 1
    leaving.addErrback(lambda f: f.trap(CancelledError))
    leaving.cancel()
    assert c.store.waiters == {} and c.pool.health()[1]["requests_buffered"] == 0


def test_leases_taken_before_the_first_snapshot_are_counted_by_the_store(world, monkeypatch):
    """A balancer serves from the moment it starts; what it started after its link came up but before it
    first read the store's snapshot is adopted once it has (it was not: the link's "up" came first)."""
    from twisted.internet.defer import fail

    from paddler.sharedstate.errors import StoreTimeout

    world.state.set_available(False)
    a = world.add("a", [A_URL])
    a.probe_all()
    monkeypatch.setattr(MemorySlotStore, "snapshot", lambda self: fail(StoreTimeout("slow")))
    world.state.set_available(True)  # the link comes up; the first snapshot is still to come
    assert a.store.is_up and not a.fleet.up
    early = a.pool.acquire().result
    monkeypatch.undo()
    world.sync(1.0)
    assert a.fleet.up
    assert [lease.server_id for lease in a.store.leases.values()] == [early.upstream.id]
    early.release()
    assert a.store.leases == {}


def test_a_request_whose_client_left_but_llama_cpp_goes_on_keeps_its_slot_busy_in_the_store(world):
    """A non-streaming request's client leaves (release with still_running): llama.cpp goes on, so the
    store must not hand the slot to the request waiting on another balancer until a reading says it is
    free (it did at once: A ran 3 requests on 2 slots; found by a property test)."""
    a, b, c = three(world)
    held = [a.pool.acquire().result for _ in range(3)]
    waiting = c.pool.acquire()
    on_a = next(lease for lease in held if lease.upstream.url == A_URL)
    on_a.release(still_running=True)
    assert not waiting.called  # the slot is still busy in llama.cpp
    world.slots[A_URL] = (2, 2)  # the abandoned request still runs
    a.probe_all(), b.probe_all(), c.probe_all()
    world.sync(0.3)
    assert not waiting.called
    world.slots[A_URL] = (2, 1)  # now it has finished
    for balancer in (a, b, c):
        balancer.probe_all()
    assert waiting.called and waiting.result.upstream.url == A_URL
    waiting.result.release()


def test_stopping_a_balancer_answers_its_requests_in_the_shared_buffer_at_once(world):
    """SIGTERM answers buffered requests 503 at once: those waiting in the shared FIFO too (they waited for
    a slot and were served during the shutdown, or cut at its end), and they leave the FIFO."""
    from paddler.errors import ShuttingDown

    a, b, c = three(world)
    [a.pool.acquire().result for _ in range(3)]
    waiting = [c.pool.acquire() for _ in range(2)]
    failures: list[Any] = []
    for d in waiting:
        d.addErrback(failures.append)
    assert len(world.state.w) == 2
    c.pool.stop()
    assert [f.check(ShuttingDown) for f in failures] == [ShuttingDown, ShuttingDown]
    assert world.state.w == {} and c.store.waiters == {}


def test_a_request_served_while_the_others_are_handed_to_the_shared_buffer_is_not_queued_again(world):
    """The first request handed over is granted and ends at once; the slot it gives back serves the
    second before the hand-over reaches it: the second must not also join the shared FIFO (a phantom
    waiter nobody can cancel; found by a second read of the change)."""
    a, b, c = three(world)
    held = [a.pool.acquire().result for _ in range(3)]
    world.sync(1.0)
    world.state.set_available(False)
    world.sync()
    first, second = c.pool.acquire(), c.pool.acquire()
    first.addCallback(lambda lease: lease.release())  # a request that ends at once
    world.state.set_available(True)
    world.sync(0.3)
    held[0].release()
    world.slots.update({A_URL: (2, 1), B_URL: (1, 1)})
    for balancer in (a, b, c):
        balancer.probe_all()
    world.sync(0.3)  # fresh readings: settled, the hand-over
    assert c.fleet.up and first.called and second.called
    assert c.store.waiters == {} and world.state.w == {}
    second.result.release()
