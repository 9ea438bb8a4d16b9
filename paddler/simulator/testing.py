"""Drive a simulated llama-server over HTTP in memory, byte by byte.

A L{MemoryHTTPClient} connects a real L{twisted.web.server.Site} to a
L{StringTransport}: requests go through Twisted's real HTTP parser and
responses come back as the exact bytes a socket would carry, so tests see
streaming chunk by chunk as the injected clock advances.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site


class HTTPResponseParser:
    """Incremental parser of one HTTP/1.1 response (Content-Length or chunked)."""

    def __init__(self) -> None:
        self._buffer = b""
        self.status: int | None = None
        self.headers: dict[str, list[str]] = {}
        self.chunks: list[bytes] = []
        self.complete = False
        self._chunked = False
        self._length: int | None = None

    def feed(self, data: bytes) -> None:
        """Parse more bytes from the wire."""
        self._buffer += data
        if self.status is None:
            head, sep, rest = self._buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ")[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers.setdefault(name.strip().lower(), []).append(value.strip())
            self._chunked = "chunked" in (self.header("transfer-encoding") or "").lower()
            length = self.header("content-length")
            self._length = int(length) if length is not None else None
            self._buffer = rest
        if self._chunked:
            while not self.complete:
                size_line, sep, rest = self._buffer.partition(b"\r\n")
                if not sep:
                    return
                size = int(size_line.split(b";")[0], 16)
                if len(rest) < size + 2:
                    return
                if size == 0:
                    self.complete = True
                    self._buffer = rest[2:]
                    return
                self.chunks.append(rest[:size])
                self._buffer = rest[size + 2:]
        elif self._length is not None:
            if len(self._buffer) >= self._length:
                self.chunks.append(self._buffer[: self._length])
                self._buffer = self._buffer[self._length:]
                self.complete = True

    def header(self, name: str, default: str | None = None) -> str | None:
        """The last value of a response header."""
        values = self.headers.get(name.lower())
        return values[-1] if values else default

    @property
    def body(self) -> bytes:
        """The body received so far."""
        return b"".join(self.chunks)

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def sse_data(self) -> list[str]:
        """The C{data:} payloads of the SSE events received so far."""
        events = []
        for block in self.body.decode("utf-8").split("\n\n"):
            for line in block.split("\n"):
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
        return events

    def sse_json(self) -> list[Any]:
        """The SSE payloads parsed as JSON (C{[DONE]} left out)."""
        return [json.loads(data) for data in self.sse_data() if data != "[DONE]"]


class MemoryExchange:
    """One HTTP connection carrying one request to a site, in memory."""

    def __init__(
        self,
        site: Site,
        method: bytes,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8081),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        self.protocol = site.buildProtocol(self.transport.getPeer())
        assert self.protocol is not None
        self.protocol.makeConnection(self.transport)
        self.response = HTTPResponseParser()
        self.closed = False
        if body is None:
            payload = b""
        elif isinstance(body, bytes):
            payload = body
        else:
            payload = json.dumps(body).encode("utf-8")
        lines = [f"{method.decode('ascii')} {path} HTTP/1.1", "Host: 127.0.0.1"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if method != b"GET" or payload:
            lines.append(f"Content-Length: {len(payload)}")
            lines.append("Content-Type: application/json")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
        self.protocol.dataReceived(raw)
        self.pump()

    def pump(self) -> HTTPResponseParser:
        """Move the bytes written so far into the response parser."""
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.response.feed(data)
        return self.response

    def writes(self) -> int:
        """How many bytes are waiting on the transport (not yet pumped)."""
        return len(self.transport.value())

    def close(self) -> None:
        """The client goes away (closes the connection)."""
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(ConnectionDone("client closed")))


class MemoryHTTPClient:
    """Send requests to a L{Site} in memory; remembers connections to close them."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.exchanges: list[MemoryExchange] = []

    def request(
        self, method: bytes, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> MemoryExchange:
        """Open a connection and send one request; the response builds up in C{.response}."""
        exchange = MemoryExchange(self.site, method, path, body, headers)
        self.exchanges.append(exchange)
        return exchange

    def get(self, path: str, headers: dict[str, str] | None = None) -> MemoryExchange:
        """C{GET path}."""
        return self.request(b"GET", path, None, headers)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> MemoryExchange:
        """C{POST path} with a JSON (or raw bytes) body."""
        return self.request(b"POST", path, body, headers)

    def pump(self, exchanges: Iterable[MemoryExchange] | None = None) -> None:
        """Pump every open exchange."""
        for exchange in exchanges if exchanges is not None else self.exchanges:
            exchange.pump()

    def close(self) -> None:
        """Close every connection (cancels the HTTP idle timeouts)."""
        for exchange in self.exchanges:
            exchange.close()
