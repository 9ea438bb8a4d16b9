"""A misbehaving upstream: an HTTP/1.1 server on raw bytes that answers each request as its script says.

It speaks llama-server as far as the balancer's probes look (``/health``,
``/slots``, ``/props``: always well-formed; ``/_stats`` counts the
connections that carried other requests, and those requests), and answers every other request
with the shape named by the request's C{X-Hostile-Shape} header (or
``normal``). Every well-formed answer echoes the request's C{X-Request-Id}
in its JSON body, so a client can check that what it got is its own
answer; the bytes a hostile shape injects are a complete answer carrying
the id of the request it was sent with: delivered to anyone else, they are
another client's answer (a cross-delivery).

Like a simple blocking server, it reads the next request on a connection
only once the script of the one before has run to its end (delays
included). The clock is injected: a real reactor, or
L{tests.memory_network.MemoryNetwork} for deterministic tests.

Run as a process (the chaos harness, bench): ``python -m tests.hostile_upstream
--port P --name NAME [--good]``; ``--good`` ignores the shape header.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol

#: A step of a script: bytes to write, seconds to wait, or "close".
Step = tuple[str, Any]

REQUEST_ID = b"x-request-id"
SHAPE = b"x-hostile-shape"
#: How late the delayed shapes write their extra bytes.
DELAY = 0.05


def answer_body(rid: str, name: str, shape: str) -> bytes:
    """The JSON body of a well-formed answer: the request id, who answered, the shape."""
    return json.dumps({"id": rid, "upstream": name, "shape": shape}).encode()


def sized(body: bytes, code: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        code, extra, len(body), body,
    )


def chunked(body: bytes, extension: bytes = b"", trailers: bytes = b"", last: bytes = b"0\r\n") -> bytes:
    half = len(body) // 2
    chunks = b"".join(
        b"%x%s\r\n%s\r\n" % (len(part), extension, part) for part in (body[:half], body[half:]) if part
    )
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks + last + trailers
    )


def injected(rid: str, name: str) -> bytes:
    """A complete answer nobody asked for, carrying C{rid}: whoever else gets it got another's answer."""
    return sized(json.dumps({"id": rid, "upstream": name, "shape": "injected"}).encode())


def _script(shape: str, rid: str, name: str, method: bytes) -> list[Step]:
    body = answer_body(rid, name, shape)
    poison = injected(rid, name)
    if shape == "normal":
        return [("write", sized(body))]
    if shape == "chunked":
        return [("write", chunked(body, last=b"0\r\n\r\n"))]
    if shape == "close_delimited":
        return [("write", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + body), ("close", None)]
    if shape == "excess_immediate":
        return [("write", sized(body) + poison)]
    if shape == "excess_delayed":
        return [("write", sized(body)), ("wait", DELAY), ("write", poison)]
    if shape == "stray_crlf":
        return [("write", sized(body) + b"\r\n")]
    if shape == "early_answer":
        # the answer to a request not sent yet, written while the connection is idle
        return [("write", sized(body)), ("wait", DELAY / 5), ("write", poison)]
    if shape == "no_content_with_body":
        return [("write", b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n%s" % (len(poison), poison))]
    if shape == "no_content_delayed_body":
        return [("write", b"HTTP/1.1 204 No Content\r\n\r\n"), ("wait", DELAY), ("write", poison)]
    if shape == "not_modified_with_body":
        return [("write", b"HTTP/1.1 304 Not Modified\r\nContent-Length: %d\r\n\r\n%s" % (len(poison), poison))]
    if shape == "head_with_body":
        # a body on an answer to HEAD (the client asked with HEAD)
        return [("write", sized(body) + poison)]
    if shape == "informational":
        return [
            ("write", b"HTTP/1.1 100 Continue\r\n\r\n"),
            ("write", b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"),
            ("write", sized(body)),
        ]
    if shape == "switching_protocols":
        return [
            ("write", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
            ("write", poison),
        ]
    if shape == "conflicting_length":
        return [("write", sized(body, extra=b"Content-Length: %d\r\n" % (len(body) + 40)) + poison)]
    if shape == "length_and_chunked":
        return [("write", chunked(body, last=b"0\r\n\r\n").replace(
            b"Transfer-Encoding", b"Content-Length: %d\r\nTransfer-Encoding" % len(body), 1) + poison)]
    if shape == "bare_lf":
        return [("write", sized(body).replace(b"\r\n", b"\n", 2) + poison)]
    if shape == "obs_fold":
        return [("write", sized(body, extra=b"X-Folded: a\r\n b\r\n") + poison)]
    if shape == "control_bytes":
        return [("write", sized(body, extra=b"X-Odd: a\x01b\r\n") + poison)]
    if shape == "trailers":
        return [("write", chunked(body, trailers=b"X-Checksum: 1\r\n\r\n"))]
    if shape == "chunk_extensions":
        return [("write", chunked(body, extension=b';name="v"', last=b"0;end=1\r\n\r\n"))]
    if shape == "last_chunk_unterminated":
        # "0\r\n" and never the empty line that ends the trailers: then another answer
        return [("write", chunked(body)), ("wait", DELAY), ("write", poison)]
    if shape == "reset_after_request":
        return [("reset", None)]
    raise ValueError(f"unknown shape {shape!r}")


#: Every shape, and what a client may get from it: its own answer ("own"), the balancer's 502
#: ("502"), or its own answer cut short ("own" data, then a broken stream).
SHAPES: dict[str, str] = {
    "normal": "own",
    "chunked": "own",
    "close_delimited": "own",
    "excess_immediate": "own",
    "excess_delayed": "own",
    "stray_crlf": "own",
    "early_answer": "own",
    "no_content_with_body": "204",
    "no_content_delayed_body": "204",
    "not_modified_with_body": "304",
    "informational": "own",
    "switching_protocols": "502",
    "conflicting_length": "502",
    "length_and_chunked": "502",
    "bare_lf": "502",
    "obs_fold": "502",
    "control_bytes": "502",
    "trailers": "own",
    "chunk_extensions": "own",
    "last_chunk_unterminated": "own_cut",
    "reset_after_request": "502",
}
#: Shapes for HEAD requests only.
HEAD_SHAPES = {"head_with_body": "own"}
#: Shapes whose extra bytes come after a delay: if the next request went out on the connection in
#: between, HTTP/1.1 cannot tell them from its answer (docs/reliability.md).
LATE_SHAPES = frozenset({"excess_delayed", "early_answer", "no_content_delayed_body", "last_chunk_unterminated"})

_PROBE_PATHS = {b"/health", b"/slots", b"/props", b"/v1/models", b"/models"}


class HostileConnection(Protocol):
    """One connection: reads a request, runs its script, then reads the next."""

    def __init__(self, factory: HostileFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.busy = False
        self.closed = False
        self.answered = 0  # requests other than probes (connection reuse: bench/framing.py)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True

    def _next(self) -> None:
        while not self.busy and not self.closed:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].split(b"\r\n")
            method, target, _ = (lines[0].split(b" ", 2) + [b"", b""])[:3]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0") or 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            self.busy = True
            self.factory.requests.append((method, target, headers, body))
            if target.split(b"?", 1)[0] not in _PROBE_PATHS and target != b"/_stats":
                self.answered += 1
            self._run(self.factory.script_for(method, target, headers))

    def _run(self, steps: list[Step]) -> None:
        while steps and not self.closed:
            kind, value = steps.pop(0)
            if kind == "write":
                self.transport.write(value)
            elif kind == "wait":
                self.factory.clock.callLater(value, self._run, steps)
                return
            elif kind == "close":
                self.transport.loseConnection()
                self.closed = True
                return
            elif kind == "reset":
                self.transport.abortConnection()
                self.closed = True
                return
        self.busy = False
        self._next()


class HostileFactory(Factory):
    """The server: C{good} ignores the shape header (a well-behaved upstream with the same echo)."""

    noisy = False

    def __init__(self, clock: IReactorTime, name: str = "hostile", good: bool = False, slots: int = 4) -> None:
        self.clock = clock
        self.name = name
        self.good = good
        self.slots = slots
        self.requests: list[tuple[bytes, bytes, dict[bytes, bytes], bytes]] = []
        self.shapes: Counter[str] = Counter()
        self.on_script: Callable[[str, str], None] | None = None
        self.connections: list[HostileConnection] = []

    def buildProtocol(self, addr: Any) -> HostileConnection:
        connection = HostileConnection(self)
        self.connections.append(connection)
        return connection

    def script_for(self, method: bytes, target: bytes, headers: dict[bytes, bytes]) -> list[Step]:
        path = target.split(b"?", 1)[0]
        if path == b"/_stats":
            used = [c for c in self.connections if c.answered]
            stats = {"connections": len(used), "answers": sum(c.answered for c in used)}
            return [("write", sized(json.dumps(stats).encode()))]
        if path in _PROBE_PATHS:
            return [("write", sized(self._probe(path)))]
        rid = headers.get(REQUEST_ID, b"-").decode("latin-1")
        shape = "normal" if self.good else headers.get(SHAPE, b"normal").decode("latin-1")
        self.shapes[shape] += 1
        if self.on_script is not None:
            self.on_script(rid, shape)
        return _script(shape, rid, self.name, method)

    def _probe(self, path: bytes) -> bytes:
        if path == b"/slots":
            return json.dumps([{"id": i, "n_ctx": 4096, "is_processing": False} for i in range(self.slots)]).encode()
        if path == b"/props":
            return json.dumps({"total_slots": self.slots, "model_alias": "m", "model_path": "m"}).encode()
        if path in (b"/v1/models", b"/models"):
            return json.dumps({"data": [{"id": "m"}]}).encode()
        return b'{"status":"ok"}'


# -- what a client got ----------------------------------------------------------

_ID = re.compile(rb'"id":\s*"([^"]*)"')


def verdict(rid: str, expected: str, status: int | None, body: bytes, complete: bool = True) -> str:
    """
    What a client that sent request C{rid} got: ``cross`` when the body holds
    any other request's id (another client's answer), ``own`` for its own
    answer, ``502``, ``own_cut`` (its own bytes, then the stream broke), or
    ``wrong`` (anything else: a status or a shape the script does not allow).
    """
    ids = {m.decode("latin-1") for m in _ID.findall(body)}
    if ids - {rid}:
        return "cross"
    if status == 502 and expected in ("502", "own", "own_cut", "204", "304"):
        # a shape paddler may also refuse as a whole (its framing made the connection suspect)
        return "502"
    if not complete:
        return "own_cut" if ids == {rid} or not body else "wrong"
    if expected in ("204", "304"):
        return "own" if status == int(expected) and not body else "wrong"
    if status == 200 and ids == {rid}:
        return "own"
    return "wrong"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="hostile")
    parser.add_argument("--good", action="store_true")
    options = parser.parse_args(argv)
    from twisted.internet import reactor

    reactor.listenTCP(options.port, HostileFactory(reactor, options.name, options.good), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
