"""Flush before poll (paddler/flush.py) on real TCP transports of a real reactor, turned by the test.

What a turn's writes become (one send, no write registration), what the
kernel does not take (left to Twisted, in order, producers paused and
resumed), closing, half-closing, aborting, TLS and failures: all as
Twisted does them without the flush.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
from twisted.internet import ssl
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from paddler.lean_reactor import LeanEPollReactor
from paddler import flush

from .driven_reactor import Driven, Recorder, drain


class Hooked(Recorder):
    """A server protocol whose transport is flushed before poll (when its reactor enabled it)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.hooked = flush.hook(self.transport)


def counting(driven: Driven, transport: Any) -> dict[str, int]:
    """Count C{transport}'s sends (its socket's send) and its registrations for write events (addWriter)."""
    counts = {"sends": 0, "registrations": 0}
    add = driven.reactor.addWriter

    class CountingSocket:
        def __init__(self, sock: socket.socket) -> None:
            self._sock = sock

        def send(self, data: Any, *flags: int) -> int:
            counts["sends"] += 1
            return self._sock.send(data, *flags)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._sock, name)

    def addWriter(writer: Any) -> None:
        if writer is transport:
            counts["registrations"] += 1
        add(writer)

    transport.socket = CountingSocket(transport.socket)
    driven.reactor.addWriter = addWriter
    return counts


@pytest.fixture(params=[LeanEPollReactor, EPollReactor], ids=["lean", "epoll"])
def driven(request: pytest.FixtureRequest):
    """A reactor with the flush enabled: the lean one (before-poll hook) and Twisted's (callLater(0))."""
    d = Driven(request.param)
    flusher = flush.enable(d.reactor)
    assert flusher is not None
    d.flusher = flusher  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        flush.disable(d.reactor)
        d.close()


def pattern(start: int, count: int) -> bytes:
    """C{count} 4-byte big-endian counters from C{start}: any loss, duplicate or reordering shows."""
    return b"".join(struct.pack(">I", i) for i in range(start, start + count))


def test_the_writes_of_one_turn_go_out_in_one_send_without_registering_for_write_events(driven):
    port, built = driven.listen(Hooked)
    clients = [driven.accept(port, built) for _ in range(2)]
    for i, (sock, server) in enumerate(clients):
        assert server.hooked
        counts = counting(driven, server.transport)
        server.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        server.transport.write(b"head %d;" % i)
        server.transport.writeSequence([b"body ", b"%d" % i])
        got = bytearray()
        driven.until(lambda: (drain(sock, got), len(got) >= 30 + len(str(i)))[1], what="the answer")
        assert bytes(got) == b"HTTP/1.1 200 OK\r\n\r\nhead %d;body %d" % (i, i)
        assert counts == {"sends": 1, "registrations": 0}
    assert driven.flusher.sent == 2


def test_without_the_flush_twisted_registers_for_write_events_per_write(driven):
    """The reference: an unhooked transport of the same reactor registers (what the flush saves)."""
    port, built = driven.listen(Recorder)
    sock, server = driven.accept(port, built)
    counts = counting(driven, server.transport)
    server.transport.write(b"a")
    server.transport.write(b"b")
    got = bytearray()
    driven.until(lambda: (drain(sock, got), len(got) == 2)[1], what="two bytes")
    assert bytes(got) == b"ab" and counts["sends"] == 1 and counts["registrations"] >= 1


@implementer(IPushProducer)
class Producer:
    """A streaming producer that records how it was told to pause and resume."""

    def __init__(self, fail_on_resume: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_on_resume = fail_on_resume

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")
        if self.fail_on_resume:
            raise RuntimeError("producer broke on resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


def test_a_slow_reader_makes_every_send_partial_and_gets_every_byte_in_order_with_backpressure(driven):
    """Two clients with a 4 KiB receive buffer, reading 4 KiB a turn: what the kernel did not take waits in order."""
    port, built = driven.listen(Hooked)
    clients = [driven.accept(port, built, rcvbuf=4096) for _ in range(2)]
    expected, received, producers, counts = [], [], [], []
    for i, (sock, server) in enumerate(clients):
        server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        producer = Producer()
        server.transport.registerProducer(producer, True)
        producers.append(producer)
        counts.append(counting(driven, server.transport))
        expected.append(b"")
        received.append(bytearray())
    sent = [0, 0]
    total = 40_000  # counters per client: 160 KB, several times what the two socket buffers hold
    while any(len(received[i]) < 4 * total for i in range(2)):
        for i, (sock, server) in enumerate(clients):
            if sent[i] < total and producers[i].calls[-1:] != ["pause"]:
                piece = pattern(sent[i], 2000)  # 8 KB a write, from a producer that is not paused
                server.transport.write(piece)
                expected[i] += piece
                sent[i] += 2000
            drain(sock, received[i], most=4096)
        driven.turn(0.001)
    for i in range(2):
        assert bytes(received[i]) == expected[i] == pattern(0, total)
        assert producers[i].calls[0] == "pause" and producers[i].calls[-1] == "resume"
        assert counts[i]["registrations"] > 0  # the remainders went through Twisted's write events


def test_lose_connection_after_writes_sends_everything_then_closes(driven):
    port, built = driven.listen(Hooked)
    for _ in range(2):
        sock, server = driven.accept(port, built)
        server.transport.write(b"last words")
        server.transport.write(b", all of them")
        server.transport.loseConnection()
        got = bytearray()
        driven.until(lambda: not drain(sock, got), what="the end of the connection")
        assert bytes(got) == b"last words, all of them"
        driven.until(lambda: server.lost is not None, what="connectionLost")
        assert server.lost.check(ConnectionDone)
    assert driven.flusher.handed_over == 2 and driven.flusher.sent == 0


def test_a_half_close_after_writes_sends_everything_then_eof_and_keeps_reading(driven):
    port, built = driven.listen(Hooked)
    sock, server = driven.accept(port, built)
    server.transport.write(b"answer")
    server.transport.loseWriteConnection()
    got = bytearray()
    driven.until(lambda: not drain(sock, got), what="EOF")
    assert bytes(got) == b"answer"
    sock.sendall(b"still there")
    driven.until(lambda: server.received == b"still there", what="the client's bytes after the half-close")
    assert server.lost is None


def test_an_abort_drops_what_was_buffered(driven):
    port, built = driven.listen(Hooked)
    sock, server = driven.accept(port, built)
    server.transport.write(b"never sent")
    server.transport.abortConnection()
    got = bytearray()
    driven.until(lambda: server.lost is not None, what="connectionLost")
    driven.until(lambda: not drain(sock, got), what="the connection closed")
    assert bytes(got) == b"" and driven.flusher.sent == 0


def test_a_send_to_a_reset_connection_is_reported_as_twisted_reports_it(driven):
    port, built = driven.listen(Hooked)
    sock, server = driven.accept(port, built)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    driven.clients.remove(sock)
    for _ in range(3):
        driven.turn(0.01)  # the reset arrives; the server may notice it before writing, or on the write
        if server.lost is None:
            server.transport.write(b"x" * 1000)
    driven.until(lambda: server.lost is not None, what="connectionLost")
    assert server.lost.check(ConnectionLost, ConnectionDone)


@pytest.mark.allow_logged_errors
def test_an_error_in_a_producer_resumed_by_the_flush_is_logged_with_the_transport_and_drops_it(driven):
    port, built = driven.listen(Hooked)
    sock, server = driven.accept(port, built)
    producer = Producer(fail_on_resume=True)
    server.transport.registerProducer(producer, True)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        server.transport.write(b"y" * 70_000)  # above bufferSize: Twisted pauses the producer
        assert producer.calls == ["pause"]
        driven.until(lambda: server.lost is not None, what="connectionLost")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert producer.calls[:2] == ["pause", "resume"]
    assert server.lost.check(RuntimeError)
    [event] = [e for e in events if e.get("log_namespace") == "paddler.flush"]
    assert event["log_system"] == server.transport.logPrefix() and event["log_failure"].check(RuntimeError)


def test_a_transport_that_started_tls_is_left_to_twisted(driven):
    """The client hello that startTLS writes goes Twisted's way: no write of a TLS transport is flushed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    connected: list[Any] = []

    class StartsTLS(Protocol):
        def connectionMade(self) -> None:
            assert flush.hook(self.transport)
            self.transport.startTLS(ssl.CertificateOptions())
            connected.append(self)

    factory = ClientFactory.forProtocol(StartsTLS)
    driven.reactor.connectTCP("127.0.0.1", listener.getsockname()[1], factory)
    listener.setblocking(False)
    accepted: list[socket.socket] = []

    def accept() -> bool:
        try:
            accepted.append(listener.accept()[0])
        except BlockingIOError:
            pass
        return bool(accepted)

    driven.until(accept, what="the reactor's connection")
    [peer] = accepted
    peer.setblocking(True)
    driven.clients += [peer, listener]
    driven.until(lambda: connected, what="connected")
    got = bytearray()
    driven.until(lambda: (drain(peer, got), len(got) >= 5)[1], what="a client hello")
    assert got[0] == 0x16  # a TLS handshake record
    assert driven.flusher.sent == 0 and driven.flusher.handed_over >= 1


def test_only_plain_tcp_transports_of_an_enabled_reactor_are_hooked():
    assert not flush.hook(StringTransport())
    tls = TLSMemoryBIOFactory(ssl.CertificateOptions(), False, Factory.forProtocol(Protocol)).buildProtocol(None)
    assert not flush.hook(tls)  # an ssl: endpoint's channel sees this wrapper as its transport
    driven = Driven(LeanEPollReactor)  # never enabled
    try:
        port, built = driven.listen(Hooked)
        sock, server = driven.accept(port, built)
        assert not server.hooked
        assert "startWriting" not in vars(server.transport)
    finally:
        driven.close()


def test_on_a_twisted_it_was_not_tested_with_the_flush_disables_itself_and_says_so_once(monkeypatch):
    monkeypatch.setattr(flush, "SUPPORTED", False)
    monkeypatch.setattr(flush, "_said_unsupported", [])
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    reactors = [Driven(LeanEPollReactor), Driven(LeanEPollReactor)]
    try:
        assert [flush.enable(d.reactor) for d in reactors] == [None, None]
        port, built = reactors[0].listen(Hooked)
        sock, server = reactors[0].accept(port, built)
        assert not server.hooked
    finally:
        globalLogPublisher.removeObserver(events.append)
        for d in reactors:
            d.close()
    said = [e for e in events if e.get("log_namespace") == "paddler.flush"]
    assert len(said) == 1 and "not one paddler's write flush was tested with" in said[0]["log_format"]


def test_the_tested_range_is_read_from_twisteds_calendar_version():
    low, high = flush.TESTED_TWISTED
    assert flush.twisted_tested(f"{low[0]}.{low[1]}.0") and flush.twisted_tested(f"{high[0]}.{high[1]}.3")
    assert not flush.twisted_tested(f"{high[0] + 1}.1.0") and not flush.twisted_tested("24.11.0")
    assert not flush.twisted_tested("trunk")


def test_a_pull_producer_registered_on_a_hooked_transport_is_resumed_and_its_writes_arrive(driven):
    """registerProducer(streaming=False) starts writing with nothing queued: Twisted's write event resumes it."""
    port, built = driven.listen(Hooked)
    for n in range(2):
        sock, server = driven.accept(port, built)
        t = server.transport

        class Pull:
            def __init__(self) -> None:
                self.left = 3

            def resumeProducing(self) -> None:
                if self.left:
                    self.left -= 1
                    t.write(b"piece %d;" % self.left)
                else:
                    t.unregisterProducer()
                    t.loseConnection()

            def stopProducing(self) -> None:
                pass

        t.registerProducer(Pull(), False)
        got = bytearray()
        driven.until(lambda: not drain(sock, got), what="the pull producer's pieces, then the end")
        assert bytes(got) == b"piece 2;piece 1;piece 0;"
