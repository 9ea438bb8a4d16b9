"""The proxy port's request head parsed by C{httptools} (llhttp, C) instead of Twisted's C{LineReceiver}.

A prototype behind C{--request-parser httptools} (off by default: see
docs/performance.md, "A faster HTTP parser on the proxy port?", for what it
saves and where it answers otherwise than Twisted's parser).

L{HttptoolsChannel} is a L{paddler.server.channel.GuardedChannel}: it keeps
Twisted's C{HTTPChannel} for everything after the head (the request
objects, pipelining, persistence, C{100 Continue}, the response side, the
idle timeout) and replaces only the per-line parsing of the head and the
body's framing, which Twisted does in Python, one call per line:

- the B{request line} is split and checked by paddler itself, with the
  same function as the Twisted path (L{paddler.server.channel.request_line_error}:
  method a token, target visible ASCII, HTTP/1.0 or 1.1), answered 414
  past C{MAX_LENGTH}; one empty line before it is allowed, as there;
- the B{header fields} go through C{httptools}, fed a fixed request line
  (C{GET / HTTP/1.1}: the real one was checked already, so llhttp's own
  rules for methods, targets and versions never apply), and each field
  goes through the same checks as on the Twisted path
  (L{GuardedChannel._header_error}: a token name, no NUL or CR, at most
  C{maxHeaders}, one framing header, a whole-number C{Content-Length},
  no C{Transfer-Encoding} but C{chunked}); what llhttp refuses itself is
  a JSON 400;
- the B{head size} (C{totalHeadersSize}, 431) and the B{bare LF} (400)
  checks are the channel's own, as on the Twisted path;
- the B{body} is framed here: C{Content-Length} bytes are handed to the
  request as they come, a chunked body is decoded by the strict
  L{paddler.upstream.http1.ChunkedScanner} (the validator of the Twisted
  path) with the request as its sink;
- the B{deadlines}, the early answers (413 before the body, 503 without
  body memory, JSON errors, the linger) and the connection caps are the
  L{GuardedChannel}'s and L{GuardedSite}'s, unchanged.

Where it differs from the Twisted path (measured by
tests/test_request_parsers.py's fuzz): llhttp refuses (400) control
characters other than HTAB in header values and obs-folded header lines,
which Twisted accepts (folding them into one value).
"""

from __future__ import annotations

from typing import Any

import httptools

from paddler.errors import BadRequest, PaddlerHTTPError
from paddler.interfaces import IBoundedRequest
from paddler.server.channel import _HEAD_END, GuardedChannel, request_line_error
from paddler.upstream.http1 import ChunkedScanner, FramingError

#: What the parser is fed instead of the request line (checked by paddler before).
_FIXED_LINE = b"GET / HTTP/1.1\r\n"


class _Stop(Exception):
    """Raised in a parser callback to stop at a header paddler refuses (the error is on the channel)."""


class HttptoolsChannel(GuardedChannel):
    """A L{GuardedChannel} whose request heads are parsed by C{httptools} (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._parser: Any = None
        self._head = b""  # the head so far (bounded by the size checks)
        self._fed = 0  # bytes of C{_head} given to the parser
        self._line_done = False
        self._stopped: PaddlerHTTPError | None = None
        self._remaining = 0  # Content-Length bytes still to come
        self._dropping = False
        self._request: Any = None  # the request whose head or body is being read

    # -- reading ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.refused or self._dropping:
            return
        if self._handlingRequest:
            # a request is being answered: keep what follows for later (as HTTPChannel does)
            self._dataBuffer.append(data)
            if sum(map(len, self._dataBuffer)) > self._optimisticEagerReadSize and not self._waitingForTransport:
                self._networkProducer.pauseProducing()
            return
        self.resetTimeout()
        while data and not self.refused and not self._handlingRequest:
            if self.phase == "idle":
                if not self.persistent:
                    # the last request said Connection: close; what comes after it is dropped
                    self._dropping = True
                    return
                self._start_head()
            if self.phase == "head":
                if self._bare_lf(data):
                    self.refuse(BadRequest("request lines must end with CRLF (\\r\\n), not a bare LF"))
                    return
                data = self._head_data(data)
            elif self.phase == "body":
                data = self._body_data(data)
            else:
                break
        self._arm_deadline()

    def _start_head(self) -> None:
        super()._start_head()
        self._head = b""
        self._fed = 0
        self._line_done = False
        self._stopped = None
        self._parser = None

    def _head_data(self, data: bytes) -> bytes:
        """Take the head's part of C{data}; return what follows the head (empty while it goes on)."""
        head = self._head + data
        if not self._line_done and not self._empty_line_seen:
            if head.startswith(b"\r\n"):
                # one empty line before a request is allowed (RFC 9112 2.2)
                self._empty_line_seen = True
                head = head[2:]
            elif head == b"\r":
                self._head = head
                return b""
        end = head.find(_HEAD_END)
        rest = b""
        if end >= 0:
            rest = head[end + len(_HEAD_END):]
            head = head[: end + len(_HEAD_END)]
        self._head = head
        before = 2 if self._empty_line_seen else 0  # the empty line counts in the head's size, as on Twisted's path
        if not self._line_done:
            line_end = head.find(b"\r\n")
            if line_end < 0:
                if len(head) > self.MAX_LENGTH:
                    self._too_long()
                return b""
            if line_end > self.MAX_LENGTH or before + line_end + 2 > self.totalHeadersSize:
                self._too_long()
                return b""
            line = head[:line_end]
            error = request_line_error(line)
            if error is not None:
                self.refuse(error)
                return b""
            self._line_done = self._request_line_seen = True
            self._fed = line_end + 2
            self._begin(line)
        # the size checks of the Twisted path: complete lines within totalHeadersSize, a line within MAX_LENGTH
        complete = head.rfind(b"\r\n") + 2
        if before + complete > self.totalHeadersSize or len(head) - complete > self.MAX_LENGTH:
            self._too_long()
            return b""
        piece = head[self._fed:]
        self._fed = len(head)
        if piece:
            try:
                self._parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                pass  # an Upgrade request: paddler serves it as a plain request (Upgrade is hop-by-hop)
            except httptools.HttpParserCallbackError as e:
                if not isinstance(e.__context__, _Stop):
                    raise
            except httptools.HttpParserError as e:
                request = self.requests[-1]
                if "Content-Length overflow" in str(e) and IBoundedRequest.providedBy(request):
                    # more than 2**64 - 1 bytes: larger than any body limit (413, as on Twisted's path)
                    self.refuse(request.too_large())
                else:
                    self.refuse(self._explain(head, e))
                return b""
            if self._stopped is not None:
                self.refuse(self._stopped)
                return b""
        if end < 0:
            return b""
        return self._head_done(rest)

    def _explain(self, head: bytes, error: Exception) -> PaddlerHTTPError:
        """
        What paddler's own header checks say of a head llhttp refused (the
        Twisted path's answer, same words), else llhttp's reason as a 400.
        """
        self._headers = self._framing = 0
        for line in head.split(b"\r\n")[1:]:
            if not line:
                break
            if line[:1] in (b" ", b"\t"):
                continue  # obs-fold: Twisted joins it to the header before; llhttp refuses it
            found = self._header_error(line)
            if found is not None:
                return found
        return BadRequest(f"the request headers do not parse: {error}")

    def _begin(self, line: bytes) -> None:
        """The request line is in and checked: a request object, a parser for its header fields."""
        self._command, self._path, self._version = line.split(b" ")
        request = self.requestFactory(self, len(self.requests))  # type: ignore[call-arg]
        self.requests.append(request)
        self._request = request
        self.length = 0
        parser = self._parser = httptools.HttpRequestParser(self)
        # paddler frames the body itself (llhttp sees only the head) and checks Transfer-Encoding
        # itself (chunked, or identity: ignored, as Twisted does); llhttp would refuse identity
        parser.set_dangerous_leniencies(lenient_transfer_encoding=True)
        parser.feed_data(_FIXED_LINE)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        error = self._header_error(name + b":" + value)
        if error is not None:
            self._stopped = error
            raise _Stop()
        lower = name.lower()
        if lower == b"content-length":
            self.length = int(value.strip(b" \t"))
        elif lower == b"transfer-encoding" and self._chunked is not None:
            self.length = None
        self._request.requestHeaders.addRawHeader(name, value.strip(b" \t"))

    def _head_done(self, rest: bytes) -> bytes:
        self._parser = None
        self._head = b""
        if self._chunked is not None:
            # decoded into the request by the validator of the Twisted path
            self._chunked = ChunkedScanner(strict=True, sink=self._request.handleContentChunk)
        self.allHeadersReceived()
        if self.refused:
            return b""
        if self.length == 0:
            self._finish_body(rest)
            return b""
        self._remaining = self.length or 0
        return rest

    # -- the body -------------------------------------------------------------

    def _body_data(self, data: bytes) -> bytes:
        request = self._request
        scanner = self._chunked
        if scanner is not None:
            try:
                used = scanner.feed(data)
            except FramingError as e:
                self.refuse(BadRequest(f"the chunked request body is malformed: {e}"))
                return b""
            self._body_received += used
            if self.refused:
                return b""
            if not scanner.done:
                return b""
            self._chunked = None
            self._finish_body(data[used:])
            return b""
        take = self._remaining
        if len(data) < take:
            self._remaining -= len(data)
            self._body_received += len(data)
            request.handleContentChunk(data)
            return b""
        self._remaining = 0
        self._body_received += take
        request.handleContentChunk(data[:take] if take < len(data) else data)
        if self.refused:
            return b""
        self._finish_body(data[take:])
        return b""

    def _finish_body(self, rest: bytes) -> None:
        """The request is whole: what came after it waits for its answer (HTTPChannel's buffer)."""
        if rest:
            self._dataBuffer.append(rest)
        self._request = None
        self.allContentReceived()

