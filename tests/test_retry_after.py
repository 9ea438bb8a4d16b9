"""Retry-After from the measured rate at which slots free, and whether a 504 is worth retrying.

A fixed "Retry-After: 1" sent clients straight back into a full buffer, and
the OpenAI SDKs retried a buffer timeout (504) twice, each time from the back
of the queue: a 30 s timeout cost a user about 90 s. Everything on a Clock.
"""

from __future__ import annotations

import json

import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock

from paddler.balancer.proxy import ProxyConfig, ProxyResource
from paddler.errors import BufferFull, BufferTimeout

from .helpers import healthy_upstream, make_pool
from .test_pool import lease_of


def drained_pool(rate: float, seconds: float, slots: int = 2, timeout: float = 30.0, buffered: int = 4):
    """A pool whose C{slots} slots were busy, then freed and taken again C{rate} times a second for C{seconds}."""
    clock = Clock()
    pool = make_pool(clock, max_buffered=buffered, timeout=timeout)
    pool.add(healthy_upstream("http://a:1", total=slots))
    leases = [lease_of(pool.acquire())[0] for _ in range(slots)]
    step = 1.0 / rate
    for i in range(int(rate * seconds)):
        clock.advance(step)
        leases[i % slots].release()
        leases[i % slots] = lease_of(pool.acquire())[0]
    return clock, pool, leases


def test_a_full_buffer_advises_the_time_the_requests_ahead_take_at_the_measured_rate():
    """Slots free 2 per second; 4 requests wait: a new one would wait (4 + 1) / 2 = 2.5 s: Retry-After 3."""
    clock, pool, _ = drained_pool(rate=2.0, seconds=60)
    waiting = [pool.acquire() for _ in range(4)]
    [failure] = lease_of(pool.acquire())
    assert failure.check(BufferFull)
    assert failure.value.headers == {b"retry-after": b"3"}
    assert "wait about 2 s" in failure.value.message or "wait about 3 s" in failure.value.message
    for d in waiting:
        d.addErrback(lambda f: None)
        d.cancel()
    pool.stop()


def test_a_slower_fleet_advises_a_longer_wait():
    """Slots free once every 4 s: (4 + 1) * 4 = 20 s."""
    clock, pool, _ = drained_pool(rate=0.25, seconds=120)
    waiting = [pool.acquire() for _ in range(4)]
    [failure] = lease_of(pool.acquire())
    assert int(failure.value.headers[b"retry-after"]) in range(18, 23)
    for d in waiting:
        d.addErrback(lambda f: None)
        d.cancel()
    pool.stop()


def test_a_buffer_timeout_on_a_fleet_that_frees_too_few_slots_says_do_not_retry():
    """One slot freed every 10 s, 4 waiting, a 5 s buffer timeout: a retry would time out again."""
    clock, pool, _ = drained_pool(rate=0.1, seconds=120, buffered=8, timeout=5.0)
    waiting = [lease_of(pool.acquire()) for _ in range(4)]
    clock.advance(5.0)
    failure = waiting[0][0]
    assert failure.check(BufferTimeout)
    assert failure.value.headers == {b"x-should-retry": b"false"}
    assert "would most likely time out again" in failure.value.message
    pool.stop()


def test_a_buffer_timeout_after_a_stall_of_a_fast_fleet_says_retry_and_when():
    """Slots freed 4 a second until a 5 s stall timed out one waiter: a retry would get a slot in about
    0.5 s, so x-should-retry: true and Retry-After: 1."""
    clock, pool, _ = drained_pool(rate=4.0, seconds=60, timeout=5.0)
    [timed_out] = [lease_of(pool.acquire())]
    clock.advance(5.0)
    failure = timed_out[0]
    assert failure.check(BufferTimeout)
    assert failure.value.headers == {b"x-should-retry": b"true", b"retry-after": b"1"}
    pool.stop()


def test_with_no_slot_freed_yet_the_advice_is_the_old_second_and_a_timeout_is_not_retried():
    clock = Clock()
    pool = make_pool(clock, max_buffered=1, timeout=5.0)
    pool.add(healthy_upstream("http://a:1", total=1))
    lease_of(pool.acquire())
    [waiter] = [lease_of(pool.acquire())]
    [full] = lease_of(pool.acquire())
    assert full.value.headers == {b"retry-after": b"1"}
    clock.advance(5.0)
    assert waiter[0].value.headers == {b"x-should-retry": b"false"}
    assert pool.expected_wait() is None
    pool.stop()


def test_ghost_leases_free_no_slot_and_do_not_count():
    """A client that left a non-streaming request: llama.cpp still runs it, nothing was freed."""
    clock = Clock()
    pool = make_pool(clock)
    pool.add(healthy_upstream("http://a:1", total=1))
    [lease] = lease_of(pool.acquire())
    clock.advance(1.0)
    lease.release(still_running=True)
    assert pool.slots_freed.events == 0


@pytest_twisted.ensureDeferred
async def test_the_504_a_client_gets_carries_the_advice():
    """Through the proxy: the buffered request's 504 JSON answer has x-should-retry: false."""
    clock = Clock()
    pool = make_pool(clock, max_buffered=2, timeout=3.0)
    pool.add(healthy_upstream("http://127.0.0.1:371", total=1, clock=clock))
    lease_of(pool.acquire())  # the only slot is taken and never freed
    proxy = ProxyResource(pool, None, clock, ProxyConfig())  # no request reaches an upstream
    http = StubTreq(proxy)
    d = http.post("http://balancer/completion", data=json.dumps({"prompt": "x"}).encode())
    http.flush()
    clock.advance(3.0)
    http.flush()
    response = await d
    body = json.loads(await response.content())
    assert response.code == 504 and body["error"]["type"] == "timeout_error"
    assert response.headers.getRawHeaders(b"x-should-retry") == [b"false"]
    pool.stop()


def test_after_an_hour_idle_the_rate_is_measured_from_the_new_burst():
    """Slots freed 10 a second for 3 s after an hour of nothing: about 10 per second, not an
    hour-long average."""
    clock, pool, leases = drained_pool(rate=2.0, seconds=10)
    clock.advance(3600)
    for i in range(30):
        clock.advance(0.1)
        leases[i % 2].release()
        leases[i % 2] = lease_of(pool.acquire())[0]
    assert 8 <= pool.slots_freed.rate() <= 12
    pool.stop()
