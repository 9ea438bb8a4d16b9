"""The server side of every listener: an HTTP channel that slow or hostile clients cannot pin down.

L{GuardedSite} (a Twisted C{Site}) builds a L{GuardedChannel} (an
C{HTTPChannel}) per connection. On top of Twisted's parser the channel adds:

- a B{head deadline}: the request line and headers must arrive within
  C{header_timeout} seconds of the request's first byte. Twisted's idle
  timer restarts on every byte, so a client trickling one byte a minute
  (slowloris) would hold its connection for ever;
- a B{body deadline}: once the head is in, the body must arrive at
  C{min_body_rate} bytes per second on average, after C{header_timeout}
  seconds of grace;
- B{answers at once}, before the body is read: C{Content-Length} above the
  body limit is 413 (no C{100 Continue} is sent for it), a body that would
  pass the process's body memory (L{paddler.server.memory.BodyMemory}) is 503;
- B{JSON answers to framing errors} Twisted would close with a bare 400 or
  with nothing: a request line or header that does not parse, or an
  HTTP version other than 1.0/1.1 (400), a request line longer than
  C{MAX_LENGTH} (414), headers larger than C{totalHeadersSize} or more than
  C{maxHeaders} of them (431), line endings that are a bare LF (400: RFC
  9112 lets a server refuse them, and Twisted would wait for a CRLF until
  the idle timeout). These checks run in the public hooks of
  C{LineReceiver} and C{HTTPChannel} (C{lineReceived}, C{headerReceived},
  C{lineLengthExceeded}, C{allHeadersReceived}) before Twisted's own, so
  Twisted's private C{_respondToBadRequestAndDisconnect} is left alone. A
  I{chunked} body is followed by L{ChunkedScanner} as it arrives, so a
  malformed one (a size that is not hex, data longer than its size, a bare
  LF) gets a JSON 400 before Twisted's decoder would close with a bare one.

Every early answer is written by L{GuardedChannel.refuse}: a complete
HTTP/1.1 response with a JSON error body and C{Connection: close}, then a
half-close, then at most C{linger} seconds of reading and discarding what
the client still sends (closing with unread data would make the kernel
reset the connection, and the client might lose the answer), then an abort.

L{GuardedSite} also caps its open connections (C{max_connections}): a
connection above the cap is answered 503 at once and closed (lingering
like the others, except in a flood: past L{MAX_LINGERING_REFUSALS} of them
at once, closed right after the answer), counted, and logged at most once a
minute.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.server import Site
from zope.interface import implementer

from paddler.config import BalancerConfig
from paddler.errors import (
    BadRequest,
    BodyTimeout,
    HeadersTooLarge,
    PaddlerHTTPError,
    RequestTimeout,
    TooManyClientConnections,
    TooManyConnections,
    URITooLong,
    body_memory_full,
)
from paddler.interfaces import IBoundedRequest, IGuardedChannel, IGuardedSite
from paddler import flush
from paddler.upstream.http1 import ChunkedScanner, FramingError
from paddler.server.instance import INSTANCE_HEADER
from paddler.server.target import TargetRejected, check_visible

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_HEAD_END = b"\r\n\r\n"

#: Reason phrases Twisted's table lacks.
_PHRASES = {431: b"Request Header Fields Too Large", 508: b"Loop Detected"}
#: Connections above the cap that linger after their answer; past this many they are closed at once.
MAX_LINGERING_REFUSALS = 128
#: Seconds between two log lines about connections refused at the cap.
CAP_LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class ClientLimits:
    """What a listener tolerates from its clients (see ``paddler balancer --help``); defaults from the settings table."""

    header_timeout: float = BalancerConfig.header_timeout
    min_body_rate: float = float(BalancerConfig.min_request_body_rate)
    idle_timeout: float = BalancerConfig.client_idle_timeout
    max_connections: int = BalancerConfig.max_connections
    linger: float = 2.0  # not a setting: how long an early answer's connection stays for the client to read it
    max_connections_per_client: int = BalancerConfig.max_connections_per_client  # 0: no limit


def request_line_error(line: bytes) -> PaddlerHTTPError | None:
    """Why C{line} is not a request line Twisted and paddler accept, or C{None}."""
    parts = line.split(b" ")
    if len(parts) != 3:
        return BadRequest("the request line must be METHOD TARGET HTTP/1.1, separated by single spaces")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        return BadRequest("the request method must be a token (letters, digits and !#$%&'*+-.^_`|~)")
    try:
        check_visible(target)
    except TargetRejected as e:
        return BadRequest(e.message)
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        # Another HTTP version is a client's choice, not a server failure: 400, not 505.
        if _VERSION.fullmatch(version):
            return BadRequest("only HTTP/1.1 and HTTP/1.0 are supported on this port")
        return BadRequest("the request line must end with HTTP/1.1 or HTTP/1.0")
    return None


def early_response(error: PaddlerHTTPError, instance_id: str | None = None) -> bytes:
    """A complete HTTP/1.1 response for C{error}: JSON body, C{Connection: close}."""
    body = error.body()
    phrase = RESPONSES.get(error.status) or _PHRASES.get(error.status, b"Error")
    lines = [
        b"HTTP/1.1 %d %s" % (error.status, phrase),
        b"content-type: application/json; charset=utf-8",
        b"content-length: %d" % len(body),
        b"connection: close",
        b"cache-control: no-store",
    ]
    for name, value in error.headers.items():
        if name.lower() not in (b"connection", b"content-length", b"content-type"):
            lines.append(name + b": " + value)
    if instance_id:
        lines.append(INSTANCE_HEADER + b": " + instance_id.encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _close_after_answer(transport: Any, call_later: Callable[..., IDelayedCall], linger: float) -> IDelayedCall | None:
    """Half-close C{transport} (the answer goes out, then FIN) and abort it after C{linger} seconds."""
    half_close = getattr(transport, "loseWriteConnection", None)
    try:
        if half_close is None:
            raise NotImplementedError("no half-close")  # TLS
        half_close()
    except NotImplementedError:
        transport.loseConnection()
        return None
    return call_later(linger, transport.abortConnection)


@implementer(IGuardedChannel)
class GuardedChannel(HTTPChannel):
    """
    An C{HTTPChannel} with a head deadline, a body rate, answers before the
    body and JSON errors (see the module docstring). Its L{GuardedSite} holds
    the limits.

    Each request goes through the phases C{idle} (between requests),
    C{head} (from its first byte to the end of its headers), C{body},
    C{handling} (a resource has it); C{refused} once answered early.
    """

    site: GuardedSite

    def __init__(self) -> None:
        super().__init__()
        self.phase = "idle"
        self.refused = False
        self._deadline: IDelayedCall | None = None
        self._linger: IDelayedCall | None = None
        self._tail = b""
        self._read_end = b""  # the last byte of the latest read
        self._head_size = 0
        self._headers = 0
        self._framing = 0
        self._chunked: ChunkedScanner | None = None
        self._request_line_seen = False
        self._empty_line_seen = False
        self._body_started = 0.0
        self._body_received = 0
        self._client: str | None = None
        self._secure: bool | None = None

    # -- connection -------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        flush.hook(self.transport)  # a turn's writes in one send (plain TCP only)
        self._client = client_address(self.transport.getPeer()) if self.transport is not None else None
        self.site.connection_opened(self._client)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        self.site.connection_closed(self._client)
        super().connectionLost(reason)

    def isSecure(self) -> bool:
        """Whether the connection is TLS: asked once per connection (every forwarded request asks)."""
        secure = self._secure
        if secure is None:
            secure = self._secure = bool(super().isSecure())
        return secure

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return  # answered already: the rest is read and dropped until the connection closes
        if self.phase == "idle":
            self._start_head()
        if self.phase == "head" and self._bare_lf(data):
            self.refuse(BadRequest("request lines must end with CRLF (\\r\\n), not a bare LF"))
            return
        self._read_end = data[-1:]  # what a head that begins later in this read sees before the next read
        super().dataReceived(data)
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        """
        Start the head or the body deadline if this read left the request in
        that phase without one. Deadlines are armed only at the end of a read,
        at the same clock time as the phase began: a head (a body) that came
        whole in the read that began it needs no timer, and most do (the
        proxy's requests are a few hundred bytes), so the usual request arms
        and cancels none.
        """
        if self._deadline is not None or self.refused:
            return
        if self.phase == "head":
            self._deadline = self.callLater(self.site.limits.header_timeout, self._head_timed_out)
        elif self.phase == "body":
            self._deadline = self.callLater(self._body_allowed(), self._check_body)

    # -- head -------------------------------------------------------------

    def _start_head(self) -> None:
        self.phase = "head"
        # the byte before the head's first (a CRLF may be cut between two reads)
        self._tail = self._read_end
        self._head_size = self._headers = self._framing = 0
        self._chunked = None
        self._request_line_seen = self._empty_line_seen = False
        self._cancel_deadline()  # the head deadline is armed at the end of the read (_arm_deadline)

    def _bare_lf(self, data: bytes) -> bool:
        """Whether the head (the part of it in C{data}) has an LF without its CR."""
        seen = self._tail
        combined = seen + data[: self.totalHeadersSize + len(_HEAD_END)]
        end = combined.find(_HEAD_END)
        stop = len(combined) if end < 0 else end + len(_HEAD_END)
        if _BARE_LF.search(combined, len(seen), stop) is not None:
            return True
        self._tail = combined[-3:] if end < 0 else b""
        return False

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self.phase == "head":
            timeout = self.site.limits.header_timeout
            self.refuse(
                RequestTimeout(f"the request line and headers did not arrive within {timeout:g} s (--header-timeout)")
            )

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return
        if self.phase == "idle":
            # a request pipelined behind one answered within the same read: LineReceiver goes on
            # with the lines of that read without a new dataReceived, so its head starts here
            self._start_head()  # (its bare-LF lookbehind: this read's last byte; a line with one is caught below)
        if b"\n" in line:
            # (only such a pipelined head can get here with one: dataReceived checks the others)
            self.refuse(BadRequest("request lines must end with CRLF (\\r\\n), not a bare LF"))
            return
        self._head_size += len(line) + 2
        if self._head_size > self.totalHeadersSize:
            self._too_long()
            return
        if not self._request_line_seen:
            if not line and not self._empty_line_seen:
                self._empty_line_seen = True  # one empty line before a request is allowed (RFC 9112 2.2)
                super().lineReceived(line)
                return
            error = request_line_error(line)
            if error is not None:
                self.refuse(error)
                return
            self._request_line_seen = True
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if not self.refused:
            self._too_long()

    def _too_long(self) -> None:
        if self._request_line_seen:
            self.refuse(HeadersTooLarge(f"the request headers are larger than {self.totalHeadersSize} bytes"))
        else:
            self.refuse(URITooLong(f"the request line is longer than {self.MAX_LENGTH} bytes"))

    def headerReceived(self, line: bytes) -> bool:
        if self.refused:
            return False
        error = self._header_error(line)
        if error is not None:
            self.refuse(error)
            return False
        return bool(super().headerReceived(line))

    def _header_error(self, line: bytes) -> PaddlerHTTPError | None:
        name, colon, value = line.partition(b":")
        if not colon:
            return BadRequest("a header line has no colon")
        if not _TOKEN.fullmatch(name):
            return BadRequest("a header name must be a token (no spaces before the colon)")
        value = value.strip(b" \t")
        if b"\x00" in value or b"\r" in value:
            return BadRequest("a header value contains NUL or CR")
        self._headers += 1
        if self._headers > self.maxHeaders:
            return HeadersTooLarge(f"the request has more than {self.maxHeaders} headers")
        lower = name.lower()
        if lower == b"content-length":
            if not value.isdigit():
                return BadRequest("Content-Length must be a whole number of bytes")
            self._framing += 1
        elif lower == b"transfer-encoding":
            if value.lower() == b"identity":
                return None
            if value.lower() != b"chunked":
                return BadRequest("the only Transfer-Encoding accepted is chunked")
            self._chunked = ChunkedScanner(strict=True)
            self._framing += 1
        if self._framing > 1:
            return BadRequest("the request has more than one Content-Length or Transfer-Encoding header")
        return None

    def allHeadersReceived(self) -> None:
        if self.refused:
            return
        request = self.requests[-1]
        length = self.length
        bounded = IBoundedRequest.providedBy(request)  # a plain Request has no limit to check here
        if length is not None and bounded and length > request.max_body:
            self.refuse(request.too_large())
            return
        if length and bounded and not request.claim_body(length):
            self.refuse(body_memory_full())
            return
        self._cancel_deadline()
        super().allHeadersReceived()
        if length != 0:
            self.phase = "body"
            self._body_started = self.site.reactor.seconds()
            self._body_received = 0  # its deadline is armed at the end of the read (_arm_deadline)

    # -- body -------------------------------------------------------------

    def _body_allowed(self) -> float:
        """Seconds the body may take from the end of the head, for what has arrived or was announced."""
        limits = self.site.limits
        expected = max(self._body_received, self.length or 0)
        return limits.header_timeout + expected / limits.min_body_rate

    def _check_body(self) -> None:
        self._deadline = None
        if self.phase != "body":
            return
        left = self._body_allowed() - (self.site.reactor.seconds() - self._body_started)
        if left > 0:
            self._set_deadline(left, self._check_body)
            return
        self.refuse(
            BodyTimeout(
                f"the request body arrived slower than {self.site.limits.min_body_rate:g} bytes/s "
                "(--min-request-body-rate)"
            )
        )

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if self.phase == "body":
            self._body_received += len(data)
            scanner = self._chunked
            if scanner is not None:
                try:
                    scanner.feed(data)
                except FramingError as e:
                    self.refuse(BadRequest(f"the chunked request body is malformed: {e}"))
                    return
                if scanner.done:
                    self._chunked = None
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self.refused:
            return  # a body refused part-way (too large, no memory): nothing is processed
        self._cancel_deadline()
        self.phase = "handling"
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self.phase = "idle"
        super().requestDone(request)

    # -- answering early --------------------------------------------------

    def refuse(self, error: PaddlerHTTPError) -> None:
        """Answer C{error} now, before any resource sees the request, and close the connection."""
        if self.refused or self.transport is None:
            return
        self.refused = True
        self.phase = "refused"
        self._cancel_deadline()
        self.setTimeout(None)
        self.clearLineBuffer()
        for request in self.requests:
            if IBoundedRequest.providedBy(request):
                request.release_body()
        self.transport.write(early_response(error, self.site.instance_id))
        self.site.answered_early(error)
        self._linger = _close_after_answer(self.transport, self.callLater, self.site.limits.linger)

    def _set_deadline(self, delay: float, call: Callable[[], None]) -> None:
        self._cancel_deadline()
        self._deadline = self.callLater(delay, call)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


def client_address(address: Any) -> str | None:
    """The client a connection counts against for --max-connections-per-client (None: not an IP peer)."""
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else None


class OverCapacity(Protocol):
    """A connection above the listener's cap (or its client's): answered at once (C{error}), then closed."""

    transport: Any

    def __init__(self, site: GuardedSite, error: PaddlerHTTPError) -> None:
        self.site = site
        self.error = error
        self._linger: IDelayedCall | None = None

    def connectionMade(self) -> None:
        site = self.site
        site.lingering_refusals += 1
        self.transport.write(early_response(self.error, site.instance_id))
        if site.lingering_refusals > MAX_LINGERING_REFUSALS:
            # A flood: no descriptor is kept for it. The answer goes out, but a
            # request that arrives after the close makes the kernel reset it.
            self.transport.loseConnection()
            return
        self._linger = _close_after_answer(self.transport, site.reactor.callLater, site.limits.linger)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.site.lingering_refusals -= 1
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None


@implementer(IGuardedSite)
class GuardedSite(Site):
    """
    A C{Site} whose connections are L{GuardedChannel}s, at most
    C{limits.max_connections} of them open at once.

    @param what: the listener's name in log lines and refusals.
    @param on_answered: called with each error answered early (framing,
        limits, deadlines, the connection cap), e.g. to count it.
    @param parser: C{"twisted"} (Twisted's C{HTTPChannel} parses heads) or
        C{"httptools"} (L{paddler.server.httptools_channel.HttptoolsChannel}).
    @ivar connections_refused: connections refused at the cap since start.
    """

    protocol = GuardedChannel  # type: ignore[assignment]
    #: the parser of sites built without one (C{--request-parser}'s default; the tests run both)
    request_parser = "twisted"
    noisy = False
    displayTracebacks = False
    logger = Logger()  # Site.log is the access log

    def __init__(
        self,
        resource: Any,
        limits: ClientLimits,
        reactor: Any,
        what: str = "paddler",
        request_factory: Any = None,
        instance_id: str | None = None,
        access_log: bool = False,
        on_answered: Callable[[PaddlerHTTPError], None] | None = None,
        parser: str | None = None,
    ) -> None:
        parser = parser or self.request_parser
        if parser == "httptools":
            from paddler.server.httptools_channel import HttptoolsChannel

            self.protocol = HttptoolsChannel  # type: ignore[assignment]
        elif parser != "twisted":
            raise ValueError(f"unknown request parser {parser!r}")
        super().__init__(
            resource,
            requestFactory=request_factory,
            timeout=limits.idle_timeout,
            reactor=reactor,
            parsePOSTFormSubmission=False,  # bodies are relayed or parsed as JSON, never as forms
        )
        self.limits = limits
        self.what = what
        self.instance_id = instance_id
        self.access_log = access_log
        self.on_answered = on_answered
        self.open_connections = 0
        self.lingering_refusals = 0
        self.connections_refused = 0
        #: open connections per client address (kept always, so a reload can set the limit)
        self.connections_by_client: dict[str, int] = {}
        self._refused_unlogged: dict[str, int] = {}
        self._cap_logged_at: dict[str, float] = {}

    def log(self, request: Any) -> None:  # type: ignore[override]
        if self.access_log:
            super().log(request)

    def buildProtocol(self, addr: Any) -> Any:
        limits = self.limits
        if self.open_connections >= limits.max_connections:
            error: PaddlerHTTPError = TooManyConnections(
                f"{self.what} has {limits.max_connections} open connections (--max-connections); retry shortly",
                headers={b"retry-after": b"1"},
            )
            self._refused(error, "{what}: {open} connections open, the cap (--max-connections)")
            return OverCapacity(self, error)
        per_client = limits.max_connections_per_client
        client = client_address(addr)
        if per_client and client is not None and self.connections_by_client.get(client, 0) >= per_client:
            error = TooManyClientConnections(
                f"this client address has {per_client} open connections to {self.what} "
                "(--max-connections-per-client); close one or retry shortly",
                headers={b"retry-after": b"1"},
            )
            self._refused(error, "{what}: a client address holds --max-connections-per-client connections")
            return OverCapacity(self, error)
        return super().buildProtocol(addr)

    def connection_opened(self, client: str | None = None) -> None:
        self.open_connections += 1
        if client is not None:
            self.connections_by_client[client] = self.connections_by_client.get(client, 0) + 1

    def connection_closed(self, client: str | None = None) -> None:
        self.open_connections -= 1
        if client is not None and client in self.connections_by_client:
            left = self.connections_by_client[client] - 1
            if left > 0:
                self.connections_by_client[client] = left
            else:
                del self.connections_by_client[client]

    def answered_early(self, error: PaddlerHTTPError) -> None:
        if self.on_answered is not None:
            try:
                self.on_answered(error)
            except Exception:
                self.logger.failure("{what}: counting an early answer failed", what=self.what)

    def _refused(self, error: PaddlerHTTPError, line: str) -> None:
        """Count a refused connection; say so at most once a minute per kind of refusal."""
        self.connections_refused += 1
        self.answered_early(error)
        kind = type(error).__name__
        self._refused_unlogged[kind] = self._refused_unlogged.get(kind, 0) + 1
        now = self.reactor.seconds()
        logged_at = self._cap_logged_at.get(kind)
        if logged_at is None or now - logged_at >= CAP_LOG_INTERVAL:
            self.logger.warn(
                line + "; refused {refused} such connection(s) since the last such line",
                what=self.what,
                open=self.open_connections,
                refused=self._refused_unlogged[kind],
            )
            self._cap_logged_at[kind] = now
            self._refused_unlogged[kind] = 0
