"""The upstream HTTP/1.1 client: one write per request, exact body ends, kept-alive connections, cancellation."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from zope.interface.verify import verifyObject

from paddler.interfaces import IUpstreamBody, IUpstreamClient
from paddler.upstream.body import read_body
from paddler.upstream.client import UpstreamClient, encode_request


class Transport(StringTransport):
    """A StringTransport that tells its protocol when it is closed or aborted."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = False
        self.protocol: Any = None

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        if not self.disconnecting:
            self.aborted = True
            super().loseConnection()
            self.protocol.connectionLost(Failure(ConnectionLost()))


class Endpoint:
    """Connects at once (or when told, with C{hold}) to an in-memory transport."""

    def __init__(self, owner: Endpoints) -> None:
        self.owner = owner

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.owner.refuse:
            from twisted.internet.defer import fail

            return fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = Transport()
        transport.protocol = protocol
        self.owner.connections.append((protocol, transport))
        if self.owner.hold:
            d: Deferred[Any] = Deferred(lambda d: self.owner.cancelled.append(True))
            self.owner.pending.append((d, protocol, transport))
            return d
        protocol.makeConnection(transport)
        return succeed(protocol)


class Endpoints:
    def __init__(self) -> None:
        self.connections: list[tuple[Any, Transport]] = []
        self.asked: list[tuple[bytes, bytes, int]] = []
        self.hold = False
        self.refuse = False
        self.pending: list[Any] = []
        self.cancelled: list[bool] = []

    def endpoint_for(self, scheme: bytes, host: bytes, port: int) -> Endpoint:
        self.asked.append((scheme, host, port))
        return Endpoint(self)


class Consumer:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.done: list[Failure | None] = []

    def body_data(self, data: bytes) -> None:
        self.data.append(data)

    def body_done(self, failure: Failure | None) -> None:
        self.done.append(failure)


ORIGIN = b"http://10.0.0.1:8080"
CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def make_client(**kwargs: Any) -> tuple[UpstreamClient, Endpoints, Clock]:
    clock = Clock()
    endpoints = Endpoints()
    client = UpstreamClient(None, endpoints, clock=clock, **kwargs)  # type: ignore[arg-type]
    return client, endpoints, clock


def send(client: UpstreamClient, body: bytes | None = b"{}", method: bytes = b"POST") -> Deferred[Any]:
    return client.send(method, ORIGIN, b"/completion", [(b"Host", b"example"), (b"X-A", b"1")], body)


def test_client_and_response_provide_their_interfaces():
    """UpstreamClient is an IUpstreamClient and its responses are IUpstreamBody."""
    client, endpoints, _ = make_client()
    d = send(client)
    endpoints.connections[0][0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert verifyObject(IUpstreamClient, client)
    assert verifyObject(IUpstreamBody, d.result)


def test_request_goes_out_in_one_write_with_its_length():
    """Request line, the caller's headers, Content-Length and the body are one write."""
    client, endpoints, _ = make_client()
    send(client, b'{"a":1}')
    [(_, transport)] = endpoints.connections
    assert transport.value() == (
        b"POST /completion HTTP/1.1\r\nHost: example\r\nX-A: 1\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
    )
    assert endpoints.asked == [(b"http", b"10.0.0.1", 8080)]


def test_line_breaks_in_header_values_cannot_inject_headers():
    """A header value with CR/LF is sent with spaces instead (as Twisted's Headers does)."""
    data = encode_request(b"GET", b"/", [(b"X", b"a\r\nInjected: 1")], None)
    assert data == b"GET / HTTP/1.1\r\nX: a Injected: 1\r\n\r\n"


def test_raw_delivery_gives_the_bytes_as_received_and_ends_exactly():
    """Raw (pass-through) delivery hands over the chunk framing as received, ends at the last chunk,
    and returns the connection to the pool."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(CHUNKED + b"5\r\nhello\r\n")
    response = d.result
    assert response.code == 200 and response.framing == "chunked"
    consumer = Consumer()
    response.deliver(consumer, raw=True)
    protocol.dataReceived(b"6\r\n world\r\n0\r")
    protocol.dataReceived(b"\n\r\n")
    assert b"".join(consumer.data) == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert consumer.done == [None]
    assert response.tail() == b"hello world"
    assert not transport.disconnecting
    # the next request reuses the connection
    transport.clear()
    send(client)
    assert len(endpoints.connections) == 1 and transport.value().startswith(b"POST /completion")


def test_decoded_delivery_gives_the_payload():
    """Without raw, the consumer gets the decoded payload only."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, _ = endpoints.connections[0]
    protocol.dataReceived(CHUNKED + b"5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n")
    consumer = Consumer()
    d.result.deliver(consumer, raw=False)
    assert b"".join(consumer.data) == b"hello" and consumer.done == [None]


def test_body_bytes_before_delivery_are_held_and_the_socket_paused():
    """Body bytes that came with the head wait for the consumer; the upstream socket is paused meanwhile."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    assert transport.producerState == "paused"
    consumer = Consumer()
    d.result.deliver(consumer, raw=True)
    assert transport.producerState == "producing"
    protocol.dataReceived(b"56789")
    assert consumer.data == [b"01234", b"56789"] and consumer.done == [None]


def test_interim_100_continue_is_skipped():
    """A 100 Continue before the answer is not the answer."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, _ = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert d.result.code == 201


def test_empty_bodies_free_the_connection_at_once():
    """HEAD answers, 204 and Content-Length 0 have no body: the connection is free before delivery."""
    client, endpoints, _ = make_client()
    d = send(client, None, method=b"HEAD")
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert d.result.framing == "none"
    consumer = Consumer()
    d.result.deliver(consumer, raw=True)
    assert consumer.data == [] and consumer.done == [None]
    send(client)
    assert len(endpoints.connections) == 1


def test_connection_close_answers_are_not_reused():
    """An answer with Connection: close (or an HTTP/1.0 one) closes its connection after the body."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    d.result.deliver(Consumer(), raw=True)
    assert transport.disconnecting
    send(client)
    assert len(endpoints.connections) == 2


def test_bytes_past_the_end_of_the_body_close_the_connection():
    """Extra bytes after a body are not forwarded and the connection is not reused."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, transport = endpoints.connections[0]
    consumer = Consumer()
    protocol.dataReceived(CHUNKED)
    d.result.deliver(consumer, raw=True)
    protocol.dataReceived(b"0\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert b"".join(consumer.data) == b"0\r\n\r\n" and consumer.done == [None]
    assert transport.disconnecting


def test_read_until_close_bodies_end_cleanly_with_the_connection():
    """A body with neither length nor chunking ends when the server closes; never raw."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nabc")
    consumer = Consumer()
    d.result.deliver(consumer, raw=True)
    protocol.dataReceived(b"def")
    transport.loseConnection()
    assert b"".join(consumer.data) == b"abcdef" and consumer.done == [None]


def test_broken_framing_fails_the_body_and_drops_the_connection():
    """Garbage in the chunk framing: the consumer gets ResponseFailed, the connection is aborted."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(CHUNKED)
    consumer = Consumer()
    d.result.deliver(consumer, raw=True)
    protocol.dataReceived(b"zz\r\n")
    [failure] = consumer.done
    assert failure is not None and failure.check(ResponseFailed)
    assert transport.aborted


def test_connection_lost_mid_body_fails_the_body():
    """The upstream going away mid-body is a ResponseFailed for the consumer."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(CHUNKED + b"5\r\nhel")
    consumer = Consumer()
    d.result.deliver(consumer, raw=True)
    transport.abortConnection()
    [failure] = consumer.done
    assert failure is not None and failure.check(ResponseFailed)


def test_connection_lost_before_any_byte_is_response_never_received():
    """A new connection closed before the answer: ResponseNeverReceived (the proxy may retry elsewhere)."""
    client, endpoints, _ = make_client()
    d = send(client)
    endpoints.connections[0][1].loseConnection()
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(ResponseNeverReceived)


def test_partial_head_then_loss_is_response_failed():
    """The connection closed in the middle of the head: ResponseFailed (not 'never received')."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-")
    transport.loseConnection()
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(ResponseFailed) and not failure[0].check(ResponseNeverReceived)


def test_malformed_head_fails_the_request():
    """A head paddler cannot frame (here Transfer-Encoding: gzip) fails the request and drops the connection."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(ResponseFailed) and transport.aborted


def test_a_post_written_on_a_kept_alive_connection_that_closes_is_never_sent_again():
    """The server closed a kept-alive connection right after a POST went out on it, before any answer
    byte: it may have read it and started the completion, so the POST is not written again anywhere
    (ResponseNeverReceived: the proxy answers 502)."""
    client, endpoints, _ = make_client()
    first = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    first.result.deliver(Consumer())
    second = send(client)
    assert transport.value().count(b"POST /completion") == 2
    transport.loseConnection()  # closed before any byte of the answer
    failure = []
    second.addErrback(failure.append)
    assert failure and failure[0].check(ResponseNeverReceived)
    assert len(endpoints.connections) == 1


def test_a_get_on_a_kept_alive_connection_closed_under_it_is_sent_once_more_on_a_new_one():
    """A GET (no body) whose kept-alive connection closed before any answer byte is idempotent: sent
    again on a new connection, once."""
    client, endpoints, _ = make_client()
    first = send(client, None, b"GET")
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    first.result.deliver(Consumer())
    second = send(client, None, b"GET")
    transport.loseConnection()
    assert len(endpoints.connections) == 2
    new_protocol, new_transport = endpoints.connections[1]
    assert new_transport.value().startswith(b"GET /completion")
    new_protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert second.result.code == 200
    second.result.deliver(Consumer())
    third = send(client, None, b"GET")
    new_transport.loseConnection()
    _, fourth_transport = endpoints.connections[2]
    fourth_transport.loseConnection()  # the retry failed too: no second retry
    failure = []
    third.addErrback(failure.append)
    assert failure and failure[0].check(ResponseNeverReceived) and len(endpoints.connections) == 3


def test_cancelling_while_waiting_for_the_head_aborts_the_connection():
    """Cancelling the request (the client left) aborts the upstream connection: llama.cpp stops."""
    client, endpoints, _ = make_client()
    d = send(client)
    _, transport = endpoints.connections[0]
    d.cancel()
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(CancelledError) and transport.aborted


def test_cancelling_while_connecting_cancels_the_attempt():
    """Cancelled before the connection is up: the attempt is cancelled, nothing is sent."""
    client, endpoints, _ = make_client()
    endpoints.hold = True
    d = send(client)
    d.cancel()
    d.addErrback(lambda _: None)
    assert endpoints.cancelled == [True]


def test_refused_connections_fail_the_request():
    """A refused connection is a ConnectError for the proxy to retry elsewhere."""
    client, endpoints, _ = make_client()
    endpoints.refuse = True
    failure = []
    send(client).addErrback(failure.append)
    assert failure[0].check(ConnectionRefusedError)


def test_aborting_the_body_drops_the_connection_and_tells_the_consumer():
    """abort() mid-body (client gone) drops the upstream connection once."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(CHUNKED + b"5\r\nhello\r\n")
    consumer = Consumer()
    d.result.deliver(consumer, raw=True)
    d.result.abort()
    d.result.abort()
    assert transport.aborted
    assert len(consumer.done) == 1 and consumer.done[0].check(CancelledError)


def test_pause_and_resume_reach_the_upstream_socket():
    """Backpressure: pausing the body pauses the upstream socket, resuming resumes it."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(CHUNKED)
    d.result.deliver(Consumer(), raw=True)
    d.result.pause()
    assert transport.producerState == "paused"
    d.result.resume()
    assert transport.producerState == "producing"


def test_idle_connections_expire_and_no_timer_is_left_after_close():
    """Idle connections are closed after idle_timeout by one sweep timer; close() leaves no timer."""
    client, endpoints, clock = make_client(idle_timeout=4.0)
    d = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    d.result.deliver(Consumer())
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4.0)
    assert transport.disconnecting and clock.getDelayedCalls() == []
    d = send(client)
    endpoints.connections[1][0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    d.result.deliver(Consumer())
    closed = client.close()
    assert closed.called and clock.getDelayedCalls() == []
    assert endpoints.connections[1][1].disconnecting


def test_at_most_max_idle_per_host_connections_are_kept():
    """Connections beyond max_idle_per_host are closed when their answers end."""
    client, endpoints, _ = make_client(max_idle_per_host=1)
    ds = [send(client), send(client)]
    for (protocol, _), d in zip(endpoints.connections, ds):
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        d.result.deliver(Consumer())
    assert [t.disconnecting for _, t in endpoints.connections] == [False, True]


def test_deliver_body_serves_read_body():
    """deliverBody (IResponse style) works with read_body, for probes and 503 reasons."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, _ = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
    assert read_body(d.result).result == b"busy"


@pytest.mark.parametrize("origin", [b"ftp://x:1", b"http://x:99999", b"http://[::1", b"http//x"])
def test_bad_origins_fail_without_connecting(origin):
    """Origins the client cannot use fail the request at once."""
    client, endpoints, _ = make_client()
    failure = []
    client.send(b"GET", origin, b"/", [], None).addErrback(failure.append)
    assert failure and failure[0].check(ValueError) and endpoints.connections == []


def test_ipv6_origins_connect_to_the_address():
    """http://[::1]:8080 connects to ::1 port 8080."""
    client, endpoints, _ = make_client()
    client.send(b"GET", b"http://[::1]:8080", b"/", [], None)
    assert endpoints.asked == [(b"http", b"::1", 8080)]


def test_ip_addresses_are_connected_directly_without_name_resolution():
    """Without an endpoint factory, http to an IP address is one connectTCP (no resolver thread)."""
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    client = UpstreamClient(reactor, connect_timeout=3.0)
    d = client.send(b"GET", b"http://127.0.0.1:8080", b"/slots", [(b"Host", b"127.0.0.1:8080")])
    [(host, port, factory, timeout, _)] = reactor.tcpClients
    assert (host, port, timeout) == ("127.0.0.1", 8080, 3.0)
    protocol = factory.buildProtocol(None)
    transport = Transport()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    assert transport.value() == b"GET /slots HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
    assert d.result.code == 200


def test_a_failed_direct_connection_fails_the_request():
    """connectTCP failing (refused, timed out) fails the request with that reason."""
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    client = UpstreamClient(reactor)
    d = client.send(b"GET", b"http://[::1]:8080", b"/", [])
    [(host, _, factory, _, _)] = reactor.tcpClients
    assert host == "::1"
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(ConnectionRefusedError)


def test_cancelling_a_direct_connection_stops_connecting():
    """Cancelled while connecting directly: the connector stops and the request fails as cancelled."""
    from twisted.internet.error import ConnectingCancelledError
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    client = UpstreamClient(reactor)
    d = client.send(b"GET", b"http://10.1.2.3:80", b"/", [])
    d.cancel()
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(ConnectingCancelledError, CancelledError)
    assert reactor.connectors[0].stoppedConnecting


def test_fetch_reads_a_small_body_whole():
    """fetch (probes) returns the status and the body."""
    client, endpoints, _ = make_client()
    d = client.fetch(ORIGIN, b"/slots", [(b"Host", b"x")])
    endpoints.connections[0][0].dataReceived(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n"
    )
    assert d.result == (200, b"[]")


def test_fetch_refuses_bodies_over_its_limit():
    """A body larger than fetch's limit fails it and drops the connection."""
    from paddler.upstream.body import BodyTooLarge

    client, endpoints, _ = make_client()
    d = client.fetch(ORIGIN, b"/slots", [], limit=4)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(BodyTooLarge) and transport.aborted


def test_a_kept_alive_connection_lost_after_sending_a_post_is_not_retried_however_soon():
    """Whatever the time since it was written (there was a 1 s window before), a POST is not sent again."""
    client, endpoints, clock = make_client()
    first = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    first.result.deliver(Consumer())
    second = send(client)
    clock.advance(0.001)
    transport.abortConnection()
    failure = []
    second.addErrback(failure.append)
    assert failure[0].check(ResponseNeverReceived) and len(endpoints.connections) == 1


def test_in_raw_relay_the_last_chunk_waits_for_the_end_of_the_trailers():
    """Pass-through: the last chunk and the trailers go to the consumer only once the trailers' empty
    line came; the chunks before it go at once."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, _ = endpoints.connections[0]
    protocol.dataReceived(CHUNKED + b"2\r\nok\r\n")
    consumer = Consumer()
    d.result.deliver(consumer, raw=True)
    assert consumer.data == [b"2\r\nok\r\n"]
    protocol.dataReceived(b"2\r\nhi\r\n0\r\n")
    protocol.dataReceived(b"X-Sum: 1\r\n")
    assert consumer.data == [b"2\r\nok\r\n"] and consumer.done == []
    protocol.dataReceived(b"\r\n")
    assert b"".join(consumer.data) == b"2\r\nok\r\n2\r\nhi\r\n0\r\nX-Sum: 1\r\n\r\n" and consumer.done == [None]


def test_in_raw_relay_a_broken_trailer_section_never_hands_over_the_last_chunk():
    """A last chunk followed by something that is no trailer (another answer's status line): the body
    fails and the consumer never got the last chunk, so its client cannot take the answer as complete."""
    client, endpoints, _ = make_client()
    d = send(client)
    protocol, transport = endpoints.connections[0]
    protocol.dataReceived(CHUNKED + b"2\r\nok\r\n")
    consumer = Consumer()
    d.result.deliver(consumer, raw=True)
    protocol.dataReceived(b"0\r\n")
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
    assert consumer.data == [b"2\r\nok\r\n"]
    assert consumer.done[0] is not None and consumer.done[0].check(ResponseFailed) and transport.aborted
