"""A real reactor instance that is never installed or run: a test turns it by hand over real loopback sockets.

Used by the tests of L{paddler.flush} and L{paddler.lean_reactor}, which
are about what Twisted's real transports and poll loop do: each test
creates its own reactor object (any number per process, unlike the global
one), listens on 127.0.0.1 on a free port, talks to it with plain blocking
sockets, and calls L{Driven.turn} (one C{runUntilCurrent} + one
C{doIteration}, like one pass of C{mainLoop}) until what it waits for
happened, within a deadline. L{Driven.close} closes every descriptor.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory, Protocol


class Recorder(Protocol):
    """A server protocol that keeps what it received and how its connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Any = None
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


class Driven:
    """One reactor object of class C{cls}, turned by the test."""

    def __init__(self, cls: type) -> None:
        self.reactor: Any = cls()
        self.ports: list[Any] = []
        self.clients: list[socket.socket] = []

    def turn(self, timeout: float = 0.0) -> None:
        """One pass of the reactor's main loop: due timed calls, then one poll of at most C{timeout} s."""
        self.reactor.runUntilCurrent()
        self.reactor.doIteration(timeout)

    def until(self, predicate: Callable[[], object], deadline: float = 10.0, what: str = "condition") -> None:
        """Turn until C{predicate()} is true (each poll waits at most 10 ms), or fail after C{deadline} s."""
        end = time.monotonic() + deadline
        while not predicate():
            if time.monotonic() > end:
                raise AssertionError(f"{what}: not within {deadline} s")
            self.turn(0.01)

    def listen(self, build: Callable[[], Protocol]) -> tuple[int, list[Protocol]]:
        """Listen on 127.0.0.1 (a free port); the port and the list of the protocols built so far."""
        built: list[Protocol] = []

        def make() -> Protocol:
            protocol = build()
            built.append(protocol)
            return protocol

        port = self.reactor.listenTCP(0, Factory.forProtocol(make), interface="127.0.0.1")
        self.ports.append(port)
        return port.getHost().port, built

    def connect(self, port: int, rcvbuf: int | None = None) -> socket.socket:
        """A blocking client socket to C{port} (C{rcvbuf}: its SO_RCVBUF, set before connecting)."""
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        self.clients.append(sock)
        return sock

    def accept(self, port: int, built: list[Protocol], rcvbuf: int | None = None) -> tuple[socket.socket, Any]:
        """Connect a client socket and turn until the server side's protocol is connected; both."""
        count = len(built)
        sock = self.connect(port, rcvbuf)
        self.until(lambda: len(built) > count and built[count].transport is not None, what="connection accepted")
        return sock, built[count]

    def close(self) -> None:
        for sock in self.clients:
            sock.close()
        for port in self.ports:
            port.stopListening()
        reactor = self.reactor
        reactor.runUntilCurrent()
        for selectable in reactor.removeAll():
            try:
                selectable.connectionLost(None)
            except Exception:  # noqa: BLE001 - closing what is left, whatever state it is in
                pass
        for delayed in reactor.getDelayedCalls():
            delayed.cancel()
        reactor.waker.connectionLost(None)
        reactor._poller.close()


def read_exactly(sock: socket.socket, size: int, chunk: int = 65536) -> bytes:
    """Read C{size} bytes from a blocking socket (fewer if it closes first)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        data = sock.recv(min(chunk, size - got))
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def drain(sock: socket.socket, into: bytearray, most: int = 1 << 30) -> bool:
    """Read what C{sock} has now, at most C{most} bytes, without waiting; False once it is closed."""
    sock.setblocking(False)
    try:
        while most > 0:
            data = sock.recv(min(most, 65536))
            if not data:
                return False
            into += data
            most -= len(data)
    except BlockingIOError:
        pass
    except ConnectionResetError:
        return False
    finally:
        sock.setblocking(True)
    return True
