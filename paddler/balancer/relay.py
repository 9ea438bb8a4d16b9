"""Relaying an upstream's response body to the client, chunk by chunk, with backpressure.

Request bodies are read whole before dispatch (bounded by
``--max-request-body``) so that a request can be retried on another
upstream; response bodies are written to the client as they arrive and
are never held in memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web import http, server
from zope.interface import implementer


class UpstreamIdleTimeout(Exception):
    """No byte from the upstream within the idle timeout, mid-stream."""


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
class RelayedHead:
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
class Relay:
    """
    Receives an upstream response body and writes each piece to the client
    as it arrives. It is the client connection's producer, so a slow client
    pauses the upstream socket; C{done} fires when the body ends, fails on an
    upstream error or idle timeout, and cancelling it aborts the upstream
    request.

    It takes the body from an L{IUpstreamBody} (L{start}; the body calls
    C{body_data} and C{body_done}). With C{raw} (an HTTP/1.1 client, a
    chunked or sized answer) the body's bytes go to the client as they came,
    chunk framing included: nothing is decoded and encoded again. Otherwise
    the payload is decoded and the client's own framing (chunked for
    HTTP/1.1, none for HTTP/1.0) applied.

    The response C{head} is written with the first byte of the body (or at
    its end, for an empty one): an upstream that fails before that has sent
    the client nothing, so the request can be tried elsewhere. The idle
    deadline moves with each piece (a float, from C{activity_clock}: the
    time of the reactor turn, L{paddler.turn_clock.TurnClock}, read once per
    turn instead of once per piece); its timer checks it when it fires
    instead of being rescheduled for every piece. The body keeps the
    end of its decoded payload (L{IUpstreamBody.tail}) for L{timings_in}.
    """

    def __init__(
        self,
        request: server.Request,
        clock: IReactorTime,
        idle_timeout: float,
        head: RelayedHead | None = None,
        on_first_byte: Callable[[], None] | None = None,
        activity_clock: Callable[[], float] | None = None,
    ) -> None:
        self._request = request
        self._on_first_byte = on_first_byte
        self._clock = clock
        #: the time each piece moves the idle deadline to (L{paddler.turn_clock.TurnClock}: read once per turn)
        self._activity = activity_clock or clock.seconds
        self._idle_timeout = idle_timeout
        self._head = head
        self._idle_call: IDelayedCall | None = None
        self._last_activity = 0.0
        self.first_byte_at: float | None = None
        self._paused = False
        self._body: Any = None
        self._raw = False
        self._raw_chunked = False
        #: the client transport's C{write}, once the head is out and the body goes as it came (see L{_direct})
        self._direct_write: Callable[[bytes], None] | None = None
        self.done: Deferred[None] = Deferred(self._cancel)

    def start(self, body: Any, raw: bool = False, head_now: bool = False) -> None:
        """Relay C{body} (an L{IUpstreamBody}); C{raw} only where the client takes the upstream's framing
        as it is. C{head_now}: write the head at once, not with the first byte of the body (an event
        stream that may stay silent until something happens, like llama-server's C{/models/sse})."""
        self._body = body
        self._raw = raw
        self._raw_chunked = raw and body.framing == "chunked"
        _no_delay(self._request)
        if self._request.producer is not self:
            self._request.registerProducer(self, True)
        if head_now:
            self._write_head()
        self._arm()
        body.deliver(self, raw)

    def tail(self) -> bytes:
        """The end of the decoded body relayed so far, as the body kept it."""
        return bytes(self._body.tail()) if self._body is not None else b""

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
        write = self._direct_write
        if write is not None:
            # the usual chunk: straight to the client's transport, what Request.write would do
            if not self._paused:
                self._last_activity = self._activity()
            request = self._request
            if request.finished or request._disconnected:  # type: ignore[attr-defined]
                request.write(data)  # Twisted's answer: RuntimeError after finish, nothing once gone
                return
            request.sentLength += len(data)
            write(data)
            return
        if self.first_byte_at is None:
            self.first_byte_at = self._clock.seconds()
            self._write_head()
            if self._on_first_byte is not None:
                self._on_first_byte()
                self._on_first_byte = None
        if not self._paused:
            self._last_activity = self._activity()
        self._request.write(data)
        if self._raw:
            # from the second piece on (the first byte is recorded, the head is out): the direct write
            self._direct_write = _direct(self._request)

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

    def _cancel(self, _: Deferred[None]) -> None:
        self._disarm()
        self.stopProducing()

    # IPushProducer, on behalf of the upstream connection. While the client
    # is not reading, the upstream is paused and its silence is not its fault.
    def pauseProducing(self) -> None:
        self._paused = True
        self._disarm()
        if self._body is not None:
            self._body.pause()

    def resumeProducing(self) -> None:
        self._paused = False
        if not self.done.called:
            self._arm()
        if self._body is not None:
            self._body.resume()

    def stopProducing(self) -> None:
        if self._body is not None:
            self._body.abort()


def _direct(request: server.Request) -> Callable[[bytes], None] | None:
    """
    The client transport's C{write} for the rest of a pass-through body, or
    C{None} where C{Request.write} must stay in the path. Once the head is
    out and the body goes as it came (the upstream's chunk framing, or a
    sized body), C{server.Request.write} -> C{http.Request.write} ->
    C{HTTPChannel.write} -> C{transport.write} does, per chunk, only checks
    that no longer change (the default content type, HEAD, an encoder, the
    head itself) and three calls; what still matters is kept in
    L{Relay.body_data}: C{sentLength}, nothing written once the client is
    gone, C{RuntimeError} after C{finish}. Backpressure is untouched: the
    channel stays the transport's producer and the relay the request's.
    Only an HTTP/1.1 channel whose C{write} is Twisted's own (a plain
    C{transport.write}), a request still writing through the class's
    C{write} (HEAD and bodiless codes replace it), with no encoder and no
    chunking left to Twisted, qualifies. In memory this saves ~0.3 us of ~1.6
    per chunk (bench/relay_micro.py).
    """
    channel = request.channel
    if (
        not request.startedWriting
        or request.finished
        or request._disconnected  # type: ignore[attr-defined]
        or request.chunked  # type: ignore[attr-defined]
        or "write" in request.__dict__
        or getattr(request, "_encoder", None) is not None
        or getattr(request, "_inFakeHead", False)
        or type(channel).write is not http.HTTPChannel.write
        or type(request).write is not server.Request.write
    ):
        return None
    transport = getattr(channel, "transport", None)
    return None if transport is None else transport.write  # type: ignore[no-any-return]


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
