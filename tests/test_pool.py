"""The pool and its buffer: leases, FIFO waiting, timeouts, cancellation, models."""

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from paddler.routing.policies import RoundRobinChooser
from paddler.errors import BufferFull, BufferTimeout, NoUpstreamAvailable
from paddler.fleet.upstream import SlotsSeen, Upstream, UpstreamState

from .helpers import healthy_upstream, make_pool, mark_unreachable


def lease_of(d):
    results = []
    d.addBoth(results.append)
    return results


def test_a_free_slot_is_leased_at_once_and_given_back_once():
    clock = Clock()
    pool = make_pool(clock)
    up = pool.add(healthy_upstream("http://a:1", total=1))
    [lease] = lease_of(pool.acquire())
    assert lease.upstream is up and up.slots_idle == 0
    lease.release()
    lease.release()
    assert up.slots_idle == 1 and up.in_flight == 0


def test_adding_the_same_url_twice_returns_the_first():
    pool = make_pool(Clock())
    first = pool.add(healthy_upstream("http://a:1"))
    assert pool.add(healthy_upstream("http://a:1/")) is first
    assert len(pool.upstreams) == 1


def test_freed_slot_goes_to_the_oldest_waiter_in_the_same_turn():
    clock = Clock()
    pool = make_pool(clock)
    pool.add(healthy_upstream("http://a:1", total=1))
    [holder] = lease_of(pool.acquire())
    waits = [lease_of(pool.acquire()) for _ in range(3)]
    assert pool.requests_buffered == 3 and all(w == [] for w in waits)
    clock.advance(2)
    holder.release()
    assert len(waits[0]) == 1 and waits[0][0].waited == 2
    assert waits[1] == [] and waits[2] == []
    waits[0][0].release()
    assert len(waits[1]) == 1 and waits[2] == []
    assert pool.requests_buffered == 1


def test_new_requests_do_not_jump_the_queue():
    clock = Clock()
    pool = make_pool(clock)
    up = pool.add(healthy_upstream("http://a:1", total=1))
    [holder] = lease_of(pool.acquire())
    first = lease_of(pool.acquire())
    up.apply_slots(2, None, up.probe_mark())  # the server grew a slot; first takes it
    pool.capacity_changed()
    assert len(first) == 1
    later = lease_of(pool.acquire())
    assert later == []
    holder.release()
    assert len(later) == 1


def test_wait_times_out_with_504_and_leaves_the_buffer():
    clock = Clock()
    pool = make_pool(clock, timeout=5)
    results = lease_of(pool.acquire())
    clock.advance(4.9)
    assert results == []
    clock.advance(0.1)
    assert results[0].check(BufferTimeout) and results[0].value.status == 504
    assert "5 s" in results[0].value.message
    assert pool.requests_buffered == 0 and clock.getDelayedCalls() == []


def test_cancelled_waiter_leaves_at_once_and_never_gets_a_slot():
    clock = Clock()
    pool = make_pool(clock)
    d = pool.acquire()
    results = lease_of(d)
    d.cancel()
    assert results[0].check(CancelledError)
    assert pool.requests_buffered == 0 and clock.getDelayedCalls() == []
    up = pool.add(healthy_upstream("http://a:1", total=1))
    assert up.in_flight == 0


def test_full_buffer_answers_503_with_retry_after():
    pool = make_pool(Clock(), max_buffered=2)
    queued = [lease_of(pool.acquire()), lease_of(pool.acquire())]
    [failure] = lease_of(pool.acquire())
    assert failure.check(BufferFull) and failure.value.status == 503
    assert failure.value.headers == {b"retry-after": b"1"}
    assert "full" in failure.value.message
    pool.stop()
    assert all(q[0].check(NoUpstreamAvailable) for q in queued)


def test_buffering_disabled_answers_503_at_once():
    pool = make_pool(Clock(), max_buffered=0)
    [failure] = lease_of(pool.acquire())
    assert failure.check(NoUpstreamAvailable) and "disabled" in failure.value.message
    assert pool.requests_buffered == 0


def test_zero_upstreams_buffers_then_a_new_upstream_serves_every_waiter():
    clock = Clock()
    pool = make_pool(clock)
    waits = [lease_of(pool.acquire()) for _ in range(3)]
    status, body = pool.health()
    assert status == 200 and body["requests_buffered"] == 3
    pool.add(healthy_upstream("http://a:1", total=4))  # healthy at once in this test
    assert all(len(w) == 1 for w in waits)


def test_unknown_upstream_is_not_used_until_probed_healthy():
    clock = Clock()
    pool = make_pool(clock)
    up = pool.add(Upstream("http://a:1"))
    assert up.state is UpstreamState.UNKNOWN
    wait = lease_of(pool.acquire())
    assert wait == []
    pool.observe(up, SlotsSeen(2, 0, up.probe_mark()))
    assert len(wait) == 1


def test_waiter_gets_only_an_upstream_serving_its_model():
    clock = Clock()
    pool = make_pool(clock)
    llama = pool.add(healthy_upstream("http://a:1", total=1, models=("llama",)))
    qwen = pool.add(healthy_upstream("http://b:1", total=1, models=("qwen",)))
    [l1] = lease_of(pool.acquire("llama"))
    assert l1.upstream is llama
    waiting = lease_of(pool.acquire("llama"))
    [q] = lease_of(pool.acquire("qwen"))  # not blocked behind the llama waiter
    assert q.upstream is qwen and waiting == []
    q.release()
    assert waiting == []
    l1.release()
    assert waiting[0].upstream is llama


def test_unknown_model_name_is_ignored_like_llamacpp_does():
    pool = make_pool(Clock())
    pool.add(healthy_upstream("http://a:1", total=1, models=("llama",)))
    [lease] = lease_of(pool.acquire("gpt-4"))
    assert lease.upstream.serves("llama")


def test_draining_upstream_gets_no_new_requests():
    pool = make_pool(Clock())
    up = pool.add(healthy_upstream("http://a:1", total=2))
    up.draining = True
    waiting = lease_of(pool.acquire())
    assert waiting == []
    pool.stop()
    assert waiting[0].check(NoUpstreamAvailable)


def test_slot_blind_policy_leases_even_without_idle_slots():
    pool = make_pool(Clock(), chooser=RoundRobinChooser())
    up = pool.add(healthy_upstream("http://a:1", total=1))
    leases = [lease_of(pool.acquire())[0] for _ in range(3)]
    assert up.in_flight == 3 and up.slots_processing == 1
    for lease in leases:
        lease.release()


def test_health_is_503_with_no_upstream_and_buffering_off_or_full():
    pool = make_pool(Clock(), max_buffered=0)
    status, body = pool.health()
    assert status == 503 and body["status"] == "error" and "disabled" in body["message"]
    pool = make_pool(Clock(), max_buffered=1)
    queued = lease_of(pool.acquire())
    status, body = pool.health()
    assert status == 503 and "full" in body["message"]
    pool.stop()
    assert queued[0].check(NoUpstreamAvailable)


def test_health_totals_add_up_over_the_fleet():
    pool = make_pool(Clock())
    pool.add(healthy_upstream("http://a:1", total=4, processing=1))
    pool.add(healthy_upstream("http://b:1", total=2, processing=2))
    down = pool.add(healthy_upstream("http://c:1", total=8))
    mark_unreachable(down)
    status, body = pool.health()
    assert status == 200
    assert body == {
        "status": "ok",
        "slots_idle": 3,
        "slots_processing": 3,
        "requests_buffered": 0,
        "upstreams": {"healthy": 2, "total": 3},
    }


def test_stop_fails_every_waiter_and_leaves_no_timers():
    clock = Clock()
    pool = make_pool(clock)
    results = [lease_of(pool.acquire()) for _ in range(2)]
    pool.stop()
    assert all(r[0].check(NoUpstreamAvailable) for r in results)
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("max_buffered", [1, 5])
def test_oldest_wait_is_reported(max_buffered):
    clock = Clock()
    pool = make_pool(clock, max_buffered=max_buffered)
    queued = lease_of(pool.acquire())
    clock.advance(3)
    assert pool.oldest_buffered_wait() == 3
    assert pool.totals()["oldest_buffered_wait"] == 3
    pool.stop()
    assert queued[0].check(NoUpstreamAvailable)


def test_a_local_lease_and_a_shared_mirror_are_granted_by_one_rule(monkeypatch):
    """Both the pool's own leases and the mirrors of shared ones go through C{UpstreamPool.grant}."""
    from twisted.internet.task import Clock

    from paddler.fleet.pool import UpstreamPool
    from paddler.fleet.upstream import SlotsSeen, Upstream
    from paddler.routing.policies import MostIdleSlotsChooser
    from paddler.sharedstate.fleet import SharedFleet

    clock = Clock()
    pool = UpstreamPool(clock, MostIdleSlotsChooser(), max_buffered=2, buffer_timeout=5.0)
    a = pool.add(Upstream("http://10.0.0.1:8080", clock=clock))
    b = pool.add(Upstream("http://10.0.0.2:8080", clock=clock))
    for upstream in (a, b):
        pool.observe(upstream, SlotsSeen(2, 0, upstream.probe_mark()))
    granted: list[str] = []
    real = pool.grant

    def counting(upstream, waited, demand, on_release=None):
        granted.append(upstream.url)
        return real(upstream, waited, demand, on_release=on_release)

    monkeypatch.setattr(pool, "grant", counting)
    local = pool._try_lease(None, frozenset(), 0.0, None)
    released: list[bool] = []

    class Shared:
        server_id = b.id

        def release(self, running=False):
            from twisted.internet.defer import succeed

            released.append(running)
            return succeed(None)

    fleet = SharedFleet(pool, store=None, clock=clock)
    mirror = fleet._mirror(Shared(), None, 1.5)
    assert local is not None and mirror is not None
    assert len(granted) == 2 and granted[1] == b.url
    assert mirror.upstream is b and mirror.waited == 1.5 and b.slots_held == 1
    mirror.release()
    assert released == [False] and b.slots_held == 0


def test_the_pool_asks_its_slot_source_and_the_source_never_calls_the_pools_acquire(monkeypatch):
    """Without --state the pool's slots come from a LocalSlotSource; with a SharedFleet set as its source, a
    request while the store is down is served from the pool's own buffer without going back through
    C{UpstreamPool.acquire} (no pool -> shared -> pool loop)."""
    from twisted.internet.task import Clock

    from paddler.fleet.pool import LocalSlotSource, UpstreamPool
    from paddler.fleet.upstream import SlotsSeen, Upstream
    from paddler.routing.policies import MostIdleSlotsChooser
    from paddler.sharedstate.fleet import SharedFleet
    from paddler.sharedstate.memory import MemorySlotState, MemorySlotStore

    clock = Clock()
    pool = UpstreamPool(clock, MostIdleSlotsChooser(), max_buffered=2, buffer_timeout=5.0)
    assert isinstance(pool.slots, LocalSlotSource) and pool.shared is None
    for url in ("http://10.0.0.1:8080", "http://10.0.0.2:8080"):
        upstream = pool.add(Upstream(url, clock=clock))
        pool.observe(upstream, SlotsSeen(1, 0, upstream.probe_mark()))
    fleet = SharedFleet(pool, MemorySlotStore(MemorySlotState(clock), "a"), clock)
    pool.shared = fleet
    assert pool.slots is fleet and not fleet.up
    calls: list[object] = []
    real = pool.acquire

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(pool, "acquire", counting)
    first, second = pool.acquire(), pool.acquire()
    assert len(calls) == 2  # the two requests, and nothing else re-entered the pool
    assert {first.result.upstream.url, second.result.upstream.url} == {"http://10.0.0.1:8080", "http://10.0.0.2:8080"}
    pool.shared = None
    assert isinstance(pool.slots, LocalSlotSource)
