"""The relay in memory, both modes: client bytes in, upstream bytes out and back, nothing on a network.

A real Twisted HTTP server channel (on a StringTransport) runs the real
ProxyResource, whose UpstreamClient connects to in-memory upstream
transports; each test writes the upstream's answer byte for byte and reads
exactly what the client got.
"""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.server import Site

from paddler.balancer.proxy import Exchange, ProxyConfig, ProxyResource
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import SlotsSeen, Upstream
from paddler.routing.policies import MostIdleSlotsChooser
from paddler.server.request import bounded_request_factory
from paddler.upstream.client import UpstreamClient

from .test_upstream_client import Endpoints, Transport

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
TIMINGS = b'{"prompt_n":3,"predicted_n":2,"predicted_per_second":41.5}'
LAST_EVENT = b'data: {"stop":true,"timings":' + TIMINGS + b"}\n\n"


class RecordingChooser(MostIdleSlotsChooser):
    """The slots policy, recording the timings each finished request reported."""

    def __init__(self) -> None:
        super().__init__()
        self.timings: list[Any] = []

    def finished(self, upstream: Upstream, demand: Any, timings: Any) -> None:
        self.timings.append(timings)


class ClientTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "10.9.8.7", 4000))
        self.channel: Any = None
        self.no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            from twisted.internet.error import ConnectionDone
            from twisted.python.failure import Failure

            self.channel.connectionLost(Failure(ConnectionDone()))

    abortConnection = loseConnection


class Rig:
    """A proxy with two upstreams, in memory."""

    def __init__(self, passthrough: bool = True, idle_timeout: float = 60.0, upstreams: int = 2) -> None:
        self.clock = Clock()
        self.chooser = RecordingChooser()
        self.pool = UpstreamPool(self.clock, self.chooser, 30, 30.0)
        self.upstreams = []
        for i in range(1, upstreams + 1):
            upstream = Upstream(f"http://10.0.0.{i}:8080", name=f"u{i}", clock=self.clock)
            upstream.record(SlotsSeen(4, 0, upstream.probe_mark(), models=("m",)), 0.0)
            self.pool.add(upstream)
            self.upstreams.append(upstream)
        self.endpoints = Endpoints()
        self.client = UpstreamClient(None, self.endpoints, clock=self.clock)  # type: ignore[arg-type]
        config = ProxyConfig(relay_passthrough=passthrough, idle_timeout=idle_timeout)
        self.proxy = ProxyResource(self.pool, self.client, self.clock, config)
        self.site = Site(
            self.proxy, requestFactory=bounded_request_factory(1 << 20), timeout=None, parsePOSTFormSubmission=False
        )

    def connect(self) -> ClientTransport:
        channel = self.site.buildProtocol(IPv4Address("TCP", "10.9.8.7", 4000))
        transport = ClientTransport()
        transport.channel = channel
        channel.makeConnection(transport)
        return transport

    def request(self, transport: ClientTransport, payload: Any, version: bytes = b"HTTP/1.1",
                method: bytes = b"POST", path: bytes = b"/completion") -> None:
        body = json.dumps(payload).encode()
        transport.channel.dataReceived(
            method + b" " + path + b" " + version + b"\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body
        )

    def upstream(self, index: int = -1) -> tuple[Any, Transport]:
        return self.endpoints.connections[index]

    def in_flight(self) -> int:
        return sum(u.in_flight for u in self.upstreams)


def split_response(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def dechunk(body: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[end + 2:end + 2 + size])
        pos = end + 4 + size


@pytest.fixture(params=[True, False], ids=["passthrough", "decode"])
def rig(request: Any) -> Rig:
    return Rig(passthrough=request.param)


def test_chunked_stream_reaches_the_client_in_both_modes(rig):
    """An SSE answer in odd chunks (extensions, a trailer) reaches the client whole: as received in
    pass-through, re-chunked by Twisted in decode mode; the lease is returned with llama.cpp's timings."""
    client = rig.connect()
    rig.request(client, {"prompt": "hi", "stream": True})
    protocol, upstream = rig.upstream()
    assert upstream.value().startswith(b"POST /completion HTTP/1.1\r\n")
    cut = LAST_EVENT.index(b"predicted_n")
    wire = (
        b"f;n=1\r\ndata: {\"a\":1}\n\n\r\n"
        + b"%x\r\n%s\r\n" % (cut, LAST_EVENT[:cut])
        + b"%x\r\n%s\r\n" % (len(LAST_EVENT) - cut, LAST_EVENT[cut:])
        + b"0\r\nX-Trailer: t\r\n\r\n"
    )
    protocol.dataReceived(SSE_HEAD + wire[:9])
    protocol.dataReceived(wire[9:])
    head, body = split_response(client.value())
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Transfer-Encoding: chunked" in head
    assert b"Content-Type: text/event-stream" in head
    if rig.proxy.config.relay_passthrough:
        assert body == wire
    else:
        assert body != wire and dechunk(body) == b'data: {"a":1}\n\n' + LAST_EVENT
    assert rig.in_flight() == 0
    assert rig.chooser.timings == [json.loads(TIMINGS)]
    assert not client.disconnecting and not upstream.disconnecting
    assert client.no_delay  # each event leaves at once, not held for the client's delayed ACK


@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "decode"])
def test_both_connections_are_reused_for_the_next_request(passthrough):
    """After an answer that ended cleanly, the client's connection and the upstream's carry the next one."""
    rig = Rig(passthrough, upstreams=1)
    client = rig.connect()
    for n in range(2):
        rig.request(client, {"prompt": str(n), "stream": True})
        protocol, upstream = rig.upstream()
        protocol.dataReceived(SSE_HEAD + b"2\r\nok\r\n0\r\n\r\n")
    assert len(rig.endpoints.connections) == 1
    assert client.value().count(b"HTTP/1.1 200 OK") == 2 and not client.disconnecting


def test_http10_clients_get_the_decoded_body_and_a_closed_connection(rig):
    """An HTTP/1.0 client cannot take chunks: the payload is decoded and the connection closes at the end."""
    client = rig.connect()
    rig.request(client, {"prompt": "hi", "stream": True}, version=b"HTTP/1.0")
    protocol, _ = rig.upstream()
    protocol.dataReceived(SSE_HEAD + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    head, body = split_response(client.value())
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head
    assert body == b"hello world" and client.disconnecting


def test_sized_answers_pass_as_they_are(rig):
    """A Content-Length answer keeps its length header and its bytes."""
    client = rig.connect()
    rig.request(client, {"prompt": "hi"})
    protocol, _ = rig.upstream()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":")
    protocol.dataReceived(b"true}")
    head, body = split_response(client.value())
    assert b"Content-Length: 11" in head and body == b'{"ok":true}'
    assert rig.in_flight() == 0


def test_head_requests_get_no_body(rig):
    """HEAD is relayed without a body, whatever framing headers the answer has."""
    client = rig.connect()
    client.channel.dataReceived(b"HEAD /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n")
    protocol, _ = rig.upstream()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    head, body = split_response(client.value())
    assert head.startswith(b"HTTP/1.1 200") and body == b""
    assert not client.disconnecting


def test_an_upstream_breaking_mid_stream_cuts_the_client_and_returns_the_lease_once(rig):
    """The upstream dies after the first chunk: the client connection is cut (it cannot get a clean end)
    and the slot is returned once."""
    client = rig.connect()
    rig.request(client, {"prompt": "hi", "stream": True})
    protocol, upstream = rig.upstream()
    protocol.dataReceived(SSE_HEAD + b"5\r\nhello\r\n")
    upstream.abortConnection()
    assert client.disconnecting
    assert rig.in_flight() == 0 and rig.chooser.timings == [None]
    assert rig.proxy.stats.by_status == {"5xx": 1}


def test_garbage_framing_mid_stream_cuts_the_client(rig):
    """Broken chunk framing from the upstream is not forwarded past the last good byte; the client is cut."""
    client = rig.connect()
    rig.request(client, {"prompt": "hi", "stream": True})
    protocol, upstream = rig.upstream()
    protocol.dataReceived(SSE_HEAD + b"5\r\nhello\r\n")
    before = client.value()
    protocol.dataReceived(b"zz\r\nworld\r\n")
    assert client.value() == before and client.disconnecting and upstream.aborted
    assert rig.in_flight() == 0


def test_the_client_leaving_aborts_the_upstream_request(rig):
    """Client gone mid-stream: the upstream connection is aborted (llama.cpp stops) and the slot returned."""
    client = rig.connect()
    rig.request(client, {"prompt": "hi", "stream": True})
    protocol, upstream = rig.upstream()
    protocol.dataReceived(SSE_HEAD + b"5\r\nhello\r\n")
    client.loseConnection()
    assert upstream.aborted and rig.in_flight() == 0
    assert rig.proxy.stats.by_status == {"cancelled": 1}


def test_an_answer_breaking_before_its_body_is_a_502_and_never_sent_to_the_other_upstream(rig):
    """Head received, then the connection dropped before any body byte: nothing reached the client, but
    the upstream had the request (it may be generating), so it is not run a second time elsewhere: a
    JSON 502 naming the upstream, its failure counted."""
    client = rig.connect()
    rig.request(client, {"prompt": "hi", "stream": True})
    protocol, upstream = rig.upstream()
    protocol.dataReceived(SSE_HEAD)
    upstream.abortConnection()
    assert len(rig.endpoints.connections) == 1
    head, body = split_response(client.value())
    assert head.startswith(b"HTTP/1.1 502")
    assert b"u1" in body and b"not tried elsewhere" in body
    assert [u.requests_failed for u in rig.upstreams] == [1, 0]
    assert rig.in_flight() == 0


def test_a_slow_client_pauses_the_upstream_and_the_idle_timer(rig):
    """Backpressure: the client's transport pausing its producer pauses the upstream socket; that silence
    is not the upstream's fault (no idle timeout while paused)."""
    client = rig.connect()
    rig.request(client, {"prompt": "hi", "stream": True})
    protocol, upstream = rig.upstream()
    protocol.dataReceived(SSE_HEAD + b"5\r\nhello\r\n")
    client.producer.pauseProducing()
    assert upstream.producerState == "paused"
    rig.clock.advance(1000)
    assert not client.disconnecting
    client.producer.resumeProducing()
    assert upstream.producerState == "producing"
    protocol.dataReceived(b"0\r\n\r\n")
    assert rig.in_flight() == 0


def test_an_upstream_silent_mid_stream_is_cut_after_the_idle_timeout():
    """No byte for idle_timeout mid-stream: the client is cut, the upstream aborted, the slot returned."""
    rig = Rig(idle_timeout=10.0)
    client = rig.connect()
    rig.request(client, {"prompt": "hi", "stream": True})
    protocol, upstream = rig.upstream()
    protocol.dataReceived(SSE_HEAD + b"5\r\nhello\r\n")
    rig.clock.advance(9)
    protocol.dataReceived(b"1\r\n!\r\n")
    rig.clock.advance(9)
    assert not client.disconnecting
    rig.clock.advance(1.5)
    assert client.disconnecting and upstream.aborted and rig.in_flight() == 0


def test_two_clients_stream_at_once_through_two_upstreams():
    """Two concurrent streams on two upstreams stay apart."""
    rig = Rig()
    clients = [rig.connect(), rig.connect()]
    for client in clients:
        rig.request(client, {"prompt": "hi", "stream": True})
    assert len(rig.endpoints.connections) == 2
    for i, (protocol, _) in enumerate(rig.endpoints.connections):
        protocol.dataReceived(SSE_HEAD + b"1\r\n%d\r\n0\r\n\r\n" % i)
    bodies = sorted(split_response(c.value())[1] for c in clients)
    assert bodies == [b"1\r\n0\r\n0\r\n\r\n", b"1\r\n1\r\n0\r\n\r\n"]
    assert rig.in_flight() == 0


def test_the_client_leaving_before_the_answer_aborts_the_upstream_request(rig):
    """Client gone while the upstream has not answered yet: the upstream connection is aborted, the
    slot returned, the request counted as cancelled."""
    client = rig.connect()
    rig.request(client, {"prompt": "hi", "stream": True})
    _, upstream = rig.upstream()
    client.loseConnection()
    assert upstream.aborted and rig.in_flight() == 0
    assert rig.proxy.stats.by_status == {"cancelled": 1}


def test_no_upstream_answer_within_the_upstream_timeout_is_a_504_and_the_connection_goes():
    """An upstream that never sends its head: 504 after --upstream-timeout, its connection aborted."""
    rig = Rig(upstreams=1)
    rig.proxy.config.upstream_timeout = 5.0
    rig.proxy.config.max_retries = 0
    client = rig.connect()
    rig.request(client, {"prompt": "hi"})
    _, upstream = rig.upstream()
    rig.clock.advance(5.0)
    head, body = split_response(client.value())
    assert head.startswith(b"HTTP/1.1 504") and b"5 s" in body
    assert upstream.aborted and rig.in_flight() == 0


def test_the_request_body_is_let_go_once_the_answer_began(rig):
    """A (possibly large) request body is kept for retries only until the answer's first byte."""
    client = rig.connect()
    rig.request(client, {"prompt": "x" * 10000, "stream": True})
    protocol, _ = rig.upstream()
    [request] = rig.proxy.active
    protocol.dataReceived(SSE_HEAD)
    # the proxy keeps no table of exchanges: find this request's through the garbage collector
    [exchange] = [r for r in gc.get_referrers(request) if isinstance(r, Exchange)]
    assert len(exchange.body) > 10000  # kept: the answer may still break before its body
    protocol.dataReceived(b"1\r\na\r\n")
    assert exchange.body == b""


def test_the_upstream_gets_end_to_end_headers_only_and_forwarding_headers():
    """Hop-by-hop headers, those the client's Connection names, Expect and the client's length are not
    sent on; X-Forwarded-* are added, Host kept, the upstream's key added when the client sent none
    and the operator lends it (--lend-api-key)."""
    rig = Rig(upstreams=1)
    rig.proxy.config.api_key = "secret"
    rig.proxy.config.lend_api_key = True
    client = rig.connect()
    body = b'{"prompt": "hi"}'
    client.channel.dataReceived(
        b"POST /completion HTTP/1.1\r\nHost: proxy.example\r\nConnection: keep-alive, X-Private\r\n"
        b"X-Private: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nExpect: 100-continue\r\nX-Forwarded-For: 1.2.3.4\r\n"
        b"X-Custom: a\r\nX-Custom: b\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    _, upstream = rig.upstream()
    head, _, sent_body = upstream.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /completion HTTP/1.1"
    names = [line.split(b":", 1)[0].lower() for line in lines[1:]]
    headers = {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip() for line in lines[1:]}
    for gone in (b"connection", b"x-private", b"keep-alive", b"te", b"expect"):
        assert gone not in names
    assert names.count(b"x-custom") == 2 and names.count(b"content-length") == 1
    assert headers[b"host"] == b"proxy.example"
    assert headers[b"x-forwarded-for"] == b"10.9.8.7"  # --forwarded-headers replace: the client's is dropped
    assert headers[b"x-forwarded-host"] == b"proxy.example" and headers[b"x-forwarded-proto"] == b"http"
    assert headers[b"authorization"] == b"Bearer secret"
    assert headers[b"content-length"] == str(len(body)).encode() and sent_body == body
