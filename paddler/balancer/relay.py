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
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


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
        for name, values in self.headers:
            request.responseHeaders.setRawHeaders(name, values)


@implementer(IPushProducer)
class Relay(Protocol):
    """
    Receives an upstream response body and writes each chunk to the client as
    it arrives. It is the client connection's producer, so a slow client
    pauses the upstream socket; C{done} fires when the body ends, fails on an
    upstream error or idle timeout, and cancelling it aborts the upstream.

    The response C{head} is written with the first byte of the body (or at
    its end, for an empty one): an upstream that fails before that has sent
    the client nothing, so the request can be tried elsewhere. The last
    L{TAIL_BYTES} of the body are kept for L{timings_in}.
    """

    transport: Any

    def __init__(
        self,
        request: server.Request,
        clock: IReactorTime,
        idle_timeout: float,
        head: ResponseHead | None = None,
    ) -> None:
        self._request = request
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._head = head
        self._idle_call: IDelayedCall | None = None
        self._last_activity = 0.0
        self.first_byte_at: float | None = None
        self._paused = False
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self.done: Deferred[None] = Deferred(self._cancel)

    def tail(self) -> bytes:
        """The last bytes of the body relayed so far (at least L{TAIL_BYTES} when there were as many)."""
        return b"".join(self._tail)

    def _write_head(self) -> None:
        if self._head is not None:
            self._head.apply(self._request)
            self._head = None

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._arm()

    def _arm(self) -> None:
        # Data only moves the deadline (a float); the timer checks it when it
        # fires instead of being rescheduled for every chunk.
        if self._paused:
            return
        self._last_activity = self._clock.seconds()
        if self._idle_call is None or not self._idle_call.active():
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
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self.first_byte_at is None:
            self.first_byte_at = self._clock.seconds()
            self._write_head()
        self._arm()
        self._tail.append(data)
        self._tail_size += len(data)
        while self._tail_size - len(self._tail[0]) >= TAIL_BYTES:
            self._tail_size -= len(self._tail.popleft())
        self._request.write(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        self._disarm()
        self._unregister()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._write_head()
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _cancel(self, _: Deferred[None]) -> None:
        self._disarm()
        if self.transport is not None:
            self.transport.stopProducing()

    # IPushProducer, on behalf of the upstream connection. While the client
    # is not reading, the upstream is paused and its silence is not its fault.
    def pauseProducing(self) -> None:
        self._paused = True
        self._disarm()
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if not self.done.called:
            self._arm()
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


