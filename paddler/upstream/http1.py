"""HTTP/1.1 message framing for the upstream client: response heads and body ends, on raw bytes.

The scanners follow a response body as it arrives without copying it: they
say where the body ends (exactly: a last chunk split across reads, chunk
extensions, trailers) and keep the last bytes of its payload (llama.cpp's
C{timings} object comes at the end of an answer, possibly cut in two by
chunk framing). They never raise anything but L{FramingError}.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

#: Longest chunk-size line (size, extensions) and trailer section accepted.
MAX_LINE = 4096
MAX_TRAILERS = 16 * 1024
#: Longest response head accepted (status line and headers).
MAX_HEAD = 64 * 1024
_HEX = frozenset(b"0123456789abcdefABCDEF")


class FramingError(Exception):
    """The bytes are not well-formed HTTP/1.1 framing (an upstream's response, or a client's chunked body)."""


class BodyScanner:
    """
    Follows one response body over raw bytes. C{feed(data)} returns how many
    bytes of C{data} belong to the body; C{done} turns true at its last byte.
    Each payload piece goes to C{sink} when one is given (decoding). The
    last bytes of the body are kept as they arrived (raw, a few per read)
    and decoded only when L{tail} is asked for, so following a body costs
    nothing per chunk beyond finding its end.
    """

    done = False

    def __init__(self, tail_bytes: int = 0, sink: Callable[[bytes], None] | None = None) -> None:
        self._tail_limit = tail_bytes
        self._kept: list[tuple[object, bytes]] = []
        self._kept_size = 0
        self._trim_at = 2 * tail_bytes
        self._sink = sink

    def feed(self, data: bytes) -> int:
        raise NotImplementedError

    def _keep(self, snapshot: object, raw: bytes) -> None:
        self._kept.append((snapshot, raw))
        self._kept_size += len(raw)
        if self._kept_size >= self._trim_at:
            self._trim()

    def _trim(self) -> None:
        # once per tail_bytes received: drop what is older than the tail, join the rest
        kept = self._kept
        limit = self._tail_limit
        drop = 0
        while self._kept_size - len(kept[drop][1]) >= limit:
            self._kept_size -= len(kept[drop][1])
            drop += 1
        if len(kept) - drop > 8:
            kept[:] = [(kept[drop][0], b"".join(raw for _, raw in kept[drop:]))]
        elif drop:
            del kept[:drop]
        self._trim_at = self._kept_size + limit

    def tail(self) -> bytes:
        """The payload in (at least) the last C{tail_bytes} bytes of the body seen so far, decoded."""
        return b"".join(raw for _, raw in self._kept)

    def eof(self) -> bool:
        """The connection closed: whether that ends the body cleanly (only for read-until-close bodies)."""
        return self.done

    #: Past the last chunk, before the empty line that ends the trailers (chunked bodies only; an
    #: attribute, not a property: the relay reads it for every piece).
    in_trailers = False


class LengthScanner(BodyScanner):
    """A body of C{Content-Length} bytes."""

    def __init__(self, length: int, tail_bytes: int = 0, sink: Callable[[bytes], None] | None = None) -> None:
        super().__init__(tail_bytes, sink)
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> int:
        if self.done:
            return 0
        n = len(data)
        if n >= self.remaining:
            n = self.remaining
            self.done = True
            if n < len(data):
                data = data[:n]
        self.remaining -= n
        if n:
            if self._tail_limit:
                self._keep(None, data)
            if self._sink is not None:
                self._sink(data)
        return n


class CloseScanner(BodyScanner):
    """A body that ends when the connection closes (no length, not chunked)."""

    def feed(self, data: bytes) -> int:
        if data:
            if self._tail_limit:
                self._keep(None, data)
            if self._sink is not None:
                self._sink(data)
        return len(data)

    def eof(self) -> bool:
        self.done = True
        return True


# ChunkedScanner states
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
#: The scanner's state between two chunks (a snapshot for the tail; see L{ChunkedScanner.tail}).
_CLEAN = (_SIZE, 0, b"", 2, 0)
#: A whole chunk-size line: size, optional whitespace and extensions, CRLF.
_SIZE_LINE = re.compile(rb"([0-9a-fA-F]{1,15})[ \t]*(?:;[^\r\n]*)?\r\n")
#: Strict (request bodies, before Twisted's own decoder sees them): no whitespace after the size,
#: extensions of visible ASCII but the backslash, tab, space and bytes >= 0x80 -- what Twisted accepts.
_STRICT_SIZE_LINE = re.compile(rb"([0-9a-fA-F]{1,15})(?:;[\t\x20-\x5b\x5d-\x7e\x80-\xff]*)?\r\n")
#: The longest chunk-size line (CRLF excluded) Twisted's decoder accepts.
MAX_STRICT_SIZE_LINE = 1023


class ChunkedScanner(BodyScanner):
    """
    A C{Transfer-Encoding: chunked} body (RFC 9112 section 7.1): chunk-size
    lines (hex, optional C{;extensions}), data, CRLF, a last chunk C{0}, then
    trailer lines up to an empty line. Lines end with CRLF; anything else is
    a L{FramingError}. State carries over between calls, so a read may end
    anywhere, even between the CR and the LF. C{strict} refuses what
    Twisted's decoder of request bodies refuses (whitespace after the size,
    odd bytes in extensions, chunk-size lines over L{MAX_STRICT_SIZE_LINE}).
    """

    def __init__(
        self, tail_bytes: int = 0, sink: Callable[[bytes], None] | None = None, strict: bool = False
    ) -> None:
        super().__init__(tail_bytes, sink)
        self._strict = strict
        self._size_line = _STRICT_SIZE_LINE if strict else _SIZE_LINE
        self._max_size_line = MAX_STRICT_SIZE_LINE if strict else MAX_LINE
        self._state = _SIZE
        self._remaining = 0  # data bytes left in the current chunk
        self._line = b""  # the start of a line cut by the end of a read
        self._crlf = 2  # bytes of the CRLF after chunk data still expected
        self._trailer_bytes = 0

    def tail(self) -> bytes:
        if not self._kept:
            return b""
        pieces: list[bytes] = []
        decoder = ChunkedScanner(0, pieces.append)
        snapshot: Any = self._kept[0][0]
        decoder._state, decoder._remaining, decoder._line, decoder._crlf, decoder._trailer_bytes = snapshot
        decoder.feed(b"".join(raw for _, raw in self._kept))  # the kept pieces are contiguous
        return b"".join(pieces)

    def feed(self, data: bytes) -> int:
        start = 0
        if self._state == _SIZE and not self._line and self._sink is None:
            # The usual read in pass-through: whole chunks from a chunk boundary (one, or several
            # when reads coalesce under load). Skip over them with one regex match each; the
            # first that is not whole and plain (a last chunk, a chunk cut by the end of the
            # read, anything odd) is left to _scan, which decides with every check.
            end = len(data)
            match = self._size_line.match
            longest = self._max_size_line + 2
            while True:
                found = match(data, start)
                if found is None:
                    break
                line_end = found.end()
                stop = line_end + int(found.group(1), 16)
                if (
                    stop == line_end  # the last chunk
                    or stop + 2 > end
                    or data[stop] != 13  # CR
                    or data[stop + 1] != 10  # LF
                    or line_end - start > longest
                ):
                    break
                start = stop + 2
                if start == end:
                    if self._tail_limit:  # self._keep(_CLEAN, data), inlined
                        self._kept.append((_CLEAN, data))
                        self._kept_size += end
                        if self._kept_size >= self._trim_at:
                            self._trim()
                    return end
        snapshot = (
            (self._state, self._remaining, self._line, self._crlf, self._trailer_bytes)
            if self._tail_limit
            else None
        )
        pos = self._scan(data, start)
        if snapshot is not None and pos:
            self._keep(snapshot, data if pos == len(data) else data[:pos])
        return pos

    def _scan(self, data: bytes, pos: int = 0) -> int:
        end = len(data)
        state = self._state
        sink = self._sink
        match = self._size_line.match
        try:
            while pos < end:
                if state == _SIZE:
                    found = None if self._line else match(data, pos)
                    if found is not None:
                        size = int(found.group(1), 16)
                        if found.end() - pos > self._max_size_line + 2:
                            raise FramingError("chunk-size line too long")
                        pos = found.end()
                    else:
                        line, pos = self._read_line(data, pos, end, self._max_size_line)
                        if line is None:
                            break
                        size = _chunk_size(line, self._strict)
                    if not size:
                        state = _TRAILER
                        continue
                    stop = pos + size
                    if stop + 2 <= end and data[stop] == 13 and data[stop + 1] == 10:  # CR LF
                        # the whole chunk is in this read (the usual case)
                        if sink is not None:
                            sink(data[pos:stop])
                        pos = stop + 2
                        continue
                    self._remaining = size
                    state = _DATA
                elif state == _DATA:
                    stop = pos + self._remaining
                    if stop > end:
                        stop = end
                    if sink is not None:
                        sink(data[pos:stop] if (pos or stop != end) else data)
                    self._remaining -= stop - pos
                    pos = stop
                    if self._remaining == 0:
                        state = _DATA_END
                        self._crlf = 2
                elif state == _DATA_END:
                    expected = b"\r\n"[2 - self._crlf:]
                    take = data[pos:pos + self._crlf]
                    if not expected.startswith(take):
                        raise FramingError("chunk data is not followed by CRLF")
                    self._crlf -= len(take)
                    pos += len(take)
                    if self._crlf == 0:
                        state = _SIZE
                elif state == _TRAILER:
                    line, pos = self._read_line(data, pos, end)
                    if line is None:
                        break
                    if not line:
                        state = _DONE
                        self.done = True
                        break
                    self._trailer_bytes += len(line) + 2
                    if self._trailer_bytes > MAX_TRAILERS:
                        raise FramingError("trailer section too long")
                    if b":" not in line:
                        raise FramingError("malformed trailer field")
                else:  # _DONE
                    break
        finally:
            self._state = state
            self.in_trailers = state == _TRAILER
        return pos

    def _read_line(self, data: bytes, pos: int, end: int, limit: int = MAX_LINE) -> tuple[bytes | None, int]:
        """The line starting at C{pos} without its CRLF (at most C{limit} bytes), and the position after
        it; C{None} if cut off."""
        if self._line:
            # a line began in an earlier read: look for its end across the boundary
            if self._line.endswith(b"\r"):
                if data[pos:pos + 1] != b"\n":
                    raise FramingError("CR without LF in chunk framing")
                line, self._line = self._line[:-1], b""
                return self._check_line(line, limit), pos + 1
            lf = data.find(b"\n", pos)
            if lf < 0:
                self._keep_line(data[pos:], limit)
                return None, end
            line = self._line + data[pos:lf]
            self._line = b""
            if not line.endswith(b"\r"):
                raise FramingError("line feed without carriage return in chunk framing")
            return self._check_line(line[:-1], limit), lf + 1
        lf = data.find(b"\n", pos, pos + limit + 2)
        if lf < 0:
            self._keep_line(data[pos:], limit)
            return None, end
        if lf == pos or data[lf - 1] != 13:  # 13: CR
            raise FramingError("line feed without carriage return in chunk framing")
        return self._check_line(data[pos:lf - 1], limit), lf + 1

    def _keep_line(self, start: bytes, limit: int) -> None:
        self._line += start
        if len(self._line) > limit + 1:
            raise FramingError("chunk-size or trailer line too long")
        if b"\r" in self._line[:-1]:
            raise FramingError("CR without LF in chunk framing")

    @staticmethod
    def _check_line(line: bytes, limit: int) -> bytes:
        if b"\r" in line or len(line) > limit:
            raise FramingError("malformed line in chunk framing")
        return line


def _chunk_size(line: bytes, strict: bool = False) -> int:
    """The size in a chunk-size line (C{1a} or C{1a;name=value}); L{FramingError} otherwise."""
    if strict:
        if len(line) > MAX_STRICT_SIZE_LINE or _STRICT_SIZE_LINE.fullmatch(line + b"\r\n") is None:
            raise FramingError("malformed chunk-size line")
    semicolon = line.find(b";")
    digits = line if semicolon < 0 else line[:semicolon]
    digits = digits.rstrip(b" \t")  # BWS before an extension
    if not digits or len(digits) > 15 or not _HEX.issuperset(digits):
        raise FramingError("malformed chunk size")
    return int(digits, 16)


# -- response heads -------------------------------------------------------------


class ResponseHead:
    """A parsed status line and header section."""

    __slots__ = ("version", "code", "phrase", "headers", "connection_close", "chunked", "length")

    def __init__(
        self,
        version: bytes,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        connection_close: bool,
        chunked: bool,
        length: int | None,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        #: every header as received, (name as sent, value), in order
        self.headers = headers
        self.connection_close = connection_close
        self.chunked = chunked
        self.length = length


_FRAMING_HEADERS = frozenset({b"transfer-encoding", b"content-length", b"connection"})
#: A header name: an RFC 9110 token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Bytes no header value may hold (RFC 9110 5.5): controls but HTAB, and DEL.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def parse_head(raw: bytes) -> ResponseHead:
    """
    Parse a response head (C{raw} ends before its empty line). L{FramingError}
    if it is malformed or its framing is ambiguous: a bare CR or LF, an
    obs-folded line, a name that is not a token, a control byte in a value,
    conflicting C{Content-Length}s, C{Content-Length} together with
    C{Transfer-Encoding} (RFC 9112 6.3 lets a recipient guess; an upstream
    client that guesses can hand one answer's bytes to the next request).
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
        raise FramingError("bare CR or LF in the response head")
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    version = parts[0]
    if len(parts) < 2 or version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise FramingError("malformed status line or unsupported HTTP version")
    code_text = parts[1]
    if len(code_text) != 3 or not code_text.isdigit():
        raise FramingError("malformed status code")
    code = int(code_text)
    phrase = parts[2] if len(parts) == 3 else b""
    headers: list[tuple[bytes, bytes]] = []
    append = headers.append
    close = version == b"HTTP/1.0"
    chunked = False
    te_seen = False
    length: int | None = None
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise FramingError("obsolete line folding in the response head")
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise FramingError("malformed header line")
        value = value.strip(b" \t")
        if _CONTROL.search(value) is not None:
            raise FramingError("control byte in a header value")
        append((name, value))
        lower = name.lower()
        if lower not in _FRAMING_HEADERS:
            continue
        if lower == b"transfer-encoding":
            te_seen = True
            codings = [c.strip().lower() for c in value.split(b",")]
            chunked = codings[-1] == b"chunked"
            if [c for c in codings if c and c != b"chunked"]:
                raise FramingError("transfer codings other than chunked are not supported")
        elif lower == b"content-length":
            values = {v.strip() for v in value.split(b",")}
            if len(values) != 1:
                raise FramingError("conflicting Content-Length values")
            (text,) = values
            if not text.isdigit() or len(text) > 18:
                raise FramingError("malformed Content-Length")
            if length is not None and length != int(text):
                raise FramingError("conflicting Content-Length headers")
            length = int(text)
        else:  # connection
            tokens = [t.strip().lower() for t in value.split(b",")]
            if b"close" in tokens:
                close = True
            elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                close = False
    if te_seen:
        if length is not None:
            raise FramingError("both Content-Length and Transfer-Encoding in the response head")
        if not chunked:
            raise FramingError("Transfer-Encoding without chunked as the last coding")
        if version == b"HTTP/1.0":
            raise FramingError("chunked transfer coding in an HTTP/1.0 response")
    return ResponseHead(version, code, phrase, headers, close, chunked, length)
