"""A lean HTTP/1.1 client for upstreams: persistent connections, raw pass-through bodies.

Twisted's C{Agent} decodes every chunked body and builds a C{Headers}
object, a parser and several Deferreds per request; the proxy then encodes
the chunks again for its client. This client writes a request in one
C{write}, parses the response head once, and hands the body over either
as it arrived on the wire (L{UpstreamResponse.deliver} with C{raw=True}:
chunk framing included, so the proxy forwards it to an HTTP/1.1 client as
is) or decoded. Either way a L{paddler.upstream.http1.BodyScanner} finds the
exact end of the body, so a connection whose answer ended cleanly goes
back to the pool.

Errors follow Twisted's client: C{ResponseNeverReceived} when the
connection broke before any response byte, C{ResponseFailed} after that,
C{ConnectError}s from connecting; cancelling a request (or a body) aborts
its connection, which is how llama.cpp learns to stop generating.

Reuse and retries (docs/reliability.md, "Upstream framing"):

 - a connection goes back to the pool only when its answer ended exactly
   (its length, or the last chunk and the trailers' empty line), with no
   byte behind it, on a head whose framing was unambiguous
   (L{paddler.upstream.http1.parse_head} refuses the rest);
 - a pooled connection is always reading: a byte that arrives while it is
   idle closes it, and before a request is written on a kept-alive
   connection its socket is peeked, so bytes (or a close) that arrived but
   were not read yet close it too, and the request goes on another;
 - each such drop is counted (L{UpstreamClient.dropped}), logged at warning
   and reported to C{on_dropped}; the origin then loses keep-alive for
   L{SUSPECT_SECONDS}: bytes an upstream writes after the next request went
   out cannot be told from that request's answer in HTTP/1.1, so a server
   caught once is not given another request on a used connection;
 - a request that was written is never written again, except a C{GET} or
   C{HEAD} without a body whose kept-alive connection closed before any
   byte of the answer (once, on a new connection).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import socket

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed, ResponseNeverReceived
from zope.interface import implementer

from paddler.interfaces import IUpstreamBody, IUpstreamClient
from paddler import flush
from paddler.upstream.endpoints import CachingEndpointFactory
from paddler.upstream.http1 import (
    MAX_HEAD,
    BodyScanner,
    ChunkedScanner,
    CloseScanner,
    FramingError,
    LengthScanner,
    ResponseHead,
    parse_head,
)

#: Bytes at the end of a payload kept for llama.cpp's C{timings} (see L{UpstreamResponse.tail}).
TAIL_BYTES = 8192
#: Status codes whose responses never have a body.
NO_BODY = frozenset({204, 304})

HeaderList = list[tuple[bytes, bytes]]


def _clean(value: bytes) -> bytes:
    """A header name or value with line breaks replaced by spaces (as Twisted's C{Headers} does)."""
    if b"\n" in value or b"\r" in value:
        return b" ".join(value.splitlines())
    return value


def encode_request(method: bytes, target: bytes, headers: HeaderList, body: bytes | None) -> bytes:
    """The bytes of a request: request line, headers, C{Content-Length} when there is a body, body."""
    lines = [b"%s: %s\r\n" % pair for pair in headers]
    section = b"".join(lines)
    if section.count(b"\n") != len(lines) or section.count(b"\r") != len(lines):
        # a line break inside a name or a value: never let it start a header of its own
        section = b"".join(b"%s: %s\r\n" % (_clean(name), _clean(value)) for name, value in headers)
    head = b"%s %s HTTP/1.1\r\n%s" % (method, target, section)
    if body is None:
        return head + b"\r\n"
    return b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)


class _Exchange:
    """One request on one connection, from sending to the end of its response body."""

    __slots__ = ("method", "data", "d", "response", "idempotent_retry")

    def __init__(
        self, method: bytes, data: bytes, d: Deferred[Any], idempotent_retry: Callable[[], None] | None
    ) -> None:
        self.method = method
        self.data = data
        self.d = d
        self.response: UpstreamResponse | None = None
        #: sends a GET/HEAD again on a new connection (its kept-alive one closed before any answer byte)
        self.idempotent_retry = idempotent_retry


#: Methods sent again (once, on a new connection) when a kept-alive connection closed under them
#: before any answer byte: nothing else is ever written twice (a completion would run twice).
IDEMPOTENT = frozenset({b"GET", b"HEAD"})
#: How long an origin caught sending unexpected bytes gets a new connection for every request.
SUSPECT_SECONDS = 600.0

# connection states
_IDLE, _HEAD, _BODY, _CLOSED = range(4)


class UpstreamConnection(Protocol):
    """One HTTP/1.1 connection to an upstream, carrying one request at a time."""

    transport: Any

    def __init__(self, pool: _HostPool, connected: Deferred[Any] | None = None) -> None:
        self._pool = pool
        self._connected = connected
        self._state = _IDLE
        self._exchange: _Exchange | None = None
        self._buffer = b""
        self._received = False  # any byte of the current response
        self.idle_since = 0.0
        self.requests = 0
        self.lost = False

    def connectionMade(self) -> None:
        flush.hook(self.transport)
        connected, self._connected = self._connected, None
        if connected is not None:
            connected.callback(self)

    # -- sending -----------------------------------------------------------

    def send(self, exchange: _Exchange) -> None:
        self._exchange = exchange
        self._state = _HEAD
        self._received = False
        self._buffer = b""
        self.requests += 1
        self.transport.write(exchange.data)

    def unread(self) -> str | None:
        """
        Why this idle connection must not carry a request, if it must not: the
        server closed it, or bytes wait in its socket that the reactor has not
        read yet (plain TCP; a TLS socket holds records of its own).
        """
        if self.lost or self._state != _IDLE or getattr(self.transport, "disconnecting", False):
            return "closed"
        sock = getattr(self.transport, "socket", None)
        if sock is None or getattr(self.transport, "TLS", False):
            return None
        try:
            peeked = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return None
        except OSError:
            return "closed"
        return "unexpected" if peeked else "closed"

    def _unexpected(self, what: str) -> None:
        """The server sent what HTTP/1.1 does not allow here: drop the connection, count and say so."""
        self._state = _CLOSED
        self.transport.abortConnection()
        self._pool.dropped(what)

    # -- receiving ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            response = self._exchange.response  # type: ignore[union-attr]
            response._body_bytes(data)  # type: ignore[union-attr]
            return
        if state != _HEAD:
            if state == _IDLE:
                # the server has nothing to say between answers: what it says now would be the next one's
                self._unexpected("bytes on an idle connection")
            return
        self._received = True
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self._fail_head(FramingError("response head too long"))
                return
            try:
                head = parse_head(self._buffer[:end])
            except FramingError as e:
                self._fail_head(e)
                return
            rest = self._buffer[end + 4:]
            if 100 <= head.code < 200:
                if head.code == 101:
                    # paddler never asks for an upgrade: what follows is not HTTP on this connection
                    self._fail_head(FramingError("unexpected 101 Switching Protocols"))
                    return
                if head.chunked or head.length:
                    self._fail_head(FramingError(f"a {head.code} interim answer with a body"))
                    return
                self._buffer = rest  # 100 Continue, 102 Processing, 103 Early Hints: skip
                continue
            self._buffer = b""
            self._got_head(head, rest)
            return

    def _fail_head(self, error: Exception) -> None:
        exchange = self._exchange
        self._exchange = None
        self._state = _CLOSED
        self.transport.abortConnection()
        self._pool.malformed(str(error))
        if exchange is not None and not exchange.d.called:
            exchange.d.errback(ResponseFailed([Failure(error)]))

    def _got_head(self, head: ResponseHead, rest: bytes) -> None:
        exchange = self._exchange
        assert exchange is not None
        if exchange.method == b"HEAD" or head.code in NO_BODY:
            framing = "none"
        elif head.chunked:
            framing = "chunked"
        elif head.length is not None:
            framing = "length"
        else:
            framing = "close"
        response = UpstreamResponse(self, head, framing)
        exchange.response = response
        exchange.data = b""  # an answer came: the request is not sent again
        if framing == "none" or (framing == "length" and head.length == 0):
            # nothing to wait for: the connection is free before anyone reads the (empty) body
            response._ended_early()
            self.body_finished(response, excess=bool(rest))
        else:
            self._state = _BODY
            response._pending = rest
            # hold the body until someone takes it (deliver / deliverBody)
            self.transport.pauseProducing()
        exchange.d.callback(response)

    def body_finished(self, response: UpstreamResponse, excess: bool) -> None:
        """The body of C{response} ended at its last byte: keep the connection if it may be reused."""
        self._exchange = None
        if excess:
            # more bytes than the answer: the server frames its answers otherwise than we do
            self._unexpected("bytes after the end of an answer")
            return
        if response.head.connection_close or self.lost:
            self._state = _CLOSED
            self.transport.loseConnection()
            return
        self._state = _IDLE
        why = self.unread()
        if why is not None:
            # already behind the answer in the socket (a read not taken yet): never pooled
            if why == "unexpected":
                self._unexpected("bytes right after the end of an answer")
            else:
                self._state = _CLOSED
                self.transport.loseConnection()
            return
        self.transport.resumeProducing()  # paused from the head until the body was taken: idle ones read
        self._pool.release(self)

    def abort(self) -> None:
        self._state = _CLOSED
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[assignment]
        self.lost = True
        state, self._state = self._state, _CLOSED
        self._pool.lost(self)
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            return
        if state == _HEAD:
            if exchange.d.called:
                return
            retry = exchange.idempotent_retry
            if retry is not None and not self._received and reason.check(ConnectionDone, ConnectionLost):
                # a GET/HEAD on a kept-alive connection the server closed as we sent: once on a new one
                retry()
                return
            error = (ResponseFailed if self._received else ResponseNeverReceived)([reason])
            exchange.d.errback(error)
        elif state == _BODY and exchange.response is not None:
            exchange.response._connection_lost(reason)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: _HostPool) -> None:
        self._pool = pool

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._pool)


class _Direct(ClientFactory):
    """One C{connectTCP} to an IP address: no name resolution, no endpoint wrapper around the protocol."""

    noisy = False

    def __init__(self, pool: _HostPool) -> None:
        self._pool = pool
        self._connector: Any = None
        self.d: Deferred[UpstreamConnection] = Deferred(self._cancel)

    def start(self, reactor: Any, host: str, port: int, timeout: float) -> Deferred[UpstreamConnection]:
        self._connector = reactor.connectTCP(host, port, self, timeout=timeout)
        return self.d

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._pool, self.d)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.d.called:
            self.d.errback(reason)

    def _cancel(self, d: Deferred[UpstreamConnection]) -> None:
        if self._connector is not None:
            self._connector.stopConnecting()
        if not d.called:
            d.errback(ConnectingCancelledError(self._connector.getDestination() if self._connector else None))


@implementer(IUpstreamBody)
class UpstreamResponse:
    """
    An upstream's answer: its status and headers at once, its body when a
    consumer takes it. C{framing} is ``chunked``, ``length``, ``close``
    (ends with the connection) or ``none``.
    """

    __slots__ = (
        "head", "code", "phrase", "version", "headers", "framing", "length",
        "_conn", "_scanner", "_consumer", "_raw", "_pending", "_finished", "_paused", "_early", "_lost",
        "_kept", "_held",
    )

    def __init__(self, conn: UpstreamConnection, head: ResponseHead, framing: str) -> None:
        self.head = head
        self.code = head.code
        self.phrase = head.phrase
        self.version = head.version
        self.headers = head.headers
        self.framing = framing
        self.length = head.length if framing == "length" else None
        self._conn: UpstreamConnection | None = conn
        self._scanner: BodyScanner | None = None
        self._consumer: Any = None
        self._raw = False
        self._pending = b""
        self._finished = False
        self._paused = False
        self._early = False
        self._lost: Failure | None = None
        self._kept = b""  # a body taken whole (take_body), for tail()
        #: raw bytes from the last chunk on, held until the trailers end (never relayed if they do not)
        self._held = b""

    # -- taking the body -----------------------------------------------------

    def deliver(self, consumer: Any, raw: bool = False) -> None:
        """
        Send the body to C{consumer}: C{body_data(bytes)} per piece, then
        C{body_done(None)} at its end or C{body_done(failure)}. With C{raw}
        (only for ``chunked`` and ``length`` framing) the pieces are the bytes
        as received, chunk framing included; otherwise the decoded payload.
        """
        if self._consumer is not None:
            raise RuntimeError("the body was already delivered")
        raw = raw and self.framing in ("chunked", "length")
        self._consumer = consumer
        self._raw = raw
        sink = None if raw else consumer.body_data
        if self.framing == "chunked":
            self._scanner = ChunkedScanner(TAIL_BYTES, sink)
        elif self.framing == "length":
            self._scanner = LengthScanner(self.length or 0, TAIL_BYTES, sink)
        elif self.framing == "close":
            self._scanner = CloseScanner(TAIL_BYTES, sink)
        else:
            self._scanner = LengthScanner(0)
        self._start()

    def take_body(self) -> bytes | None:
        """
        The whole body at once, if it already arrived with the head (a small
        sized answer; an empty one): the response is then over and its
        connection free. C{None} otherwise; then use L{deliver}.
        """
        if self._consumer is not None or self._finished:
            return None
        if self._early:
            self._finished = True
            return b""
        if self.framing != "length" or self._lost is not None:
            return None
        length = self.length or 0
        pending = self._pending
        if len(pending) < length:
            return None
        self._pending = b""
        self._finished = True
        self._kept = pending if len(pending) == length else pending[:length]
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.body_finished(self, excess=len(pending) > length)
        return self._kept

    def deliverBody(self, protocol: Any) -> None:
        """C{IResponse.deliverBody}: the decoded body to an C{IProtocol} (C{read_body}, probes)."""
        self.deliver(_ProtocolConsumer(protocol, self))

    def _ended_early(self) -> None:
        self._conn = None
        self._early = True

    def _start(self) -> None:
        if self._early:
            self._finished = True
            self._consumer.body_done(None)
            return
        pending, self._pending = self._pending, b""
        if pending:
            self._body_bytes(pending)
        if self._finished:
            return
        if self._lost is not None:
            self._connection_lost(self._lost)
        elif self._conn is not None and not self._paused:
            self._conn.transport.resumeProducing()

    def _body_bytes(self, data: bytes) -> None:
        scanner = self._scanner
        if scanner is None:  # not taken yet (the transport is paused; a read was in flight)
            self._pending += data
            return
        if self._finished:
            return
        try:
            used = scanner.feed(data)
        except FramingError as e:
            self._fail(Failure(ResponseFailed([Failure(e)])))
            return
        if self._raw and used:
            piece = data if used == len(data) else data[:used]
            if scanner.done:
                if self._held:
                    piece, self._held = self._held + piece, b""
                self._consumer.body_data(piece)
            elif scanner.in_trailers or self._held:
                # the last chunk came: the client gets it only with the end of the trailers, so a
                # broken trailer section breaks the client's stream instead of looking complete
                self._held += piece
            else:
                self._consumer.body_data(piece)
        if scanner.done:
            self._end(excess=used < len(data))

    def _end(self, excess: bool) -> None:
        if self._finished:
            return
        self._finished = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.body_finished(self, excess)
        self._consumer.body_done(None)

    def _fail(self, failure: Failure) -> None:
        if self._finished:
            return
        self._finished = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        if self._consumer is not None:
            self._consumer.body_done(failure)

    def _connection_lost(self, reason: Failure) -> None:
        self._conn = None
        if self._finished:
            return
        scanner = self._scanner
        if scanner is None:  # nobody took the body yet: the loss counts when they do
            self._lost = reason
            return
        self._finished = True
        if scanner.eof():
            self._consumer.body_done(None)
        else:
            self._consumer.body_done(Failure(ResponseFailed([reason])))

    # -- flow control --------------------------------------------------------

    def pause(self) -> None:
        """Stop reading from the upstream (the consumer cannot keep up)."""
        self._paused = True
        if self._conn is not None:
            self._conn.transport.pauseProducing()

    def resume(self) -> None:
        self._paused = False
        if self._conn is not None and self._scanner is not None:
            self._conn.transport.resumeProducing()

    def abort(self) -> None:
        """Drop the connection: the upstream sees the request cancelled."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        if not self._finished:
            self._finished = True
            if self._consumer is not None:
                self._consumer.body_done(Failure(CancelledError()))

    def tail(self) -> bytes:
        """The last L{TAIL_BYTES} (or a few more) of the decoded payload."""
        if self._scanner is not None:
            return self._scanner.tail()
        return self._kept[-TAIL_BYTES:]

    @property
    def raw(self) -> bool:
        """Whether the body is being delivered as received (chunk framing included)."""
        return self._raw


class _Whole:
    """Collects a small body (probes): the status and the bytes, at most C{limit} of them."""

    __slots__ = ("response", "limit", "pieces", "size", "d")

    def __init__(self, response: UpstreamResponse, limit: int) -> None:
        self.response = response
        self.limit = limit
        self.pieces: list[bytes] = []
        self.size = 0
        self.d: Deferred[tuple[int, bytes]] = Deferred(lambda _: response.abort())

    def body_data(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.d.called:
                from paddler.upstream.body import BodyTooLarge

                self.d.errback(BodyTooLarge(f"body larger than {self.limit} bytes"))
            self.response.abort()
            return
        self.pieces.append(data)

    def body_done(self, failure: Failure | None) -> None:
        if self.d.called:
            return
        if failure is None:
            body = self.pieces[0] if len(self.pieces) == 1 else b"".join(self.pieces)
            self.d.callback((self.response.code, body))
        else:
            self.d.errback(failure)


def _note_instance(response: UpstreamResponse, seen: list[bytes]) -> UpstreamResponse:
    seen.extend(value for name, value in response.headers if name.lower() == b"x-paddler-instance")
    return response


def _read_whole(response: UpstreamResponse, limit: int) -> Deferred[tuple[int, bytes]]:
    whole = _Whole(response, limit)
    response.deliver(whole)
    return whole.d


class _ProtocolConsumer:
    """Adapts an C{IProtocol} to L{UpstreamResponse.deliver}, the way C{IResponse.deliverBody} does."""

    def __init__(self, protocol: Any, response: UpstreamResponse) -> None:
        self._protocol = protocol
        self._response = response
        protocol.makeConnection(_BodyTransport(response))

    def body_data(self, data: bytes) -> None:
        self._protocol.dataReceived(data)

    def body_done(self, failure: Failure | None) -> None:
        if failure is None:
            close = self._response.framing == "close"
            self._protocol.connectionLost(Failure(PotentialDataLoss() if close else ResponseDone()))
        else:
            self._protocol.connectionLost(failure)


class _BodyTransport:
    """The transport a body protocol sees: pause, resume, stop (abort)."""

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response

    def pauseProducing(self) -> None:
        self._response.pause()

    def resumeProducing(self) -> None:
        self._response.resume()

    def stopProducing(self) -> None:
        self._response.abort()


class _HostPool:
    """Idle connections to one origin (most recently used first) and how to make new ones."""

    def __init__(self, client: UpstreamClient, origin: bytes, endpoint: Any, address: tuple[str, int] | None) -> None:
        self.client = client
        self.origin = origin
        self.endpoint = endpoint
        #: (ip, port) for plain TCP to an IP address: connected directly, without an endpoint
        self.address = address
        self.idle: list[UpstreamConnection] = []
        self.connections = 0
        self.factory = _ConnectionFactory(self)
        #: until when every request gets a new connection (unexpected bytes were seen)
        self.suspect_until = 0.0

    def connect(self) -> Deferred[Any]:
        if self.address is not None:
            client = self.client
            return _Direct(self).start(client.reactor, self.address[0], self.address[1], client.connect_timeout)
        return self.endpoint.connect(self.factory)

    def take(self, now: float) -> UpstreamConnection | None:
        idle = self.idle
        expiry = self.client.idle_timeout
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < expiry:
                why = conn.unread()
                if why is None:
                    return conn
                if why == "unexpected":
                    conn._unexpected("unread bytes on an idle connection")
                    continue
            conn.transport.loseConnection()
        return None

    def release(self, conn: UpstreamConnection) -> None:
        client = self.client
        if len(self.idle) >= client.max_idle_per_host or client.closing or client.clock.seconds() < self.suspect_until:
            conn.transport.loseConnection()
            return
        conn.idle_since = self.client.clock.seconds()
        self.idle.append(conn)
        self.client._idle_added()

    def dropped(self, what: str) -> None:
        """A connection was closed for bytes HTTP/1.1 does not allow: count, warn, stop keeping connections."""
        self._suspect()
        self.client._dropped(self.origin, what)

    def malformed(self, what: str) -> None:
        """An answer's head could not be framed: its connection was closed, its request fails (502)."""
        client = self.client
        client.malformed[self.origin] = client.malformed.get(self.origin, 0) + 1
        self._suspect()

    def _suspect(self) -> None:
        # the server frames its answers otherwise than we do: no connection of it is clean any more
        client = self.client
        self.suspect_until = client.clock.seconds() + client.suspect_seconds
        for conn in list(self.idle):
            conn._state = _CLOSED
            conn.transport.loseConnection()

    def lost(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        self.connections -= 1
        self.client._connection_lost(self)

    def expire(self, now: float) -> float | None:
        """Close the connections idle too long; return when the oldest left expires."""
        expiry = self.client.idle_timeout
        while self.idle and now - self.idle[0].idle_since >= expiry:
            self.idle.pop(0).transport.loseConnection()
        return self.idle[0].idle_since + expiry if self.idle else None


@implementer(IUpstreamClient)
class UpstreamClient:
    """
    Requests to upstreams over kept-alive HTTP/1.1 connections (at most
    C{max_idle_per_host} idle per origin, closed after C{idle_timeout}
    seconds unused: llama-server closes its own after 5). Connections come
    from C{endpoint_factory} (TCP for ``http``, TLS for ``https``).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoint_factory: CachingEndpointFactory | None = None,
        max_idle_per_host: int = 64,
        idle_timeout: float = 4.0,
        clock: IReactorTime | None = None,
        connect_timeout: float = 10.0,
        on_dropped: Callable[[bytes, str], None] | None = None,
        suspect_seconds: float = SUSPECT_SECONDS,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor
        self.connect_timeout = connect_timeout
        #: without an endpoint factory, plain http to an IP address connects directly (connectTCP)
        self._direct = endpoint_factory is None
        self._endpoints = endpoint_factory or CachingEndpointFactory(reactor, connect_timeout=connect_timeout)
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout = idle_timeout
        self.closing = False
        self._hosts: dict[bytes, _HostPool] = {}
        self._sweep: Any = None
        self._closed: list[Deferred[None]] = []
        #: connections dropped for unexpected bytes, per origin (L{SUSPECT_SECONDS})
        self.dropped: dict[bytes, int] = {}
        #: answers refused for a malformed or ambiguous head, per origin
        self.malformed: dict[bytes, int] = {}
        #: told (origin, what) when a connection is dropped: the proxy counts it on the upstream
        self.on_dropped = on_dropped
        #: how long an origin that sent unexpected bytes or a malformed head gets no kept-alive connection
        self.suspect_seconds = suspect_seconds

    # -- IUpstreamClient -------------------------------------------------------

    def send(
        self,
        method: bytes,
        origin: bytes,
        target: bytes,
        headers: HeaderList,
        body: bytes | None = None,
    ) -> Deferred[UpstreamResponse]:
        """
        Send C{method target} to C{origin} (C{b"http://host:port"}) with
        C{headers} (name, value pairs; the caller sets C{Host}) and C{body}.
        Fires with an L{UpstreamResponse} once its head arrived; cancelling
        aborts the connection (or the connection attempt).
        """
        host = self._hosts.get(origin)
        if host is None:
            try:
                host = self._host(origin)
            except ValueError as e:
                return fail(e)
        data = encode_request(method, target, headers, body)
        return self._dispatch(host, method, data, retry=method in IDEMPOTENT and body is None)

    def get(self, url: bytes, headers: HeaderList | None = None) -> Deferred[UpstreamResponse]:
        """C{GET url} (the caller's C{headers} plus C{Host})."""
        scheme, sep, rest = url.partition(b"://")
        slash = rest.find(b"/")
        authority, target = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
        return self.send(b"GET", scheme + sep + authority, target, [(b"Host", authority), *(headers or ())])

    def fetch(
        self,
        origin: bytes,
        target: bytes,
        headers: HeaderList,
        limit: int = 4 * 1024 * 1024,
        seen: list[bytes] | None = None,
    ) -> Deferred[tuple[int, bytes]]:
        """
        C{GET target} on C{origin}: the status and the whole body (at most
        C{limit} bytes). C{seen}, when given, receives the value of the
        answer's C{X-Paddler-Instance} header, if it has one.
        """
        d = self.send(b"GET", origin, target, headers)
        if seen is not None:
            d.addCallback(_note_instance, seen)
        return d.addCallback(_read_whole, limit)

    def close(self) -> Deferred[None]:
        """Close idle connections and refuse to keep new ones; fires when the idle ones closed."""
        self.closing = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for host in self._hosts.values():
            for conn in list(host.idle):
                conn.transport.loseConnection()
        d: Deferred[None] = Deferred()
        if any(host.idle for host in self._hosts.values()):
            self._closed.append(d)
        else:
            d.callback(None)
        return d

    # -- internals -------------------------------------------------------------

    def _host(self, origin: bytes) -> _HostPool:
        scheme, sep, authority = origin.partition(b"://")
        if not sep or scheme not in (b"http", b"https"):
            raise ValueError(f"unsupported upstream origin {origin!r}")
        hostname, port = _split_authority(authority, 443 if scheme == b"https" else 80)
        address = None
        if self._direct and scheme == b"http":
            text = hostname.decode("ascii", "replace")
            if isIPAddress(text) or isIPv6Address(text):
                address = (text, port)
        endpoint = None if address is not None else self._endpoints.endpoint_for(scheme, hostname, port)
        host = self._hosts[origin] = _HostPool(self, origin, endpoint, address)
        return host

    def _dispatch(self, host: _HostPool, method: bytes, data: bytes, retry: bool) -> Deferred[UpstreamResponse]:
        return _Request(self, host, method, data, retry).d

    def _dropped(self, origin: bytes, what: str) -> None:
        self.dropped[origin] = self.dropped.get(origin, 0) + 1
        if self.on_dropped is not None:
            self.on_dropped(origin, what)
        else:
            self.log.warn(
                "upstream {origin}: connection dropped ({what}); new connections only for {seconds:g} s",
                origin=origin.decode("ascii", "replace"),
                what=what,
                seconds=self.suspect_seconds,
            )

    def _idle_added(self) -> None:
        if self._sweep is None or not self._sweep.active():
            self._sweep = self.clock.callLater(self.idle_timeout, self._expire)

    def _expire(self) -> None:
        self._sweep = None
        now = self.clock.seconds()
        soonest: float | None = None
        for host in list(self._hosts.values()):
            when = host.expire(now)
            if when is not None and (soonest is None or when < soonest):
                soonest = when
        if soonest is not None and not self.closing:
            self._sweep = self.clock.callLater(max(0.0, soonest - now), self._expire)

    def _connection_lost(self, host: _HostPool) -> None:
        if self._closed and not any(h.idle for h in self._hosts.values()):
            waiting, self._closed = self._closed, []
            for d in waiting:
                d.callback(None)
        if not host.idle and not host.connections and len(self._hosts) > 4096:
            self._hosts.pop(host.origin, None)


class _Request:
    """Getting one request onto a connection (kept alive or new) until its response head arrives."""

    __slots__ = ("d", "_client", "_host", "_method", "_data", "_connecting", "_conn", "_exchange", "_retried")

    def __init__(self, client: UpstreamClient, host: _HostPool, method: bytes, data: bytes, retry: bool) -> None:
        self.d: Deferred[UpstreamResponse] = Deferred(self._cancel)
        self._client = client
        self._host = host
        self._method = method
        self._data = data
        self._connecting: Deferred[Any] | None = None
        self._retried: Deferred[UpstreamResponse] | None = None
        conn = host.take(client.clock.seconds())
        self._conn = conn
        self._exchange = _Exchange(method, data, self.d, self._again if (conn is not None and retry) else None)
        if conn is not None:
            conn.send(self._exchange)
            return
        host.connections += 1
        self._connecting = host.connect()
        self._connecting.addCallbacks(self._connected, self._not_connected)

    def _connected(self, conn: UpstreamConnection) -> None:
        if self.d.called:  # cancelled, yet the connection came: keep it for later
            self._host.release(conn)
            return
        self._conn = conn
        conn.send(self._exchange)

    def _not_connected(self, failure: Failure) -> None:
        self._host.connections -= 1
        if not self.d.called:
            self.d.errback(failure)

    def _again(self) -> None:
        # the kept-alive connection was closed under a GET/HEAD: once more on a new one
        self._retried = self._client._dispatch(self._host, self._method, self._data, retry=False)
        self._retried.chainDeferred(self.d)

    def _cancel(self, _: Deferred[UpstreamResponse]) -> None:
        if self._retried is not None:
            self._retried.cancel()
            return
        if self._connecting is not None and not self._connecting.called:
            self._connecting.cancel()
        conn = self._conn
        if conn is not None and conn._exchange is self._exchange:
            conn._exchange = None
            conn.abort()


def _split_authority(authority: bytes, default_port: int) -> tuple[bytes, int]:
    """C{host:port} (or C{[v6]:port}) into the host and the port number."""
    if authority.startswith(b"["):
        close = authority.find(b"]")
        if close < 0:
            raise ValueError(f"malformed authority {authority!r}")
        hostname, rest = authority[1:close], authority[close + 1:]
        if rest and not rest.startswith(b":"):
            raise ValueError(f"malformed authority {authority!r}")
        port_text = rest[1:]
    else:
        hostname, _, port_text = authority.partition(b":")
    if not port_text:
        return hostname, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"malformed port in {authority!r}")
    return hostname, int(port_text)
