"""The in-memory network the proxy tests run on behaves like TCP in Twisted where they rely on it."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import (
    CannotListenError,
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError as ConnectTimeoutError,
)
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Factory, Protocol
from twisted.python.failure import Failure

from .memory_network import MemoryNetwork


class Recorder(Protocol):
    """Keeps what it read, how it was lost, and the order of events."""

    def __init__(self, events: list[str] | None = None, name: str = "") -> None:
        self.received = b""
        self.reason: Failure | None = None
        self.events = events if events is not None else []
        self.name = name

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.events.append(f"{self.name} lost")


class Producer:
    """A streaming producer that records what its consumer asks of it."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


def connected(net: MemoryNetwork, events: list[str] | None = None) -> tuple[Recorder, Recorder]:
    """A client and a server protocol connected through C{net}."""
    servers: list[Recorder] = []

    def server() -> Recorder:
        servers.append(Recorder(events, "server"))
        return servers[-1]

    net.listenTCP(80, Factory.forProtocol(server), interface="10.0.0.1")
    client = Recorder(events, "client")
    net.connectTCP("10.0.0.1", 80, ClientFactory.forProtocol(lambda: client))
    net.flush()
    return client, servers[0]


def test_bytes_move_only_when_flushed_and_a_full_buffer_pauses_the_writer_until_read():
    net = MemoryNetwork(buffer_size=10)
    events: list[str] = []
    client, server = connected(net, events)
    server.transport.registerProducer(Producer(events), True)
    server.transport.write(b"0123456789")
    assert events == [] and client.received == b""
    server.transport.write(b"x")  # 11 unread bytes: above the buffer
    assert events == ["pause"]
    net.flush()
    assert client.received == b"0123456789x" and events == ["pause", "resume"]


def test_a_held_or_paused_reader_gets_nothing_until_it_reads_again():
    net = MemoryNetwork()
    client, server = connected(net)
    client.transport.hold()
    server.transport.write(b"a")
    net.flush()
    assert client.received == b""
    client.transport.release()
    client.transport.pauseProducing()
    net.flush()
    assert client.received == b""
    client.transport.resumeProducing()
    net.flush()
    assert client.received == b"a"


def test_lose_connection_delivers_what_was_written_first_and_both_sides_see_a_clean_close():
    net = MemoryNetwork()
    client, server = connected(net)
    server.transport.write(b"bye")
    server.transport.loseConnection()
    net.flush()
    assert client.received == b"bye"
    assert client.reason.check(ConnectionDone) and server.reason.check(ConnectionDone)


def test_abort_drops_unread_bytes_stops_the_producer_first_and_the_peer_sees_a_reset():
    net = MemoryNetwork()
    events: list[str] = []
    client, server = connected(net, events)
    server.transport.registerProducer(Producer(events), True)
    server.transport.write(b"never read")
    server.transport.abortConnection()
    net.flush()
    assert client.received == b""
    assert server.reason.check(ConnectionAborted) and client.reason.check(ConnectionLost)
    assert events == ["stop", "server lost", "client lost"]


class Failing(ClientFactory):
    protocol = Protocol

    def __init__(self) -> None:
        self.failures: list[Failure] = []

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failures.append(reason)


def test_nobody_listening_is_refused_at_the_flush_and_an_unreachable_host_times_out_on_the_clock():
    net = MemoryNetwork()
    refused, silent = Failing(), Failing()
    net.unreachable.add("10.0.0.9")
    net.connectTCP("10.0.0.1", 80, refused)
    net.connectTCP("10.0.0.9", 80, silent, timeout=5)
    assert refused.failures == []
    net.flush()
    assert refused.failures[0].check(ConnectionRefusedError)
    net.run_for(4.9)
    assert silent.failures == []
    net.run_for(0.1)
    assert silent.failures[0].check(ConnectTimeoutError)
    assert net.pending == [] and net.connections == []


def test_a_cancelled_connection_attempt_is_abandoned():
    net = MemoryNetwork()
    net.unreachable.add("10.0.0.9")
    d = HostnameEndpoint(net, "10.0.0.9", 80).connect(Factory.forProtocol(Protocol))
    net.flush()
    assert len(net.pending) == 1
    d.cancel()
    net.flush()
    assert net.pending == [] and net.getDelayedCalls() == []
    assert isinstance(_failure(d).value, ConnectingCancelledError)


def _failure(d: Any) -> Failure:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box and isinstance(box[0], Failure)
    return box[0]


def test_names_resolve_from_the_table_and_unknown_names_do_not():
    net = MemoryNetwork()
    net.listenTCP(80, Factory.forProtocol(Protocol), interface="10.0.0.1")
    net.nameResolver.names["llm.local"] = "10.0.0.1"
    ok = HostnameEndpoint(net, "llm.local", 80).connect(Factory.forProtocol(Protocol))
    unknown = HostnameEndpoint(net, "nowhere.invalid", 80).connect(Factory.forProtocol(Protocol))
    net.flush()
    assert isinstance(ok.result, Protocol) and len(net.connections) == 1
    assert isinstance(_failure(unknown).value, DNSLookupError)


def test_a_taken_address_cannot_be_listened_on_and_port_zero_picks_a_free_one():
    net = MemoryNetwork()
    port = net.listenTCP(80, Factory(), interface="10.0.0.1")
    with pytest.raises(CannotListenError):
        net.listenTCP(80, Factory(), interface="10.0.0.1")
    with pytest.raises(CannotListenError):
        net.listenTCP(80, Factory())  # every interface, 10.0.0.1 included
    net.listenTCP(80, Factory(), interface="10.0.0.2")
    first, second = (net.listenTCP(0, Factory(), interface="10.0.0.1").getHost().port for _ in range(2))
    assert first != second and 0 not in (first, second)
    port.stopListening()
    net.listenTCP(80, Factory(), interface="10.0.0.1")


def test_datagrams_reach_a_listener_at_the_flush_and_are_lost_without_one():
    net = MemoryNetwork()

    class Receiver(DatagramProtocol):
        def __init__(self) -> None:
            self.got: list[tuple[bytes, Any]] = []

        def datagramReceived(self, datagram: bytes, addr: Any) -> None:
            self.got.append((datagram, addr))

    receiver = Receiver()
    net.listenUDP(8125, receiver, interface="127.0.0.1")
    sender = net.listenUDP(0, DatagramProtocol())
    sender.write(b"a:1|g", ("127.0.0.1", 8125))
    sender.write(b"lost", ("127.0.0.1", 8126))
    assert receiver.got == []
    net.flush()
    assert [datagram for datagram, _ in receiver.got] == [b"a:1|g"]
    assert net.datagrams == []


def test_run_fires_each_timer_at_its_time_with_the_bytes_moved_in_between():
    net = MemoryNetwork()
    client, server = connected(net)
    seen: list[tuple[float, bytes]] = []
    net.callLater(1, server.transport.write, b"one")
    net.callLater(2, lambda: seen.append((net.seconds(), client.received)))
    net.run_for(3)
    assert seen == [(2.0, b"one")] and net.seconds() == 3.0


def test_a_network_that_never_settles_is_reported():
    net = MemoryNetwork()
    client, server = connected(net)

    def echo(data: bytes, protocol: Recorder) -> None:
        protocol.transport.write(data)

    client.dataReceived = lambda data: echo(data, client)  # type: ignore[method-assign]
    server.dataReceived = lambda data: echo(data, server)  # type: ignore[method-assign]
    client.transport.write(b"ping")
    with pytest.raises(AssertionError, match="did not settle"):
        net.flush(limit=50)
