"""Without Redis: state URLs, the RESP parser, the client's deadlines and
reconnection on a fake clock, and the store's loops and recovery on the
in-memory state with a Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from twisted.internet.interfaces import IStreamClientEndpoint

from paddler.sharedstate.client import InvalidStateURL, LinkState, RedisClient, parse_state_url
from paddler.sharedstate.errors import NoFreeSlot, StoreTimeout, StoreUnavailable, WaiterLost, WaitExpired
from paddler.sharedstate.memory import MemorySlotState, MemorySlotStore
from paddler.sharedstate.model import Release
from paddler.sharedstate.resp import NoScriptError, ProtocolError, RedisError, ReplyParser, encode_command
from paddler.sharedstate.store import SharedLease, Waiter

# -- URLs -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://127.0.0.1:6380/2", dict(host="127.0.0.1", port=6380, db=2, password=None, tls=False)),
        ("redis://redis", dict(host="redis", port=6379, db=0)),
        ("redis://:p%40ss@h:1/0", dict(password="p@ss", username=None)),
        ("redis://user:pw@h/3", dict(username="user", password="pw", db=3)),
        ("rediss://h:6390/0?ssl_ca_certs=/ca.pem", dict(tls=True, ca_certs="/ca.pem", verify=True)),
        ("rediss://h/0?ssl_cert_reqs=none", dict(tls=True, verify=False)),
        ("redis://[::1]:7000/1", dict(host="::1", port=7000, db=1)),
    ],
)
def test_state_urls_are_parsed(url: str, expected: dict[str, Any]) -> None:
    """redis:// and rediss:// with host, port, db, user, password and TLS options."""
    address = parse_state_url(url)
    for name, value in expected.items():
        assert getattr(address, name) == value, name


def test_the_password_falls_back_to_the_environment_and_is_never_displayed() -> None:
    """The state_password setting (PADDLER_STATE_PASSWORD) is used when the URL has none; display() and repr() hide it."""
    from paddler.config import build_config

    config = build_config({"state": "redis://h:1/0"}, [], {"PADDLER_STATE_PASSWORD": "hunter2"})
    assert config.state_password == "hunter2"
    address = parse_state_url(config.state, config.state_password)
    assert address.password == "hunter2"
    assert parse_state_url("redis://:url@h:1/0", "env").password == "url"
    assert parse_state_url("redis://h:1/0").password is None
    assert "hunter2" not in address.display() and "hunter2" not in repr(address)


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1/0",
        "redis://",
        "redis://h:99999/0",
        "redis://h:1/zero",
        "redis://h:1/0/1",
        "redis://h:1/0?ssl_ca_certs=/x",
        "rediss://h:1/0?ssl_cert_reqs=maybe",
        "rediss://h:1/0?timeout=3",
        "redis://h:1/" + "9" * 9,
        "redis://h/" + "x" * 3000,
    ],
)
def test_bad_state_urls_are_refused(url: str) -> None:
    """Every malformed --state URL raises InvalidStateURL with a reason."""
    with pytest.raises(InvalidStateURL):
        parse_state_url(url)


# -- RESP -------------------------------------------------------------------


def test_replies_are_parsed_whatever_the_chunking() -> None:
    """Every RESP2 type, nested arrays and nil, fed one byte at a time or all at once."""
    wire = b"+OK\r\n-NOSCRIPT No matching script\r\n:42\r\n$5\r\nhe\r\nl\r\n$-1\r\n*3\r\n:1\r\n*2\r\n$1\r\na\r\n$0\r\n\r\n*-1\r\n*0\r\n"
    for step in (1, 3, len(wire)):
        parser = ReplyParser()
        replies: list[Any] = []
        for i in range(0, len(wire), step):
            replies.extend(parser.feed(wire[i : i + step]))
        assert replies[0] == b"OK"
        assert isinstance(replies[1], NoScriptError)
        assert replies[2:] == [42, b"he\r\nl", None, [1, [b"a", b""], None], []]


@pytest.mark.parametrize(
    "wire",
    [b"?what\r\n", b":12x\r\n", b"$999999999999\r\n", b"*99999999\r\n", b"$3\r\nabcde", b"*1\r\n" * 20 + b":1\r\n"],
)
def test_garbage_replies_are_protocol_errors(wire: bytes) -> None:
    """Unknown types, bad numbers, absurd sizes, missing CRLF and deep nesting are refused."""
    with pytest.raises(ProtocolError):
        ReplyParser().feed(wire)


def test_commands_are_arrays_of_bulk_strings() -> None:
    """Arguments of any length and binary content are framed by length, so nothing can be injected."""
    assert encode_command(["SET", "k\r\n*1", 5, b"\x00"]) == b"*4\r\n$3\r\nSET\r\n$5\r\nk\r\n*1\r\n$1\r\n5\r\n$1\r\n\x00\r\n"
    with pytest.raises(TypeError):
        encode_command(["SET", True])


# -- the client on a fake clock and a fake endpoint --------------------------


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connection attempts the test answers by hand."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, Deferred[Any]]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        attempt: Deferred[Any] = Deferred()
        self.attempts.append((factory, attempt))
        return attempt

    def refuse(self) -> None:
        _, attempt = self.attempts[-1]
        attempt.errback(Failure(ConnectionRefusedError("refused")))

    def accept(self) -> tuple[Any, StringTransport]:
        factory, attempt = self.attempts[-1]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        attempt.callback(protocol)
        return protocol, transport


def make_client(clock: Clock, endpoint: FakeEndpoint, **kwargs: Any) -> RedisClient:
    kwargs.setdefault("command_timeout", 0.1)
    client = RedisClient(None, parse_state_url("redis://h:1/0"), clock=clock, endpoint=endpoint, **kwargs)
    client.startService()
    return client


def test_a_refused_connection_marks_the_link_down_once_and_calls_fail_at_once() -> None:
    """Refused attempts: one state change logged, commands fail with StoreUnavailable without waiting."""
    clock, endpoint = Clock(), FakeEndpoint()
    client = make_client(clock, endpoint)
    states: list[LinkState] = []
    client.subscribe_state(states.append)
    endpoint.refuse()
    for _ in range(5):
        clock.advance(10)
        endpoint.refuse()
    assert states == [LinkState.DOWN]
    failure = client.execute("PING")
    assert isinstance(failure.result, Failure) and failure.result.check(StoreUnavailable)
    failure.addErrback(lambda f: None)
    client.stopService()
    assert clock.getDelayedCalls() == []


def test_reconnection_backoff_is_capped() -> None:
    """Retries back off exponentially but never wait longer than max_backoff."""
    clock, endpoint = Clock(), FakeEndpoint()
    client = make_client(clock, endpoint, max_backoff=2.0)
    delays = []
    for _ in range(12):
        endpoint.refuse()
        (call,) = clock.getDelayedCalls()
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert max(delays) <= 2.0 * 1.1 + 1e-9 and delays[0] < 0.3
    assert delays[-1] > 1.0, "it does back off"
    client.stopService()


def test_a_command_waiting_for_a_connection_fails_at_its_deadline() -> None:
    """Connecting for the first time: the command waits at most its deadline, then StoreTimeout."""
    clock, endpoint = Clock(), FakeEndpoint()
    client = make_client(clock, endpoint)
    result = client.execute("PING", timeout=0.5)
    clock.advance(0.49)
    assert not result.called
    clock.advance(0.02)
    assert result.result.check(StoreTimeout)
    result.addErrback(lambda f: None)
    client.stopService()


def test_the_link_is_up_only_after_the_scripts_are_loaded_and_late_replies_are_dropped() -> None:
    """Up after set-up answers; a reply that comes after its deadline is discarded, not given to the next command."""
    clock, endpoint = Clock(), FakeEndpoint()
    from paddler.sharedstate.client import Script

    client = make_client(clock, endpoint, scripts=[Script("s", "return 1")])
    protocol, transport = endpoint.accept()
    assert client.state is LinkState.CONNECTING
    assert b"SCRIPT" in transport.value()
    protocol.dataReceived(b"$40\r\n" + b"0" * 40 + b"\r\n")
    assert client.state is LinkState.UP
    transport.clear()
    slow = client.execute("GET", "a")
    clock.advance(0.2)
    assert slow.result.check(StoreTimeout)
    slow.addErrback(lambda f: None)
    fast = client.execute("GET", "b")
    protocol.dataReceived(b"$4\r\nlate\r\n$4\r\nmine\r\n")
    assert fast.result == b"mine"
    client.stopService()


def test_three_missed_deadlines_in_a_row_drop_the_connection() -> None:
    """A mute Redis (SIGSTOP, half-open TCP) is detected: the link goes down and reconnects."""
    clock, endpoint = Clock(), FakeEndpoint()
    client = make_client(clock, endpoint)
    protocol, transport = endpoint.accept()
    assert client.state is LinkState.UP
    for _ in range(3):
        d = client.execute("PING")
        clock.advance(0.2)
        d.addErrback(lambda f: None)
    assert client.state is LinkState.DOWN
    assert transport.disconnecting or getattr(transport, "aborted", False) or not protocol.connected_
    client.stopService()


def test_an_error_reply_fails_only_its_own_command() -> None:
    """-ERR goes to the command that caused it; the connection stays up."""
    clock, endpoint = Clock(), FakeEndpoint()
    client = make_client(clock, endpoint)
    protocol, _ = endpoint.accept()
    first, second = client.execute("BAD"), client.execute("PING")
    protocol.dataReceived(b"-ERR unknown command\r\n+PONG\r\n")
    assert first.result.check(RedisError) and second.result == b"PONG"
    first.addErrback(lambda f: None)
    assert client.is_up
    client.stopService()


# -- the store's loops on a Clock ---------------------------------------------


def memory_pair(**kwargs: Any) -> tuple[Clock, MemorySlotState, MemorySlotStore, MemorySlotStore]:
    clock = Clock()
    clock.advance(1000)
    state = MemorySlotState(clock)
    kwargs.setdefault("lease_ttl", 3.0)
    a = MemorySlotStore(state, "a", **kwargs)
    b = MemorySlotStore(state, "b", **kwargs)
    a.startService()
    b.startService()
    a.hello()
    b.hello()
    return clock, state, a, b


def test_the_renew_loop_keeps_leases_and_stopping_leaves_no_timers() -> None:
    """Renew every ttl/3 keeps a lease through many ttls of reaping; stopService leaves no DelayedCall."""
    clock, state, a, b = memory_pair(reap_interval=1.0)
    a.register_server("s1", 1)
    lease = a.acquire("r1", ["s1"]).result
    for _ in range(40):
        clock.advance(0.5)
    assert "r1" in state.lease and lease.id in a.leases
    a.stopService()
    b.stopService()
    assert clock.getDelayedCalls() == []


def test_a_dead_owners_lease_is_reaped_by_the_reap_loop_of_another() -> None:
    """Owner A stops (no renew); B's reap loop frees the slot within ttl + one reap interval."""
    clock, state, a, b = memory_pair(reap_interval=1.0)
    a.register_server("s1", 1)
    a.acquire("r1", ["s1"])
    a.stopService()
    clock.advance(2.9)
    assert "r1" in state.lease
    clock.advance(1.1)
    assert "r1" not in state.lease
    b.stopService()


def test_releases_while_the_store_is_down_are_sent_when_it_answers() -> None:
    """release() during an outage fires with None at once; the renew loop sends it after the store returns."""
    clock, state, a, b = memory_pair()
    a.register_server("s1", 1)
    lease = a.acquire("r1", ["s1"]).result
    waiter = b.acquire("w1", ["s1"]).result
    state.set_available(False)
    assert lease.release().result is None
    assert not a.is_up
    state.set_available(True)
    clock.advance(1.0)  # renew tick
    assert isinstance(waiter.deferred.result, SharedLease)
    a.stopService()
    b.stopService()


def test_a_wiped_store_is_rebuilt_from_what_the_owners_knew() -> None:
    """Redis restarted empty: servers, drains, leases (adopted) and waiters (re-queued in local order) come back."""
    clock, state, a, b = memory_pair()
    a.register_server("s1", 1)
    a.register_server("s2", 1)
    a.drain("s2")
    lease = a.acquire("held", ["s1"]).result
    first = b.acquire("first", ["s1"]).result
    second = b.acquire("second", ["s1"]).result
    resets: list[str] = []
    a.subscribe_reset(lambda: resets.append("a"))
    b.subscribe_reset(lambda: resets.append("b"))
    state.wipe()
    clock.advance(1.0)  # renew ticks find the epoch gone
    assert sorted(resets) == ["a", "b"]
    assert state.total == {"s1": 1, "s2": 1} and state.drain == {"s2"}
    assert "held" in state.lease
    assert [rid for rid, _ in sorted(state.w.items(), key=lambda item: item[1][1])] == ["first", "second"]
    assert state.ext == {"s1": 1, "s2": 1}, "fully busy until a reading: not every owner has adopted yet"
    a.reading("s1", 1, 1, a.probe_mark().result)
    assert state.ext["s1"] == 0 and not first.deferred.called
    assert lease.release().result is Release.RELEASED
    assert first.deferred.result.server_id == "s1" and not second.deferred.called
    second.deferred.addErrback(lambda f: None)
    a.stopService()
    b.stopService()


def test_a_waiter_the_store_forgot_fails_with_waiter_lost() -> None:
    """A waiter dropped by the store (owner taken for dead) is failed by the next poll, not left hanging."""
    clock, state, a, b = memory_pair()
    a.register_server("s1", 1)
    a.acquire("held", ["s1"])
    waiter = b.acquire("w", ["s1"]).result
    state.op_release("{mem}:grant:", "w")
    clock.advance(0.3)
    assert waiter.deferred.called and isinstance(waiter.deferred.result, Failure)
    assert waiter.deferred.result.check(WaiterLost)
    waiter.deferred.addErrback(lambda f: None)
    a.stopService()
    b.stopService()


def test_a_waiters_local_deadline_cancels_it_in_the_store() -> None:
    """The buffer timeout fires on the owner's clock and takes the waiter out of the shared queue."""
    clock, state, a, b = memory_pair()
    a.register_server("s1", 1)
    a.acquire("held", ["s1"])
    waiter = b.acquire("w", ["s1"], wait=2.0).result
    assert isinstance(waiter, Waiter)
    clock.advance(2.0)
    assert waiter.deferred.result.check(WaitExpired)
    waiter.deferred.addErrback(lambda f: None)
    assert "w" not in state.w
    a.stopService()
    b.stopService()


def test_a_timed_out_acquire_is_released_later_and_its_id_not_reused() -> None:
    """An ACQUIRE whose answer was lost may have run: its id is released in the background and refused meanwhile."""
    clock, state, a, b = memory_pair()
    a.register_server("s1", 1)
    original = a._run
    a._run = lambda name, args: fail(StoreTimeout("lost")) if name == "acquire" else original(name, args)  # type: ignore[method-assign]
    state.op_acquire("{mem}:grant:", "a", "r1", "3000", "0", "1", "", "s1")  # it did run in the store
    result = a.acquire("r1", ["s1"])
    assert result.result.check(StoreTimeout)
    result.addErrback(lambda f: None)
    a._run = original  # type: ignore[method-assign]
    again = a.acquire("r1", ["s1"])
    assert again.result.check(Exception)
    again.addErrback(lambda f: None)
    clock.advance(1.0)
    assert "r1" not in state.lease
    a.stopService()
    b.stopService()


def test_a_waiter_whose_update_timed_out_keeps_its_place_and_its_lease_is_never_released_behind_it() -> None:
    """
    Updating a waiter's candidates re-runs ACQUIRE with its id. When that call
    times out the waiter is still queued (the update only moves candidates),
    so its id must not be queued for release: it was, and the lease the
    waiter got later was released by the next renew while its request ran
    (a benchmark saw servers take 4-14 requests above their slots).
    """
    clock, state, a, b = memory_pair()
    a.register_server("s1", 1)
    holder = b.acquire("hold", ["s1"]).result
    waiter = a.acquire("w1", ["s1"], wait=30.0).result
    assert isinstance(waiter, Waiter)
    original = a._run
    a._run = lambda name, args: fail(StoreTimeout("lost")) if name == "acquire" else original(name, args)  # type: ignore[method-assign]
    update = waiter.update(["s1"])
    assert update.result.check(StoreTimeout)
    update.addErrback(lambda f: None)
    a._run = original  # type: ignore[method-assign]
    assert a.waiters == {"w1": waiter}
    got: list[Any] = []
    waiter.deferred.addCallback(got.append)
    holder.release()
    [lease] = got
    assert isinstance(lease, SharedLease) and "w1" in state.lease
    clock.advance(3.0)  # renews (ttl 3 s: every 1 s) and reaps
    assert "w1" in state.lease and a.leases == {"w1": lease}
    refused = a.acquire("other", ["s1"], wait=0)  # the one slot is w1's: nothing above it
    assert refused.result.check(NoFreeSlot)
    refused.addErrback(lambda f: None)
    assert waiter.update(["s1"]).result is lease  # a late update of a granted waiter: its lease, no error
    a.stopService()
    b.stopService()


def test_a_lease_released_while_its_request_still_runs_stays_busy_until_the_next_reading() -> None:
    """release(running=True): the lease ends but its slot counts as external load, so no waiter gets it;
    the next reading says what the server runs (still busy: stays; free: handed on)."""
    clock, state, a, b = memory_pair()
    a.register_server("s1", 1)
    lease = a.acquire("r1", ["s1"]).result
    waiter = b.acquire("w1", ["s1"], wait=30.0).result
    assert isinstance(waiter, Waiter)
    a.release("r1", running=True)
    assert lease.id not in a.leases and "r1" not in state.lease and not waiter.deferred.called
    a.reading("s1", 1, 1, a.probe_mark().result)  # llama.cpp still runs it
    assert not waiter.deferred.called
    a.reading("s1", 1, 0, a.probe_mark().result)  # done: the slot goes to w1
    assert waiter.deferred.called
    a.stopService()
    b.stopService()


def test_a_waiter_that_leaves_while_its_update_is_on_the_way_is_not_revived_by_the_reply() -> None:
    """
    The update (ACQUIRE with the waiter's id) runs and is granted a slot; the waiter leaves (its
    RELEASE runs after); then the update's reply arrives (and the grant hint after it). The reply
    must not make a lease nobody holds, which renew would re-adopt and keep for ever (found by a
    second read of the change).
    """
    from twisted.internet.defer import Deferred

    clock, state, a, b = memory_pair()
    a.register_server("s1", 1)
    a.register_server("s2", 1)
    held = [b.acquire("h1", ["s1"]).result, b.acquire("h2", ["s2"]).result]
    waiter = a.acquire("w1", ["s2"], wait=30.0).result
    assert isinstance(waiter, Waiter)
    waiter.deferred.addErrback(lambda f: f.trap(CancelledError))
    held[0].release()  # s1 is free; the waiter does not list it yet
    hints: list[bytes] = []
    channel = a.channel_prefix + a.owner
    subscribers = state._subscribers[channel]
    state._subscribers[channel] = [hints.append]  # the grant hint comes late too (another connection)
    original_run = a._run
    replies: list[tuple[Deferred[Any], Deferred[Any]]] = []

    def late(name: str, args: Any) -> Deferred[Any]:
        d = original_run(name, args)
        if name != "acquire":
            return d
        reply: Deferred[Any] = Deferred()
        replies.append((d, reply))
        return reply

    a._run = late  # type: ignore[method-assign]
    update = waiter.update(["s1", "s2"])  # runs now: granted s1 in the store
    waiter.deferred.cancel()  # the client leaves: RELEASE w1 runs after the update
    a._run = original_run  # type: ignore[method-assign]
    for ran, reply in replies:
        ran.chainDeferred(reply)
    update.addErrback(lambda f: f.trap(CancelledError))
    state._subscribers[channel] = subscribers
    for hint in hints:
        a._message(hint)
    clock.advance(3.0)  # renews
    assert a.leases == {} and a.waiters == {} and "w1" not in state.lease and "w1" not in state.w
    held[1].release()
    a.stopService()
    b.stopService()


def test_stopping_fails_local_waiters_with_cancelled() -> None:
    """stopService errbacks every local waiter (the balancer is stopping)."""
    from twisted.internet.defer import CancelledError

    clock, state, a, b = memory_pair()
    a.register_server("s1", 1)
    a.acquire("held", ["s1"])
    waiter = b.acquire("w", ["s1"]).result
    b.stopService()
    assert waiter.deferred.result.check(CancelledError)
    waiter.deferred.addErrback(lambda f: None)
    a.stopService()
    assert clock.getDelayedCalls() == []
