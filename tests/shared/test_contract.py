"""The slot store contract, checked on Redis (a real redis-server) and on the
in-memory fake alike, with three owners ("replicas") on one shared state."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, gatherResults
from zope.interface.verify import verifyObject

from paddler.sharedstate.errors import SharedBufferFull, IdInUse, InvalidArgument, NoFreeSlot, WaitExpired
from paddler.interfaces import ISlotStore
from paddler.sharedstate.model import Reading, Release
from paddler.sharedstate.store import SharedLease, Waiter

from .worlds import LEASE_TTL, OWNERS, MemoryWorld, RedisWorld, World


@pytest.fixture(params=["memory", "redis"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    if request.param == "memory":
        made: World = MemoryWorld()
    else:
        server = request.getfixturevalue("redis_server")
        made = RedisWorld(server.url, request.getfixturevalue("prefix"))
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def trio(world: World) -> list:
    return [world.add(owner) for owner in OWNERS]


def test_both_stores_provide_the_interface(world: World, trio: list) -> None:
    """Every store implements ISlotStore."""
    for store in trio:
        assert verifyObject(ISlotStore, store)


@pytest_twisted.ensureDeferred
async def test_registration_is_idempotent_and_a_restart_bumps_the_generation(world: World, trio: list) -> None:
    """Every replica may register the same server; only restarted=True starts a new generation."""
    a, b, c = trio
    assert await a.register_server("s1", 4, meta='{"url": "http://x:1"}') == 1
    assert await b.register_server("s1", 4) == 1
    assert await c.register_server("s1", 4, restarted=True) == 2
    snapshot = await a.snapshot()
    figures = snapshot.servers["s1"]
    assert (figures.total, figures.generation, figures.meta) == (4, 2, '{"url": "http://x:1"}')
    assert await a.unregister_server("s1") is True
    assert await a.unregister_server("s1") is False
    assert await b.register_server("s1", 2) == 3, "the generation survives removal"


@pytest_twisted.ensureDeferred
async def test_acquire_takes_the_first_ranked_candidate_with_a_free_slot(world: World, trio: list) -> None:
    """Candidates are ranked by the caller: the first one with a free slot wins."""
    a, b, _ = trio
    await a.register_server("s1", 1)
    await a.register_server("s2", 2)
    first = await a.acquire("r1", ["s1", "s2"])
    second = await b.acquire("r2", ["s1", "s2"])
    third = await b.acquire("r3", ["s2", "s1"])
    assert isinstance(first, SharedLease) and first.server_id == "s1"
    assert isinstance(second, SharedLease) and second.server_id == "s2"
    assert isinstance(third, SharedLease) and third.server_id == "s2"
    assert first.number < second.number < third.number


@pytest_twisted.ensureDeferred
async def test_a_slot_freed_by_one_owner_goes_to_the_oldest_waiter_of_any_owner(world: World, trio: list) -> None:
    """Global FIFO across owners: waiters of A, B and C are served in their enqueue order."""
    a, b, c = trio
    await a.register_server("s1", 1)
    held = await a.acquire("hold", ["s1"])
    waiters = []
    for i in range(6):
        store = trio[i % 3]
        waiter = await store.acquire(f"w{i}", ["s1"])
        assert isinstance(waiter, Waiter)
        assert waiter.position == i
        waiters.append(waiter)
    order = []
    current = held
    for _ in range(6):
        releaser = trio[random.Random(len(order)).randrange(3)]
        assert await releaser.release(current.id) is Release.RELEASED
        pending = [w for w in waiters if w.id not in order]
        granted = await world.settle(pending[0].deferred)
        assert all(not w.deferred.called for w in pending[1:]), "only the oldest waiter gets the slot"
        order.append(granted.id)
        current = granted
    assert order == [f"w{i}" for i in range(6)]
    snapshot = await a.snapshot()
    assert snapshot.waiting == 0 and snapshot.servers["s1"].leased == 1


@pytest_twisted.ensureDeferred
async def test_a_newcomer_does_not_overtake_an_older_waiter(world: World, trio: list) -> None:
    """The freed slot goes to the queued request; a request arriving after the release waits."""
    a, b, c = trio
    await a.register_server("s1", 1)
    await a.register_server("s2", 1)
    held = await a.acquire("hold", ["s1"])
    other = await a.acquire("other", ["s2"])
    old = await b.acquire("old", ["s1"])
    assert isinstance(old, Waiter)
    await a.release(held.id)
    newcomer = await c.acquire("new", ["s1", "s2"])
    granted = await world.settle(old.deferred)
    assert granted.server_id == "s1"
    assert isinstance(newcomer, Waiter), "s1 went to the older waiter and s2 is busy"
    await a.release(other.id)
    assert (await world.settle(newcomer.deferred)).server_id == "s2"


@pytest_twisted.ensureDeferred
async def test_a_waiter_that_cannot_use_a_server_does_not_block_others(world: World, trio: list) -> None:
    """An older waiter for s1 only does not stop a newcomer from taking a free slot on s2."""
    a, b, _ = trio
    await a.register_server("s1", 1)
    await a.register_server("s2", 1)
    await a.acquire("hold", ["s1"])
    waiting = await b.acquire("only-s1", ["s1"])
    assert isinstance(waiting, Waiter)
    lease = await a.acquire("any", ["s1", "s2"])
    assert isinstance(lease, SharedLease) and lease.server_id == "s2"


@pytest_twisted.ensureDeferred
async def test_no_server_is_ever_above_its_slots_under_concurrent_acquires(world: World, trio: list) -> None:
    """Seeded random rounds of concurrent acquires and releases from three owners: leases never exceed slots."""
    rng = random.Random(15)
    totals = {"s1": 1, "s2": 2, "s3": 3}
    for server, total in totals.items():
        await trio[0].register_server(server, total)
    held: dict[str, tuple] = {}  # id -> (store, server)
    waiting: dict[str, tuple] = {}
    peak: Counter[str] = Counter()
    counter = 0

    def granted(lease: SharedLease, store) -> SharedLease:
        held[lease.id] = (store, lease.server_id)
        waiting.pop(lease.id, None)
        busy = Counter(server for _, server in held.values())
        for server, count in busy.items():
            peak[server] = max(peak[server], count)
            assert count <= totals[server], f"{server} holds {count} leases for {totals[server]} slots"
        return lease

    for _ in range(25):
        jobs = []
        for _ in range(rng.randrange(1, 9)):
            if held and rng.random() < 0.45:
                lease_id = rng.choice(sorted(held))
                store, _ = held.pop(lease_id)
                jobs.append(store.release(lease_id))
                continue
            store = rng.choice(trio)
            counter += 1
            candidates = rng.sample(sorted(totals), rng.randrange(1, 4))
            request_id = f"r{counter}"

            def arrived(result, store=store):
                if isinstance(result, SharedLease):
                    return granted(result, store)
                waiting[result.id] = (store, result)
                result.deferred.addCallback(granted, store)
                result.deferred.addErrback(lambda f: f.trap(WaitExpired, CancelledError))
                return result

            jobs.append(store.acquire(request_id, candidates, wait=30.0, max_waiting=1000).addCallback(arrived))
        await gatherResults(jobs)
        snapshot = await trio[1].snapshot()
        for server, figures in snapshot.servers.items():
            assert figures.leased <= figures.total
    # drain everything: every waiter is eventually served, never above the slots
    for _ in range(200):
        if not held and not waiting:
            break
        for lease_id in sorted(held):
            store, _ = held.pop(lease_id)
            await store.release(lease_id)
        await world.wait(0.02)
    assert not waiting, f"waiters never served: {sorted(waiting)}"
    assert all(peak[server] <= total for server, total in totals.items())
    # then fill every server to its slots from the three owners in turn: the one request
    # more waits, and gets the slot freed through another owner
    for server, total in totals.items():
        owners = [trio[i % 3] for i in range(total + 1)]
        results = [
            await owner.acquire(f"fill-{server}-{i}", [server], wait=30.0, max_waiting=1000)
            for i, owner in enumerate(owners)
        ]
        assert all(isinstance(r, SharedLease) for r in results[:-1])
        last = results[-1]
        assert not isinstance(last, SharedLease), f"{server} gave a lease past its {total} slots"
        await owners[0].release(results[0].id)  # freed through the first owner, handed to the last
        handed = await last.deferred
        assert handed.server_id == server
        for owner, lease in zip(owners[1:], [*results[1:-1], handed]):
            await owner.release(lease.id)
    snapshot = await trio[2].snapshot()
    assert snapshot.waiting == 0 and snapshot.leases == 0


@pytest_twisted.ensureDeferred
async def test_a_dead_owners_leases_come_back_after_the_ttl_and_its_waiters_leave(world: World, trio: list) -> None:
    """Owner C stops renewing: REAP by A frees its lease for B's waiter; C's older waiter is skipped."""
    a, b, c = trio
    await a.register_server("s1", 1)
    await c.acquire("c-lease", ["s1"])
    c_waiter = await c.acquire("c-waiter", ["s1"])
    b_waiter = await b.acquire("b-waiter", ["s1"])
    assert (c_waiter.position, b_waiter.position) == (0, 1)
    c_waiter.deferred.addErrback(lambda f: f.trap(CancelledError))
    await c.stopService()  # dies: no renew, no release
    await world.wait(LEASE_TTL / 4)
    reaped = await a.reap()
    assert reaped.released == 0, "not expired yet"
    await world.wait(LEASE_TTL * 1.25)
    reaped = await a.reap()
    assert reaped.released == 1
    granted = await world.settle(b_waiter.deferred)
    assert granted.id == "b-waiter" and granted.waited > 0
    snapshot = await a.snapshot()
    assert snapshot.waiting == 0, "the dead owner's waiter left the order"
    assert snapshot.servers["s1"].leased == 1


@pytest_twisted.ensureDeferred
async def test_renewal_keeps_leases_past_their_ttl(world: World, trio: list) -> None:
    """A live owner's leases survive reaping for several ttls (the renew loop runs)."""
    a, b, _ = trio
    await a.register_server("s1", 2)
    lease = await a.acquire("kept", ["s1"])
    for _ in range(3):
        await world.wait(LEASE_TTL * 0.7)
        await b.reap()
    assert (await b.snapshot()).servers["s1"].leased == 1
    assert await lease.release() is Release.RELEASED


@pytest_twisted.ensureDeferred
async def test_releasing_a_lease_of_an_older_generation_adds_no_slot(world: World, trio: list) -> None:
    """After a server restart, leases of its old generation give nothing back when they end."""
    a, b, _ = trio
    await a.register_server("s1", 2)
    old1 = await a.acquire("old1", ["s1"])
    old2 = await b.acquire("old2", ["s1"])
    assert (await a.snapshot()).servers["s1"].idle == 0
    assert await b.register_server("s1", 2, restarted=True) == 2
    fresh = await a.acquire("fresh", ["s1"])
    assert fresh.generation == 2
    assert await old1.release() is Release.STALE
    assert await old2.release() is Release.STALE
    figures = (await a.snapshot()).servers["s1"]
    assert (figures.leased, figures.idle) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_a_reading_counts_leases_out_at_probe_time_as_part_of_busy(world: World, trio: list) -> None:
    """External load = busy minus our leases that were out when the probe was sent, never negative."""
    a, b, _ = trio
    await a.register_server("s1", 4)
    await a.acquire("r1", ["s1"])
    await b.acquire("r2", ["s1"])
    mark = await a.probe_mark()
    late = await b.acquire("r3", ["s1"])  # taken after the probe was sent: not in its busy count
    assert await a.reading("s1", 4, 3, mark) is Reading.APPLIED  # 2 ours + 1 other client
    figures = (await b.snapshot()).servers["s1"]
    assert (figures.external, figures.leased, figures.idle) == (1, 3, 0)
    with pytest.raises(NoFreeSlot):
        await a.acquire("r4", ["s1"], wait=0.0)
    await late.release()
    mark = await b.probe_mark()
    assert await b.reading("s1", 4, 0, mark) is Reading.APPLIED  # server says idle: nothing negative
    figures = (await a.snapshot()).servers["s1"]
    assert figures.external == 0 and figures.idle == 4 - figures.leased


@pytest_twisted.ensureDeferred
async def test_an_older_or_foreign_reading_is_ignored(world: World, trio: list) -> None:
    """A reading older than one applied, of another generation or of an unknown server changes nothing."""
    a, b, _ = trio
    await a.register_server("s1", 4)
    old_mark = await a.probe_mark()
    await a.acquire("r1", ["s1"])
    new_mark = await a.probe_mark()
    assert await a.reading("s1", 4, 2, new_mark) is Reading.APPLIED
    assert await b.reading("s1", 4, 4, old_mark) is Reading.STALE
    assert await b.reading("s1", 4, 4, new_mark, generation=7) is Reading.OTHER_GENERATION
    assert await b.reading("nope", 4, 4, new_mark) is Reading.UNKNOWN_SERVER
    assert await b.reading("s1", 4, 4, new_mark + 1000) is Reading.STALE
    assert (await a.snapshot()).servers["s1"].external == 1


@pytest_twisted.ensureDeferred
async def test_a_reading_that_frees_slots_serves_waiters_at_once(world: World, trio: list) -> None:
    """External load going away hands the slot to the oldest waiter in the same step."""
    a, b, _ = trio
    await a.register_server("s1", 2)
    mark = await a.probe_mark()
    await a.reading("s1", 2, 2, mark)
    waiter = await b.acquire("w", ["s1"])
    assert isinstance(waiter, Waiter)
    await a.reading("s1", 2, 1, await a.probe_mark())
    assert (await world.settle(waiter.deferred)).server_id == "s1"


@pytest_twisted.ensureDeferred
async def test_a_lease_released_while_its_request_runs_keeps_the_slot_until_a_reading(world: World, trio: list) -> None:
    """RELEASE running: the lease ends, the slot counts as external (no hand-off); the next reading decides."""
    a, b, _ = trio
    await a.register_server("s1", 1)
    lease = await a.acquire("r1", ["s1"])
    waiter = await b.acquire("w", ["s1"], wait=30.0)
    assert isinstance(lease, SharedLease) and isinstance(waiter, Waiter)
    assert await a.release("r1", running=True) is Release.RELEASED
    snapshot = await a.snapshot()
    assert snapshot.servers["s1"].leased == 0 and snapshot.servers["s1"].external == 1
    assert not waiter.deferred.called
    await a.reading("s1", 1, 1, await a.probe_mark())  # the server still runs it
    assert not waiter.deferred.called and (await a.snapshot()).servers["s1"].external == 1
    await a.reading("s1", 1, 0, await a.probe_mark())  # finished: handed to the waiter
    assert (await world.settle(waiter.deferred)).server_id == "s1"


@pytest_twisted.ensureDeferred
async def test_a_draining_server_takes_no_new_request_and_undraining_serves_waiters(world: World, trio: list) -> None:
    """DRAIN stops new leases (old ones stay); UNDRAIN hands free slots to waiters."""
    a, b, _ = trio
    await a.register_server("s1", 2)
    running = await a.acquire("running", ["s1"])
    assert await b.drain("s1") is True
    assert await b.drain("ghost") is False
    waiter = await a.acquire("w", ["s1"])
    assert isinstance(waiter, Waiter)
    snapshot = await a.snapshot()
    assert snapshot.servers["s1"].draining and snapshot.servers["s1"].idle == 0
    assert await a.undrain("s1") is True
    assert (await world.settle(waiter.deferred)).server_id == "s1"
    assert await running.release() is Release.RELEASED


@pytest_twisted.ensureDeferred
async def test_a_waiter_past_its_deadline_fails_and_leaves_the_queue(world: World, trio: list) -> None:
    """The buffer timeout holds fleet-wide: WaitExpired, and the queue forgets the waiter."""
    a, b, _ = trio
    await a.register_server("s1", 1)
    await a.acquire("hold", ["s1"])
    waiter = await b.acquire("late", ["s1"], wait=0.3)
    with pytest.raises(WaitExpired):
        await world.settle(waiter.deferred)
    assert (await a.snapshot()).waiting == 0


@pytest_twisted.ensureDeferred
async def test_a_cancelled_waiter_leaves_and_the_next_one_is_served(world: World, trio: list) -> None:
    """A client that left: its waiter goes, the slot goes to the next in line."""
    a, b, c = trio
    await a.register_server("s1", 1)
    held = await a.acquire("hold", ["s1"])
    gone = await b.acquire("gone", ["s1"])
    next_ = await c.acquire("next", ["s1"])
    gone.deferred.cancel()
    with pytest.raises(CancelledError):
        await gone.deferred
    await world.wait(0.05)
    await held.release()
    assert (await world.settle(next_.deferred)).id == "next"


@pytest_twisted.ensureDeferred
async def test_the_buffer_limit_is_fleet_wide_and_waiting_can_be_disabled(world: World, trio: list) -> None:
    """max_waiting counts every owner's waiters; wait=0 answers NoFreeSlot at once."""
    a, b, c = trio
    await a.register_server("s1", 1)
    await a.acquire("hold", ["s1"])
    await a.acquire("w1", ["s1"], max_waiting=2)
    await b.acquire("w2", ["s1"], max_waiting=2)
    with pytest.raises(SharedBufferFull):
        await c.acquire("w3", ["s1"], max_waiting=2)
    with pytest.raises(NoFreeSlot):
        await c.acquire("w4", ["s1"], wait=0)
    assert (await a.snapshot()).waiting == 2


@pytest_twisted.ensureDeferred
async def test_release_is_idempotent_and_ids_belong_to_their_owner(world: World, trio: list) -> None:
    """A second release does nothing; another owner cannot take over a live id."""
    a, b, _ = trio
    await a.register_server("s1", 2)
    lease = await a.acquire("mine", ["s1"])
    with pytest.raises(IdInUse):
        await b.acquire("mine", ["s1"])
    assert await lease.release() is Release.RELEASED
    assert await a.release("mine") is Release.UNKNOWN
    assert await b.release("never-was") is Release.UNKNOWN
    assert (await a.snapshot()).servers["s1"].leased == 0


@pytest_twisted.ensureDeferred
async def test_a_waiter_with_new_candidates_keeps_its_place(world: World, trio: list) -> None:
    """Waiter.update (the fleet changed) keeps the order and takes a free new candidate."""
    a, b, _ = trio
    await a.register_server("s1", 1)
    await a.acquire("hold", ["s1"])
    first = await a.acquire("first", ["s1"])
    second = await b.acquire("second", ["s1"])
    assert await first.update(["s1", "s9"]) is first
    assert first.position == 0
    await b.register_server("s9", 1)
    assert (await world.settle(first.deferred)).server_id == "s9"
    assert not second.deferred.called


@pytest_twisted.ensureDeferred
async def test_bad_arguments_are_refused_before_anything_is_written(world: World, trio: list) -> None:
    """Negative, huge, non-integer slot counts, overlong or odd ids and bad candidate lists: InvalidArgument, no write."""
    a, _, _ = trio
    await a.register_server("s1", 2)
    before = await a.snapshot()
    bad_calls = [
        lambda: a.register_server("s2", -1),
        lambda: a.register_server("s2", 10**9),
        lambda: a.register_server("s2", 2.5),
        lambda: a.register_server("s2", "4"),
        lambda: a.register_server("s2", True),
        lambda: a.register_server("x" * 129, 2),
        lambda: a.register_server("bad|id", 2),
        lambda: a.register_server("", 2),
        lambda: a.register_server("s2", 2, meta="m" * 5000),
        lambda: a.reading("s1", 2, -1, 0),
        lambda: a.reading("s1", 2, 2**40, 0),
        lambda: a.reading("s1", 2, 1, -5),
        lambda: a.acquire("r" * 200, ["s1"]),
        lambda: a.acquire("r1", ["s1", "s1"]),
        lambda: a.acquire("r1", "s1"),
        lambda: a.acquire("r1", [f"s{i}" for i in range(300)]),
        lambda: a.acquire("r1", ["s1"], wait=-1),
        lambda: a.acquire("r1", ["s1"], wait=float("nan")),
        lambda: a.acquire("r1", ["s1"], max_waiting=-1),
        lambda: a.acquire("r1", ["s1"], model="m" * 300),
        lambda: a.acquire("r,1", ["s1"]),
        lambda: a.release("a b"),
        lambda: a.reap(0),
    ]
    for call in bad_calls:
        with pytest.raises(InvalidArgument):
            await call()
    after = await a.snapshot()
    assert after.servers == before.servers and after.seq == before.seq and after.waiting == 0


@pytest_twisted.ensureDeferred
async def test_a_lost_lease_is_adopted_again_on_renewal(world: World, trio: list) -> None:
    """If the store reaped a live owner's lease (a long pause), RENEW finds it and ADOPT counts it again."""
    a, b, _ = trio
    await a.register_server("s1", 1)
    lease = await a.acquire("paused", ["s1"])
    await b.release("paused")  # as if reaped while A was paused
    assert (await b.snapshot()).servers["s1"].leased == 0
    assert await a.renew() == ["paused"]
    figures = (await b.snapshot()).servers["s1"]
    assert figures.leased == 1, "the request still runs there: counted again"
    assert await lease.release() is Release.RELEASED


@pytest_twisted.ensureDeferred
async def test_one_owner_at_a_time_places_a_model_and_a_placed_model_is_not_evicted_early(
    world: World, trio: list
) -> None:
    """Placement through the store: of two balancers claiming the same model at once exactly
    one wins; a model placed less than the residency ago may not be evicted by anyone; the claim
    is held a short while after the load so the others see the model loaded first."""
    a, b, c = trio
    won = await gatherResults([
        a.claim_placement("alpha", "r1-alpha", None, 5.0, 30.0),
        b.claim_placement("alpha", "r2-alpha", None, 5.0, 30.0),
    ])
    assert sorted(won) == [False, True], "exactly one balancer places alpha"
    winner, loser = (a, b) if won[0] else (b, a)
    assert await winner.claim_placement("alpha", "r1-alpha", None, 5.0, 30.0) is True, "a claim is the owner's"
    assert await c.claim_placement("beta", "r2-beta", None, 5.0, 30.0) is True, "another model: its own claim"
    placed = "r1-alpha" if won[0] else "r2-alpha"
    # evicting alpha on the router it was just placed on: refused to everyone, for the residency
    assert await c.claim_placement("gamma", "r9-gamma", placed, 5.0, 30.0) is False
    await winner.finish_placement("alpha", 1.0)
    assert await loser.claim_placement("alpha", "r3-alpha", None, 5.0, 30.0) is False, "held after the load"
    await world.wait(1.2)
    assert await loser.claim_placement("alpha", "r3-alpha", None, 5.0, 30.0) is True, "free after the hold"
    assert await c.claim_placement("gamma", "r9-gamma", placed, 5.0, 0.5) is True, "past the residency"


@pytest_twisted.ensureDeferred
async def test_placement_records_lapse_and_go_with_their_server(world: World, trio: list) -> None:
    """The store's placement records (when a model was placed on a server) do not grow without
    bound: one lapses after the longer of its claim's residency and hold (dropped by the next
    claim of any balancer, or by a reap), goes when a placement evicts its server's model, and
    when its server is unregistered (known to the store or not); so do the claims, once
    expired or finished."""
    a, b, c = trio
    assert await a.claim_placement("alpha", "r1-alpha", None, 0.5, 0.3) is True
    assert await b.claim_placement("beta", "r2-beta", None, 0.5, 30.0) is True
    assert await c.claim_placement("gamma", "r3-gamma", None, 0.5, 30.0) is True
    assert await world.placement_records() == {"r1-alpha", "r2-beta", "r3-gamma"}
    await world.wait(0.7)
    # another balancer's claim drops a's lapsed record; the others are within their residency
    assert await b.claim_placement("delta", "r4-delta", None, 0.5, 30.0) is True
    assert await world.placement_records() == {"r2-beta", "r3-gamma", "r4-delta"}
    # evicting beta (a residency of 0: allowed at once): its record goes, epsilon's comes
    assert await c.claim_placement("epsilon", "r2-epsilon", "r2-beta", 0.5, 0.0) is True
    assert await world.placement_records() == {"r2-epsilon", "r3-gamma", "r4-delta"}
    # the server goes: registered (gamma) or never (delta), its record goes too
    await a.register_server("r3-gamma", 2)
    assert await b.unregister_server("r3-gamma") is True
    assert await a.unregister_server("r4-delta") is False
    assert await world.placement_records() == {"r2-epsilon"}
    # the claims of alpha, beta and gamma (held 0.5 s) expired: delta's claim dropped them
    assert await world.placement_claims() == {"delta", "epsilon"}
    await world.wait(0.7)  # epsilon's record lapses (its hold, 0.5 s), as both claims: the reaper drops them
    reaped = await a.reap(100)
    assert reaped.placements_dropped == 1 + 2, reaped
    assert await world.placement_records() == set()
    assert await world.placement_claims() == set()
    assert (await a.reap(100)).placements_dropped == 0
    # a finished claim goes at once (hold 0), or when its hold after the load is over
    assert await a.claim_placement("zeta", "r5-zeta", None, 5.0, 0.0) is True
    assert await b.claim_placement("eta", "r6-eta", None, 5.0, 0.0) is True
    await a.finish_placement("zeta", 0.0)
    await b.finish_placement("eta", 0.3)
    assert await world.placement_claims() == {"eta"}
    await world.wait(0.5)
    assert (await c.reap(100)).placements_dropped == 1
    assert await world.placement_claims() == set()


@pytest_twisted.ensureDeferred
async def test_a_placement_claim_of_a_dead_balancer_expires(world: World, trio: list) -> None:
    """A balancer that claimed a model and died does not block its placement past the hold."""
    a, b, _ = trio
    assert await a.claim_placement("alpha", "r1-alpha", None, 0.5, 30.0) is True
    assert await b.claim_placement("alpha", "r2-alpha", None, 0.5, 30.0) is False
    await world.wait(0.7)
    assert await b.claim_placement("alpha", "r2-alpha", None, 0.5, 30.0) is True


@pytest_twisted.ensureDeferred
async def test_bad_placement_arguments_are_refused(world: World, trio: list) -> None:
    """A bad model, server or hold is an InvalidArgument, nothing written."""
    a = trio[0]
    for args in [("", "s1", None, 5.0, 1.0), ("alpha", "bad id", None, 5.0, 1.0),
                 ("alpha", "s1", "bad id", 5.0, 1.0), ("alpha", "s1", None, 0.0, 1.0),
                 ("alpha", "s1", None, 5.0, -1.0)]:
        with pytest.raises(InvalidArgument):
            await a.claim_placement(*args)
    assert await trio[1].claim_placement("alpha", "s1", None, 5.0, 1.0) is True
