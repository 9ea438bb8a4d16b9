"""Strict upstream framing and connection reuse: no client ever gets bytes meant for another.

The production L{UpstreamClient} (built as L{paddler.tap} builds it) talks
over real TCP on 127.0.0.1 to L{tests.hostile_upstream}, which answers as
each request's shape says. Two clients always share the one upstream's
pool; every answer is checked against the request id it must echo.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from paddler.web.clients import CACHED_CONNECTION_TIMEOUT
from paddler.web.upstream_client import UpstreamClient
from tests.hostile_upstream import DELAY, HEAD_SHAPES, LATE_SHAPES, SHAPES, HostileFactory, injected, verdict

_ids = itertools.count()


class Collect:
    """A body consumer that keeps the bytes and how the body ended."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.d: defer.Deferred[list[Failure | None]] = defer.Deferred()

    def body_data(self, data: bytes) -> None:
        self.data.append(data)

    def body_done(self, failure: Failure | None) -> None:
        self.d.callback([failure])  # a Failure as a result would errback


async def ask(client: UpstreamClient, origin: bytes, shape: str, method: bytes = b"POST") -> tuple[str, str]:
    """One request with a fresh id: (id, verdict); a request that fails before its head counts as the
    proxy's 502."""
    rid = f"r{next(_ids)}"
    expected = {**SHAPES, **HEAD_SHAPES}[shape]
    headers = [(b"Host", b"up"), (b"X-Request-Id", rid.encode()), (b"X-Hostile-Shape", shape.encode())]
    try:
        response = await client.send(method, origin, b"/completion", headers, b"{}" if method == b"POST" else None)
    except (ResponseFailed, ResponseNeverReceived):
        return rid, "502"
    body = Collect()
    response.deliver(body)
    (failure,) = await body.d
    return rid, verdict(rid, expected, response.code, b"".join(body.data), failure is None)


def production_client(**kwargs: Any) -> UpstreamClient:
    """The client as paddler.tap builds it for the proxy."""
    return UpstreamClient(reactor, connect_timeout=5.0, max_idle_per_host=64,
                          idle_timeout=CACHED_CONNECTION_TIMEOUT, **kwargs)


@pytest.fixture
def logged() -> Any:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def hostile() -> Any:
    factory = HostileFactory(reactor, "hostile")
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.origin = b"http://127.0.0.1:%d" % port.getHost().port
    yield factory
    port.stopListening()


def pause(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


ALL = sorted(SHAPES) + sorted(HEAD_SHAPES)


@pytest.mark.parametrize("suspect", [0.0, 600.0], ids=["reuse-rules-alone", "as-in-production"])
@pytest.mark.parametrize("shape", ALL)
@pytest_twisted.ensureDeferred
async def test_each_hostile_shape_reaches_only_its_own_client_and_never_the_next(shape, suspect, hostile, logged):
    """Two clients share the upstream's pool: one asks for a hostile shape, the other a normal answer,
    at once; then both ask again (reusing the connections). Each gets exactly its own answer, a 502,
    or (a last chunk never ended) its own bytes cut short; never another's. A connection that carried
    unexpected bytes is dropped and counted; nothing is logged above warning."""
    dropped: list[tuple[bytes, str]] = []
    client = production_client(suspect_seconds=suspect, on_dropped=lambda o, w: dropped.append((o, w)))
    origin = hostile.origin
    method = b"HEAD" if shape in HEAD_SHAPES else b"POST"
    expected = {**SHAPES, **HEAD_SHAPES}[shape]
    try:
        for _round in range(3):
            hostile_d = defer.ensureDeferred(ask(client, origin, shape, method))
            normal_d = defer.ensureDeferred(ask(client, origin, "normal"))
            (_, got), (_, normal) = await hostile_d, await normal_d
            assert normal == "own"
            if method == b"HEAD":
                assert got in ("own", "wrong")  # a HEAD answer has no body: no id to compare
            else:
                allowed = {expected, "502"} if expected != "own_cut" else {"own_cut", "502"}
                if expected in ("204", "304"):
                    allowed = {"own", "502"}
                assert got in allowed, (shape, got)
            await pause(DELAY * 3)  # late bytes arrive while the connection is idle in the pool
            # the next requests reuse what the pool kept: their answers are their own
            follow = [defer.ensureDeferred(ask(client, origin, "normal")) for _ in range(2)]
            for d in follow:
                assert (await d)[1] == "own"
        if shape in ("excess_immediate", "excess_delayed", "stray_crlf", "early_answer", "no_content_with_body",
                     "no_content_delayed_body", "not_modified_with_body", "head_with_body"):
            assert dropped and dropped[0][0] == origin
            assert client.dropped[origin] == len(dropped)
    finally:
        await client.close()
        await pause(0)
    assert not [e for e in logged if e.get("log_level") is not None and e["log_level"].name in ("error", "critical")]
    assert not [e for e in logged if e.get("log_failure") is not None]


@pytest_twisted.ensureDeferred
async def test_late_bytes_after_the_next_request_went_out_cost_keep_alive_for_the_upstream(hostile, logged):
    """Bytes an upstream writes after the next request went out on the connection cannot be told from
    its answer; once caught (the real answer then arrives on an idle connection), the upstream gets a
    new connection for every request: the poisoning cannot repeat."""
    client = production_client()
    origin = hostile.origin
    try:
        first = await ask(client, origin, "excess_delayed")
        assert first[1] == "own"
        # at once: the next request goes out on the same connection before the late bytes come
        second = await ask(client, origin, "normal")
        assert second[1] in ("own", "cross")
        await pause(DELAY * 3)
        assert client.dropped[origin] == 1
        connections = len(hostile.requests)
        results = [await ask(client, origin, shape) for shape in ["excess_delayed", "normal"] * 3]
        assert [verdict for _, verdict in results] == ["own"] * 6
        assert len(hostile.requests) == connections + 6
        assert client._hosts[origin].idle == []  # nothing kept alive while suspect
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_bytes_waiting_unread_in_an_idle_socket_keep_the_next_request_off_that_connection(hostile):
    """An answer the upstream wrote while the connection sat idle, already in the socket but not read by
    the reactor yet (same turn): the socket is peeked before the request is written, the connection
    dropped and counted, and the request goes out on a new one."""
    client = production_client()
    origin = hostile.origin
    try:
        assert (await ask(client, origin, "normal"))[1] == "own"
        [server_side] = hostile.connections
        server_side.transport.socket.send(injected("someone-else", "hostile"))  # in the kernel at once
        rid, got = await ask(client, origin, "normal")  # same reactor turn: nothing read yet
        assert got == "own"
        assert client.dropped[origin] == 1 and len(hostile.connections) == 2
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_post_the_upstream_read_and_then_reset_is_not_sent_again(hostile):
    """A kept-alive upstream reads a POST and resets the connection: the POST is written once, the
    client gets a failure (the proxy's 502), no second copy reaches the upstream."""
    client = production_client()
    origin = hostile.origin
    try:
        assert (await ask(client, origin, "normal"))[1] == "own"  # a kept-alive connection now
        before = len(hostile.requests)
        rid, got = await ask(client, origin, "reset_after_request")
        assert got == "502"
        await pause(0.05)
        assert [h[b"x-request-id"].decode() for _, _, h, _ in hostile.requests[before:]] == [rid]
    finally:
        await client.close()


def test_the_late_shapes_are_the_ones_with_a_delay():
    """The shapes whose extra bytes come late are listed as such (docs/reliability.md explains them)."""
    assert LATE_SHAPES <= set(SHAPES)


@pytest_twisted.ensureDeferred
async def test_without_keep_alive_a_late_write_never_reaches_another_client(hostile, logged):
    """--upstream-keepalive 0 (max_idle_per_host=0, as paddler.tap builds it then): every request has
    a connection of its own, so an upstream's late bytes, even its first, reach no other request —
    two clients at once, each late shape followed at once by a normal request."""
    client = UpstreamClient(reactor, connect_timeout=5.0, max_idle_per_host=0,
                            idle_timeout=CACHED_CONNECTION_TIMEOUT)
    origin = hostile.origin
    try:
        for shape in sorted(LATE_SHAPES):
            before = len(hostile.requests)
            pairs = await defer.gatherResults([
                defer.ensureDeferred(ask(client, origin, shape)),
                defer.ensureDeferred(ask(client, origin, shape)),
            ])
            follow = await defer.gatherResults([
                defer.ensureDeferred(ask(client, origin, "normal")),
                defer.ensureDeferred(ask(client, origin, "normal")),
            ])
            assert [verdict for _, verdict in follow] == ["own", "own"], shape
            assert all(verdict in ("own", "own_cut", "502") for _, verdict in pairs), (shape, pairs)
            assert len(hostile.requests) == before + 4  # one connection per request
            assert client._hosts[origin].idle == []
        await pause(DELAY * 3)  # the late bytes land on connections already closed
    finally:
        await client.close()
    assert not [e for e in logged if e.get("log_failure") is not None]


def test_the_keepalive_setting_reaches_the_proxys_upstream_client():
    """--upstream-keepalive N is the proxy's upstream client's max_idle_per_host (64 by default)."""
    from twisted.internet.testing import MemoryReactorClock

    from paddler.config import BalancerConfig
    from paddler.tap import makeBalancerService

    for keep, expected in ((None, 64), (0, 0), (7, 7)):
        config = BalancerConfig() if keep is None else BalancerConfig(upstream_keepalive=keep)
        service = makeBalancerService(config, MemoryReactorClock())
        assert service.proxy._client.max_idle_per_host == expected
