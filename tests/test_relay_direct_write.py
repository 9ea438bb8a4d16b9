"""The relay's direct write: once the head is out, a pass-through body goes straight to the client's transport.

Each test runs a real Twisted C{server.Request} on a real C{HTTPChannel}
(on a C{StringTransport}) and checks that the direct path behaves as
C{Request.write} would: the same bytes in the same order, C{sentLength}
counted, nothing written once the client is gone, C{RuntimeError} after
C{finish}, backpressure through the channel; and that it is taken only
where C{Request.write} has nothing left to do per chunk.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from paddler.balancer.relay import Relay, RelayedHead, _direct


class Body:
    """An L{paddler.interfaces.IUpstreamBody} stand-in: records how the relay drives it."""

    def __init__(self, framing: str = "chunked") -> None:
        self.framing = framing
        self.consumer: Any = None
        self.raw: bool | None = None
        self.paused = 0
        self.resumed = 0
        self.aborted = False

    def deliver(self, consumer: Any, raw: bool = False) -> None:
        self.consumer, self.raw = consumer, raw

    def pause(self) -> None:
        self.paused += 1

    def resume(self) -> None:
        self.resumed += 1

    def abort(self) -> None:
        self.aborted = True

    def tail(self) -> bytes:
        return b""


def make_request(method: bytes = b"POST", version: bytes = b"HTTP/1.1") -> tuple[server.Request, StringTransport]:
    channel = http.HTTPChannel()
    channel.site = server.Site(Resource())  # type: ignore[attr-defined]
    transport = StringTransport()
    channel.makeConnection(transport)
    request = server.Request(channel, False)
    channel.requests.append(request)  # as HTTPChannel does when a request line arrives
    request.method, request.clientproto, request.uri, request.path = method, version, b"/", b"/"
    return request, transport


def relay_for(request: server.Request, body: Body, raw: bool = True, headers: Any = None) -> Relay:
    head = RelayedHead(200, b"OK", headers or [(b"Content-Type", [b"text/event-stream"])])
    relay = Relay(request, Clock(), 60.0, head)
    relay.start(body, raw)
    return relay


CHUNKS = [b"5\r\nhello\r\n", b"6\r\n world\r\n", b"1;x=y\r\n!\r\n"]


def test_pass_through_chunks_reach_the_transport_in_order_and_are_counted():
    """After the head (Transfer-Encoding: chunked, written by Twisted), each chunk is on the client's
    transport as it came, in order, and counted in sentLength exactly as Request.write counts."""
    request, transport = make_request()
    body = Body()
    relay = relay_for(request, body)
    for chunk in CHUNKS:
        body.consumer.body_data(chunk)
    assert relay._direct_write is not None
    head, _, rest = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Transfer-Encoding: chunked" in head
    assert rest == b"".join(CHUNKS)
    assert request.sentLength == sum(map(len, CHUNKS))


def test_a_sized_pass_through_body_goes_direct_after_its_first_piece():
    """A sized answer (Content-Length): the first piece goes through Request.write (it writes the head),
    the rest straight to the transport; the bytes are the body, whole and in order."""
    request, transport = make_request()
    body = Body("length")
    relay = relay_for(request, body, headers=[(b"Content-Length", [b"11"])])
    body.consumer.body_data(b"hello")
    assert relay._direct_write is not None
    body.consumer.body_data(b" world")
    _, _, rest = transport.value().partition(b"\r\n\r\n")
    assert rest == b"hello world" and request.sentLength == 11


def test_nothing_is_written_once_the_client_is_gone():
    """The client disconnected mid-stream: later pieces are dropped, as Request.write drops them."""
    request, transport = make_request()
    body = Body()
    relay_for(request, body)
    body.consumer.body_data(CHUNKS[0])
    sent = transport.value()
    request.connectionLost(Failure(ConnectionDone()))
    body.consumer.body_data(CHUNKS[1])
    assert transport.value() == sent and request.sentLength == len(CHUNKS[0])


def test_a_piece_after_finish_raises_as_request_write_does():
    """A piece after the request finished is a caller's bug: the RuntimeError Request.write raises."""
    request, _ = make_request()
    body = Body()
    relay_for(request, body)
    body.consumer.body_data(CHUNKS[0])
    request.unregisterProducer()
    request.finish()
    with pytest.raises(RuntimeError):
        body.consumer.body_data(CHUNKS[1])


def test_backpressure_still_goes_through_the_channel():
    """The client's transport pausing its producer (the channel) pauses the upstream body; resuming resumes
    it: the direct write leaves the producer chain as it was."""
    request, transport = make_request()
    body = Body()
    relay_for(request, body)
    body.consumer.body_data(CHUNKS[0])
    transport.producer.pauseProducing()
    assert body.paused == 1
    transport.producer.resumeProducing()
    assert body.resumed == 1


def test_decoded_bodies_keep_twisted_chunking():
    """Without pass-through Twisted frames the payload (chunked stays on): every piece through
    Request.write, framed by Twisted, never the direct write."""
    request, transport = make_request()
    body = Body()
    relay = relay_for(request, body, raw=False)
    body.consumer.body_data(b"hello")
    assert relay._direct_write is None
    assert transport.value().endswith(b"5\r\nhello\r\n")


def test_the_direct_write_is_refused_where_request_write_still_has_work():
    """Not taken before the head, for HEAD (its write is replaced), with an encoder, with Twisted's chunking
    on, after the client left, or on a channel whose write is its own."""
    request, transport = make_request()
    assert _direct(request) is None  # the head is not out yet
    request.write(b"")
    assert _direct(request) is None  # Twisted chunks this body
    request.chunked = 0  # type: ignore[attr-defined]
    assert _direct(request) == transport.write

    head_request, _ = make_request(b"HEAD")
    head_request.write(b"")
    head_request.chunked = 0  # type: ignore[attr-defined]
    assert _direct(head_request) is None

    encoded, _ = make_request()
    encoded.write(b"")
    encoded.chunked = 0  # type: ignore[attr-defined]
    encoded._encoder = object()  # type: ignore[attr-defined]
    assert _direct(encoded) is None

    gone, _ = make_request()
    gone.write(b"")
    gone.chunked = 0  # type: ignore[attr-defined]
    gone.connectionLost(Failure(ConnectionDone()))
    assert _direct(gone) is None

    class OwnWrite(http.HTTPChannel):
        def write(self, data: bytes) -> None:
            super().write(data)

    own = OwnWrite()
    own.site = server.Site(Resource())  # type: ignore[attr-defined]
    own.makeConnection(StringTransport())
    custom = server.Request(own, False)
    custom.method, custom.clientproto = b"POST", b"HTTP/1.1"
    custom.write(b"")
    custom.chunked = 0  # type: ignore[attr-defined]
    assert _direct(custom) is None


def test_a_head_written_early_still_records_the_first_byte():
    """An event stream whose head goes out at once (head_now: llama-server's /models/sse): its first piece
    still records the first-byte time and runs on_first_byte, then the rest goes direct."""
    request, transport = make_request()
    body = Body()
    firsts: list[bool] = []
    relay = Relay(request, Clock(), 60.0, RelayedHead(200, b"OK", [(b"Content-Type", [b"text/event-stream"])]),
                  on_first_byte=lambda: firsts.append(True))
    relay.start(body, True, head_now=True)
    assert relay._direct_write is None and relay.first_byte_at is None
    body.consumer.body_data(CHUNKS[0])
    assert relay.first_byte_at is not None and firsts == [True]
    assert relay._direct_write is not None
    body.consumer.body_data(CHUNKS[1])
    assert firsts == [True]
    assert transport.value().partition(b"\r\n\r\n")[2] == CHUNKS[0] + CHUNKS[1]
