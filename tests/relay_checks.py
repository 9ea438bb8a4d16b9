"""Checks of the relay against a real server (the simulator or llama-server), shared by both suites.

Each check takes the upstream's URL and the balancer's, and speaks HTTP on
raw sockets where the framing itself is what is checked (an independent
decoder, not paddler's). They block (sockets with deadlines): run them
outside the reactor.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from tests.llamacpp.clients import Streams, busy_slots, get_json, post, request, sse_payloads, wait_for

#: The relay modes and the balancer flags that select them.
MODES = {"passthrough": (), "decode": ("--no-relay-passthrough",)}


def _connect(url: str, timeout: float = 30.0) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def _read_head(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes]:
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"connection closed inside the head: {buffer[:300]!r}")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


def read_response(sock: socket.socket, buffer: bytes = b"") -> tuple[bytes, dict[str, str], bytes, bytes, bytes]:
    """One response from C{sock}: (status line, headers, raw body, decoded body, bytes after it).

    Chunked bodies are decoded here, strictly, independently of paddler.
    """
    head, rest = _read_head(sock, buffer)
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode().strip().lower()] = value.decode().strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        decoded, pos = [], 0
        while True:
            while b"\r\n" not in rest[pos:]:
                data = sock.recv(65536)
                assert data, "connection closed inside a chunk-size line"
                rest += data
            end = rest.index(b"\r\n", pos)
            size = int(rest[pos:end].split(b";")[0], 16)
            if size == 0:
                # trailers, then the empty line
                while b"\r\n\r\n" not in rest[end:] and not rest[end:end + 4] == b"\r\n\r\n":
                    data = sock.recv(65536)
                    assert data, "connection closed inside the last chunk"
                    rest += data
                stop = rest.index(b"\r\n\r\n", end) + 4
                return lines[0], headers, rest[:stop], b"".join(decoded), rest[stop:]
            while len(rest) < end + 2 + size + 2:
                data = sock.recv(65536)
                assert data, "connection closed inside a chunk"
                rest += data
            assert rest[end + 2 + size:end + 4 + size] == b"\r\n", "chunk data not followed by CRLF"
            decoded.append(rest[end + 2:end + 2 + size])
            pos = end + 4 + size
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(rest) < length:
            data = sock.recv(65536)
            assert data, "connection closed inside a sized body"
            rest += data
        return lines[0], headers, rest[:length], rest[:length], rest[length:]
    while True:  # until the connection closes (HTTP/1.0)
        data = sock.recv(65536)
        if not data:
            return lines[0], headers, rest, rest, b""
        rest += data


def post_raw(sock: socket.socket, path: str, body: Any, version: str = "HTTP/1.1", extra: str = "") -> None:
    payload = json.dumps(body).encode()
    sock.sendall(
        f"POST {path} {version}\r\nHost: test\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
    )


def check_stream_framing_and_keep_alive(proxy: str, body: dict[str, Any], mode: str) -> list[str]:
    """A stream through the balancer is well-formed chunked HTTP/1.1 ending exactly at its last chunk,
    and the same client connection carries a second request afterwards. Returns the payloads."""
    with _connect(proxy) as sock:
        post_raw(sock, "/completion", {**body, "stream": True})
        status, headers, raw, decoded, after = read_response(sock)
        assert status.startswith(b"HTTP/1.1 200"), status
        assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
        assert headers["content-type"].startswith("text/event-stream")
        assert after == b"", "bytes after the last chunk"
        payloads = sse_payloads(decoded)
        post_raw(sock, "/completion", {**body, "stream": False})
        status, headers, _, second, _ = read_response(sock)
        assert status.startswith(b"HTTP/1.1 200") and json.loads(second)["stop"] is True
    return payloads


def check_http10_client_gets_a_plain_body(proxy: str, body: dict[str, Any]) -> list[str]:
    """An HTTP/1.0 client gets the stream without chunk framing, ended by the connection closing."""
    with _connect(proxy) as sock:
        post_raw(sock, "/completion", {**body, "stream": True}, version="HTTP/1.0")
        status, headers, raw, decoded, _ = read_response(sock)
        assert status.startswith(b"HTTP/1.0 200"), status
        assert "transfer-encoding" not in headers
        assert sock.recv(1) == b"", "the connection stays open after an HTTP/1.0 answer"
    return sse_payloads(decoded)


def check_error_is_relayed_as_the_server_said_it(upstream: str, proxy: str, path: str, body: Any) -> None:
    """An error answer (status, JSON body) reaches the client as the server gave it."""
    direct = post(upstream, path, body)
    relayed = post(proxy, path, body)
    assert 400 <= direct.status < 600
    assert relayed.status == direct.status, (direct, relayed)
    assert relayed.json() == direct.json()


def check_unknown_path_is_relayed(upstream: str, proxy: str) -> None:
    """A GET the server does not know gets the server's 404, through the balancer."""
    direct = request(upstream, "GET", "/no/such/path")
    relayed = request(proxy, "GET", "/no/such/path")
    assert relayed.status == direct.status == 404


def check_client_leaving_stops_the_generation(
    upstream: str, proxy: str, open_stream: Streams, body: dict[str, Any]
) -> None:
    """A client that drops a long stream mid-way: the server stops generating (its slot frees),
    and the balancer counts the slot free again."""
    stream = open_stream(proxy, "/completion", body)
    stream.wait_first_event()
    wait_for(lambda: len(busy_slots(upstream)) == 1, 10, "the slot busy")
    stream.close()
    wait_for(lambda: busy_slots(upstream) == [], 15, "the server stopped generating")
    wait_for(lambda: get_json(proxy, "/health")["slots_processing"] == 0, 15, "the balancer sees the slot free")


def check_two_streams_at_once(proxy: str, open_stream: Streams, body: dict[str, Any]) -> None:
    """Two concurrent streams both arrive whole."""
    streams = [open_stream(proxy, "/completion", body) for _ in range(2)]
    for stream in streams:
        payloads = stream.wait_end(60)
        assert stream.status == 200 and json.loads(payloads[-1])["stop"] is True


def wait_idle(upstream: str, deadline: float = 15.0) -> None:
    """Wait until the server has no busy slot."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if busy_slots(upstream) == []:
            return
        time.sleep(0.05)
    raise AssertionError("server still busy")
