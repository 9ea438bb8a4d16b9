"""Relaying an upstream's response body to the client, chunk by chunk, with backpressure.

Request bodies are read whole before dispatch (bounded by
``--max-request-body``) so that a request can be retried on another
upstream; response bodies are written to the client as they arrive and
are never held in memory.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from paddler.interfaces import IUpstreamBody, IUpstreamClient


class UpstreamIdleTimeout(Exception):
    """No byte from the upstream within the idle timeout, mid-stream."""


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory (bounded by --max-request-body)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


#: Bytes of the end of a body kept to read llama.cpp's C{timings} from.
TAIL_BYTES = 8192
_TIMINGS = re.compile(rb'"timings"\s*:\s*(\{[^{}]*\})')


def timings_in(tail: bytes) -> dict[str, Any] | None:
    """The last C{"timings": {...}} object in C{tail} (llama.cpp ends its answers with it), or C{None}."""
    found = None
    for found in _TIMINGS.finditer(tail):
        pass
    if found is None:
        return None
    try:
        timings = json.loads(found.group(1))
    except ValueError:
        return None
    return timings if isinstance(timings, dict) else None


@dataclass(frozen=True)
class ResponseHead:
    """An upstream response's status line and end-to-end headers, written when its body begins."""

    code: int
    phrase: bytes
    headers: list[tuple[bytes, list[bytes]]]

    def apply(self, request: server.Request) -> None:
        request.setResponseCode(self.code, self.phrase)
        set_header = request.responseHeaders.setRawHeaders
        for name, values in self.headers:
            set_header(name, values)


@implementer(IPushProducer)
class Relay(Protocol):
    """
    Receives an upstream response body and writes each piece to the client
    as it arrives. It is the client connection's producer, so a slow client
    pauses the upstream socket; C{done} fires when the body ends, fails on an
    upstream error or idle timeout, and cancelling it aborts the upstream
    request.

    It takes the body from an L{IUpstreamBody} (L{start}: C{body_data},
    C{body_done}), or as the C{IProtocol} of Twisted's C{IResponse.deliverBody}
    (C{dataReceived}, C{connectionLost}; L{AgentBody}). With C{raw} (an
    HTTP/1.1 client, a chunked or sized answer) the body's bytes go to the
    client as they came, chunk framing included: nothing is decoded and
    encoded again. Otherwise the payload is decoded and the client's own
    framing (chunked for HTTP/1.1, none for HTTP/1.0) applied.

    The response C{head} is written with the first byte of the body (or at
    its end, for an empty one): an upstream that fails before that has sent
    the client nothing, so the request can be tried elsewhere. The idle
    deadline moves with each piece (a float); its timer checks it when it
    fires instead of being rescheduled for every piece. The last
    L{TAIL_BYTES} of the decoded body are kept for L{timings_in}.
    """

    transport: Any = None

    def __init__(
        self,
        request: server.Request,
        clock: IReactorTime,
        idle_timeout: float,
        head: ResponseHead | None = None,
        on_first_byte: Callable[[], None] | None = None,
    ) -> None:
        self._request = request
        self._on_first_byte = on_first_byte
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._head = head
        self._idle_call: IDelayedCall | None = None
        self._last_activity = 0.0
        self.first_byte_at: float | None = None
        self._paused = False
        self._body: Any = None
        self._raw_chunked = False
        self._tail: deque[bytes] | None = None  # kept here only for IResponse bodies
        self._tail_size = 0
        self.done: Deferred[None] = Deferred(self._cancel)

    def start(self, body: Any, raw: bool = False) -> None:
        """Relay C{body} (an L{IUpstreamBody}); C{raw} only where the client takes the upstream's framing as it is."""
        self._body = body
        self._raw_chunked = raw and body.framing == "chunked"
        _no_delay(self._request)
        self.connectionMade()
        body.deliver(self, raw)

    def tail(self) -> bytes:
        """The last bytes of the decoded body relayed so far (at least L{TAIL_BYTES} when there were as many)."""
        if self.transport is None and self._body is not None:
            return bytes(self._body.tail())
        return b"".join(self._tail) if self._tail is not None else b""

    def _write_head(self) -> None:
        head = self._head
        if head is None:
            return
        self._head = None
        request = self._request
        head.apply(request)
        if self._raw_chunked:
            request.write(b"")  # the head, with Transfer-Encoding: chunked
            # the upstream's chunks go out as they are, the last chunk included
            request.chunked = 0  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        if self._body is None:
            _no_delay(self._request)
        if self._request.producer is not self:
            self._request.registerProducer(self, True)
        self._arm()

    def _arm(self) -> None:
        # Data only moves the deadline (a float); the timer checks it when it
        # fires instead of being rescheduled for every chunk.
        if self._paused:
            return
        self._last_activity = self._clock.seconds()
        if self._idle_call is None:
            self._idle_call = self._clock.callLater(self._idle_timeout, self._idle)

    def _disarm(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _unregister(self) -> None:
        if self._request.producer is self and self._request.channel is not None:
            self._request.unregisterProducer()

    def _idle(self) -> None:
        self._idle_call = None
        quiet = self._clock.seconds() - self._last_activity
        if quiet < self._idle_timeout:
            self._idle_call = self._clock.callLater(self._idle_timeout - quiet, self._idle)
            return
        self._unregister()
        if not self.done.called:
            self.done.errback(
                UpstreamIdleTimeout(f"no data from the upstream for {self._idle_timeout:g} s")
            )
        self.stopProducing()

    # -- the body: IUpstreamBody's consumer --------------------------------

    def body_data(self, data: bytes) -> None:
        if self.done.called:
            return
        if self.first_byte_at is None:
            self.first_byte_at = self._clock.seconds()
            self._write_head()
            if self._on_first_byte is not None:
                self._on_first_byte()
                self._on_first_byte = None
        if not self._paused:
            self._last_activity = self._clock.seconds()
        self._request.write(data)

    def body_done(self, failure: Failure | None) -> None:
        self._disarm()
        self._unregister()
        if self.done.called:
            return
        if failure is None:
            self._write_head()
            self.done.callback(None)
        else:
            self.done.errback(failure)

    # -- the body: IProtocol of IResponse.deliverBody ----------------------

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        tail = self._tail
        if tail is None:
            tail = self._tail = deque()
        tail.append(data)
        self._tail_size += len(data)
        while self._tail_size - len(tail[0]) >= TAIL_BYTES:
            self._tail_size -= len(tail.popleft())
        self.body_data(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # type: ignore[assignment]
        ended = reason.check(ResponseDone, PotentialDataLoss)
        self.body_done(None if ended else reason)

    def _cancel(self, _: Deferred[None]) -> None:
        self._disarm()
        self.stopProducing()

    # IPushProducer, on behalf of the upstream connection. While the client
    # is not reading, the upstream is paused and its silence is not its fault.
    def pauseProducing(self) -> None:
        self._paused = True
        self._disarm()
        if self.transport is not None:
            self.transport.pauseProducing()
        elif self._body is not None:
            self._body.pause()

    def resumeProducing(self) -> None:
        self._paused = False
        if not self.done.called:
            self._arm()
        if self.transport is not None:
            self.transport.resumeProducing()
        elif self._body is not None:
            self._body.resume()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()
        elif self._body is not None:
            self._body.abort()


def _no_delay(request: server.Request) -> None:
    """
    Send each piece at once: without TCP_NODELAY, a small write waits for
    the ACK of the one before, which a client may delay by up to 40 ms.
    """
    transport = getattr(request.channel, "transport", None)
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:  # not a TCP socket after all (unix sockets)
            pass


# -- Twisted's Agent as an upstream client (tests, and callers that inject an IAgent) ----


@implementer(IUpstreamClient)
class AgentClient:
    """L{IUpstreamClient} over a Twisted C{IAgent}: bodies always arrive decoded (L{AgentBody})."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def send(
        self, method: bytes, origin: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None
    ) -> Deferred[Any]:
        twisted_headers = Headers()
        for name, value in headers:
            twisted_headers.addRawHeader(name, value)
        producer = BytesProducer(body) if body is not None else None
        d = self._agent.request(method, origin + target, twisted_headers, producer)
        return d.addCallback(AgentBody)

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(IUpstreamBody)
class AgentBody:
    """
    An C{IResponse} as an L{IUpstreamBody}: Twisted decodes the body
    (C{framing} is ``decoded``, never relayed raw) and L{deliver} takes an
    C{IProtocol} with a C{tail()} (a L{Relay}).
    """

    framing = "decoded"

    def __init__(self, response: Any) -> None:
        self._response = response
        self.code = response.code
        self.phrase = response.phrase
        self.headers = [
            (name, value) for name, values in response.headers.getAllRawHeaders() for value in values
        ]
        self._protocol: Any = None

    def deliver(self, consumer: Any, raw: bool = False) -> None:
        self._protocol = consumer
        self._response.deliverBody(consumer)

    def deliverBody(self, protocol: Any) -> None:
        self._protocol = protocol
        self._response.deliverBody(protocol)

    def _transport(self) -> Any:
        return getattr(self._protocol, "transport", None)

    def pause(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.pauseProducing()

    def resume(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.resumeProducing()

    def abort(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.stopProducing()

    def tail(self) -> bytes:
        tail = getattr(self._protocol, "tail", None)
        return bytes(tail()) if tail is not None else b""
