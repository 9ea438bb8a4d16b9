"""Draining and removal in the pool: no new requests, in-flight ones finish, then removal."""

from __future__ import annotations

from twisted.internet.task import Clock

from .helpers import healthy_upstream, make_pool


def results_of(d):
    results = []
    d.addBoth(results.append)
    return results


def test_draining_upstream_gets_no_new_requests_but_keeps_its_lease():
    """drain() stops new leases on the upstream; a lease already out stays valid."""
    clock = Clock()
    pool = make_pool(clock, max_buffered=0)
    a = pool.add(healthy_upstream("http://a:1", total=2))
    b = pool.add(healthy_upstream("http://b:1", total=1))
    [first] = results_of(pool.acquire(exclude=[b.id]))
    assert first.upstream is a
    assert pool.drain(a.id) is a
    assert a.draining and a.status == "draining"
    [second] = results_of(pool.acquire())
    assert second.upstream is b
    assert a.in_flight == 1
    first.release()
    assert a.in_flight == 0 and a.id in pool.upstreams


def test_drain_and_undrain_of_unknown_id_return_none():
    """An id the pool does not know is answered with None (the API turns it into 404)."""
    pool = make_pool(Clock())
    assert pool.drain("nope") is None
    assert pool.undrain("nope") is None
    assert pool.remove_when_idle("nope") is None


def test_undrain_hands_slots_to_buffered_waiters_at_once():
    """A request waiting in the buffer gets the undrained upstream's slot in the same turn."""
    clock = Clock()
    pool = make_pool(clock)
    a = pool.add(healthy_upstream("http://a:1", total=1))
    pool.drain(a.id)
    waiting = results_of(pool.acquire())
    assert waiting == [] and pool.requests_buffered == 1
    pool.undrain(a.id)
    assert len(waiting) == 1 and waiting[0].upstream is a
    assert not a.draining and pool.requests_buffered == 0


def test_remove_when_idle_removes_an_idle_upstream_at_once():
    """With nothing in flight the upstream is removed immediately and the Deferred has fired."""
    pool = make_pool(Clock())
    a = pool.add(healthy_upstream("http://a:1"))
    events = []
    pool.subscribe(lambda event, up: events.append((event, up)))
    done = results_of(pool.remove_when_idle(a.id))
    assert done == [a] and a.id not in pool.upstreams
    assert ("removed", a) in events


def test_remove_when_idle_waits_for_the_last_lease_then_removes():
    """A busy upstream is drained, stays listed while requests run, and goes with the last lease."""
    clock = Clock()
    pool = make_pool(clock)
    a = pool.add(healthy_upstream("http://a:1", total=2))
    one = results_of(pool.acquire())[0]
    two = results_of(pool.acquire())[0]
    done = results_of(pool.remove_when_idle(a.id))
    assert done == [] and a.draining and pool.removal_pending(a.id)
    one.release()
    assert done == [] and a.id in pool.upstreams
    two.release()
    assert done == [a] and a.id not in pool.upstreams
    assert not pool.removal_pending(a.id)
    assert clock.getDelayedCalls() == []


def test_undrain_cancels_a_pending_removal():
    """Undraining an upstream waiting to be removed keeps it; the removal Deferred fires None."""
    pool = make_pool(Clock())
    a = pool.add(healthy_upstream("http://a:1"))
    lease = results_of(pool.acquire())[0]
    done = results_of(pool.remove_when_idle(a.id))
    pool.undrain(a.id)
    assert done == [None] and not a.draining
    lease.release()
    assert a.id in pool.upstreams


def test_forced_remove_settles_a_pending_removal():
    """remove() while a removal waits for idle fires that Deferred with the upstream."""
    pool = make_pool(Clock())
    a = pool.add(healthy_upstream("http://a:1"))
    lease = results_of(pool.acquire())[0]
    done = results_of(pool.remove_when_idle(a.id))
    assert pool.remove(a.id) is a
    assert done == [a]
    lease.release()  # the request finishing later must not break anything
    assert a.in_flight == 0 and pool.upstreams == {}


def test_remove_when_idle_twice_shares_one_removal():
    """Two callers asking for the same removal both learn when it happens."""
    pool = make_pool(Clock())
    a = pool.add(healthy_upstream("http://a:1"))
    lease = results_of(pool.acquire())[0]
    first = results_of(pool.remove_when_idle(a.id))
    second = results_of(pool.remove_when_idle(a.id))
    lease.release()
    assert first == [a] and second == [a]


def test_cancel_removal_keeps_draining():
    """cancel_removal() stops the pending removal but leaves the drain in place."""
    pool = make_pool(Clock())
    a = pool.add(healthy_upstream("http://a:1"))
    lease = results_of(pool.acquire())[0]
    done = results_of(pool.remove_when_idle(a.id))
    assert pool.cancel_removal(a.id) is True
    assert done == [None] and a.draining
    lease.release()
    assert a.id in pool.upstreams
    assert pool.cancel_removal(a.id) is False
