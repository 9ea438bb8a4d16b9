"""A reactor whose TCP connections and UDP datagrams never leave memory, timed by its own clock.

L{MemoryNetwork} is a L{MemoryReactorClock} that actually connects what
listens to what connects: C{listenTCP} binds an address in memory,
C{connectTCP} (so C{HostnameEndpoint}, C{Agent}, C{HTTPConnectionPool} and
C{serverFromString} work unchanged) completes against it at the next
L{MemoryNetwork.flush}, and bytes move only when the test flushes. Nothing
happens on its own: no real reactor turn, no sleep, no socket. The clock
drives every timeout; the flush moves the bytes.

Why not L{twisted.test.iosim}'s C{FakeTransport}: it never pauses a
producer when its buffer fills, ignores C{pauseProducing} from the protocol
reading it, and its C{abortConnection} delivers the data it should drop;
backpressure, slow readers and resets are what the proxy tests check.

What is modelled, as a TCP socket in Twisted behaves:
  - a write is buffered on the writing side until the peer reads it; above
    C{buffer_size} unread bytes the writer's streaming producer is paused,
    and resumed once the peer has read them (``FileDescriptor.write``);
  - a side whose protocol paused the transport, or that the test holds with
    L{MemoryTransport.hold}, reads nothing until resumed or released;
  - C{loseConnection} closes once the peer has read what was written before
    it (both sides then see C{ConnectionDone}); C{abortConnection} drops the
    unread bytes and both sides see the loss at once (C{ConnectionAborted}
    here, C{ConnectionLost} at the peer, as after a reset);
  - a closing transport stops its registered producer before telling its
    protocol (``FileDescriptor.connectionLost``);
  - a connection to an address nobody listens on is refused at the next
    flush; one to a host made L{unreachable <MemoryNetwork.unreachable>}
    stays pending until its connect timeout, on the clock, or until it is
    cancelled.

What is not: half-closes, TLS, partial reads (a read takes all the bytes
written so far), the time bytes take on the wire.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import (
    CannotListenError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError as ConnectTimeoutError,
    UserError,
)
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IConsumer,
    IHostnameResolver,
    IHostResolution,
    IListeningPort,
    IPushProducer,
    IReactorUDP,
    IResolutionReceiver,
    ITCPTransport,
    IUDPTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

#: Unread bytes above which a writer's producer is paused (Twisted's C{FileDescriptor.bufferSize}).
BUFFER_SIZE = 64 * 1024


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


@implementer(ITCPTransport, IConsumer, IPushProducer)
class MemoryTransport:
    """One side of an in-memory TCP connection (see the module docstring for what it models)."""

    def __init__(self, connection: Connection, protocol: Any, host: IAddress, peer: IAddress) -> None:
        self.connection = connection
        self.protocol = protocol
        self.host = host
        self.peer_address = peer
        self.unread: list[bytes] = []
        self.unread_size = 0
        self.producer: Any = None
        self.streaming = False
        self.producer_paused = False
        self.paused = False  # the protocol on this side asked not to read
        self.held = False  # the test withholds reads from this side
        self.disconnecting = False
        self.aborted = False
        self.disconnected = False

    # -- what the test controls ---------------------------------------------

    def hold(self) -> None:
        """Read nothing on this side until L{release} (a reader that stopped reading)."""
        self.held = True

    def release(self) -> None:
        """Read again what was withheld (at the next flush)."""
        self.held = False

    @property
    def reading(self) -> bool:
        """Whether the next flush hands this side what its peer wrote."""
        return not (self.paused or self.held or self.disconnected)

    # -- ITransport -----------------------------------------------------------

    def write(self, data: bytes) -> None:
        # As in Twisted, bytes written after loseConnection still go out; after an abort they do not.
        if self.aborted or self.disconnected or not data:
            return
        self.unread.append(bytes(data))
        self.unread_size += len(data)
        if (
            self.producer is not None
            and self.streaming
            and not self.producer_paused
            and self.unread_size > self.connection.network.buffer_size
        ):
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True
        self.unread.clear()
        self.unread_size = 0

    def getPeer(self) -> Any:
        return self.peer_address

    def getHost(self) -> Any:
        return self.host

    # -- ITCPTransport ----------------------------------------------------------

    def loseWriteConnection(self) -> None:
        raise NotImplementedError("half-closed connections are not modelled")

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    # -- IConsumer --------------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"{self.producer!r} is already registered on this transport")
        if self.disconnected:
            producer.stopProducing()
            return
        self.producer = producer
        self.streaming = streaming
        self.producer_paused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False

    # -- IPushProducer (the protocol on this side pausing its reads) ------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- the network's side -----------------------------------------------------

    def _take(self) -> bytes:
        data = b"".join(self.unread)
        self.unread.clear()
        self.unread_size = 0
        return data

    def _drained(self) -> None:
        """The peer read everything: wake a paused streaming producer, or ask a pull producer for more."""
        if self.producer is not None and (not self.streaming or self.producer_paused):
            self.producer_paused = False
            self.producer.resumeProducing()

    def _lost(self, reason: Failure) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self.disconnecting = True
        self.unread.clear()
        self.unread_size = 0
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(reason)


class Connection:
    """An established in-memory TCP connection: C{client} and C{server} are its two L{MemoryTransport}s."""

    def __init__(
        self,
        network: MemoryNetwork,
        client_protocol: Any,
        server_protocol: Any,
        client_address: IAddress,
        server_address: IAddress,
    ) -> None:
        self.network = network
        self.client_address = client_address
        self.server_address = server_address
        self.client = MemoryTransport(self, client_protocol, client_address, server_address)
        self.server = MemoryTransport(self, server_protocol, server_address, client_address)

    def __repr__(self) -> str:
        return f"<Connection {self.client_address} -> {self.server_address}{' closed' if self.closed else ''}>"

    @property
    def closed(self) -> bool:
        return self.client.disconnected and self.server.disconnected

    def _start(self) -> None:
        self.server.protocol.makeConnection(self.server)
        self.client.protocol.makeConnection(self.client)

    def pump(self) -> bool:
        """Move what each side wrote to the other (if it reads) and deliver closes; whether anything happened."""
        if self.closed:
            return False
        moved = False
        for writer, reader in ((self.client, self.server), (self.server, self.client)):
            if writer.aborted or reader.aborted:
                self._close(writer if writer.aborted else reader)
                return True
            if writer.unread and reader.reading:
                data = writer._take()
                reader.protocol.dataReceived(data)
                writer._drained()
                moved = True
                if self.closed:
                    return True
        if moved:
            return True
        for writer in (self.client, self.server):
            if writer.disconnecting and not writer.unread:
                self._close(writer)
                return True
        return False

    def _close(self, by: MemoryTransport) -> None:
        other = self.server if by is self.client else self.client
        if by.aborted:
            mine: Failure = Failure(ConnectionAborted())
            theirs: Failure = Failure(ConnectionLost("Connection reset by peer"))
        else:
            mine = theirs = Failure(ConnectionDone())
        by._lost(mine)
        other._lost(theirs)


@implementer(IConnector)
class _Connector:
    """A connection attempt (C{connectTCP}'s return value)."""

    def __init__(self, network: MemoryNetwork, host: str, port: int, factory: Any, timeout: float, source: IAddress) -> None:
        self.network = network
        self.destination = _address(host, port)
        self.factory = factory
        self.timeout = timeout
        self.source = source
        self.state = "connecting"
        self._timer: Any = None

    def stopConnecting(self) -> None:
        if self.state == "connecting":
            self._fail(Failure(UserError()))

    def disconnect(self) -> None:
        self.stopConnecting()

    def connect(self) -> None:
        raise NotImplementedError("reconnecting a connector is not modelled")

    def getDestination(self) -> IAddress:
        return self.destination

    def _fail(self, reason: Failure) -> None:
        self.state = "failed"
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.factory.clientConnectionFailed(self, reason)


@implementer(IListeningPort)
class _ListeningPort:
    def __init__(self, network: MemoryNetwork, key: tuple[str, int], factory: Any) -> None:
        self.network = network
        self.key = key
        self.factory = factory

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Deferred[None]:
        self.network.listeners.pop(self.key, None)
        return succeed(None)

    def getHost(self) -> IAddress:
        return _address(*self.key)


@implementer(IUDPTransport, IListeningPort)
class _UDPPort:
    """A UDP port in memory: datagrams written to an address are delivered to whoever listens there at the next flush."""

    def __init__(self, network: MemoryNetwork, key: tuple[str, int], protocol: Any) -> None:
        self.network = network
        self.key = key
        self.protocol = protocol
        self.connected_to: tuple[str, int] | None = None

    def write(self, packet: bytes, addr: tuple[str, int] | None = None) -> None:
        to = addr or self.connected_to
        if to is None:
            raise ValueError("no address given to an unconnected UDP port")
        self.network.datagrams.append((bytes(packet), self.key, (to[0], int(to[1]))))

    def connect(self, host: str, port: int) -> None:
        self.connected_to = (host, port)

    def getHost(self) -> Any:
        return IPv4Address("UDP", *self.key)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Deferred[None]:
        if self.network.udp.get(self.key) is self:
            del self.network.udp[self.key]
            self.protocol.doStop()
        return succeed(None)

    def setBroadcastAllowed(self, enabled: bool) -> None:
        pass

    def getBroadcastAllowed(self) -> bool:
        return False


@implementer(IHostResolution)
@dataclass
class _Resolution:
    name: str

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
@dataclass
class NameTable:
    """Resolves IP literals to themselves and the names in C{names}; any other name has no address."""

    names: dict[str, str] = field(default_factory=lambda: {"localhost": "127.0.0.1"})

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        host = self.names.get(hostName, hostName)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            resolutionReceiver.addressResolved(_address(host, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IReactorUDP)
class MemoryNetwork(MemoryReactorClock):
    """
    A reactor (and clock) on which everything that listens and connects stays in memory.

    @ivar connections: every connection established, in order (closed ones included).
    @ivar buffer_size: unread bytes above which a writer's producer is paused.
    """

    def __init__(self, buffer_size: int = BUFFER_SIZE, client_host: str = "127.0.0.1") -> None:
        super().__init__()
        self.buffer_size = buffer_size
        self.client_host = client_host
        self.nameResolver: IHostnameResolver = NameTable()
        self.listeners: dict[tuple[str, int], Any] = {}
        self.udp: dict[tuple[str, int], _UDPPort] = {}
        self.datagrams: list[tuple[bytes, tuple[str, int], tuple[str, int]]] = []
        self.unreachable: set[str] = set()
        self.pending: list[_Connector] = []
        self.connections: list[Connection] = []
        self._ports = itertools.count(40000)

    # -- IReactorTCP ------------------------------------------------------------

    def _free_port(self, taken: Callable[[int], bool]) -> int:
        for port in self._ports:
            if not taken(port):
                return port
        raise AssertionError("unreachable")  # pragma: no cover

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> IListeningPort:
        """Bind C{interface:port} in memory (C{""} and C{0.0.0.0} mean every host); a taken one raises C{CannotListenError}.

        The factory is not started, as with L{MemoryReactor}: a started
        C{Site} would keep its access-log date timer on the clock.
        """
        host = interface or "0.0.0.0"

        def taken(number: int) -> bool:
            return any(p == number and (h == host or "0.0.0.0" in (h, host)) for h, p in self.listeners)

        if port == 0:
            port = self._free_port(taken)
        elif taken(port):
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "Address already in use"))
        self.listeners[(host, port)] = factory
        self.tcpServers.append((port, factory, backlog, interface))
        return _ListeningPort(self, (host, port), factory)

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None) -> IConnector:
        """Start connecting to C{host:port}: completed (or refused) at the next flush; an unreachable host times out on the clock."""
        source_host = bindAddress[0] if bindAddress else self.client_host
        source = _address(source_host, next(self._ports))
        connector = _Connector(self, host, port, factory, timeout, source)
        factory.startedConnecting(connector)
        self.pending.append(connector)
        if host in self.unreachable:
            connector._timer = self.callLater(
                timeout, connector._fail, Failure(ConnectTimeoutError(string=f"connecting to {host}:{port}"))
            )
        return connector

    def _listener(self, host: str, port: int) -> Any:
        return self.listeners.get((host, port), self.listeners.get(("0.0.0.0", port)))

    def _complete(self) -> bool:
        progressed = False
        for connector in list(self.pending):
            if connector.state != "connecting":
                self.pending.remove(connector)
                progressed = True
                continue
            destination = connector.destination
            if destination.host in self.unreachable:
                continue
            self.pending.remove(connector)
            progressed = True
            server_factory = self._listener(destination.host, destination.port)
            if server_factory is None:
                connector._fail(Failure(ConnectionRefusedError(string=f"{destination.host}:{destination.port}")))
                continue
            connector.state = "connected"
            client_protocol = connector.factory.buildProtocol(destination)
            server_protocol = server_factory.buildProtocol(connector.source)
            if client_protocol is None or server_protocol is None:
                connector._fail(Failure(ConnectionRefusedError(string="the factory built no protocol")))
                continue
            connection = Connection(self, client_protocol, server_protocol, connector.source, destination)
            self.connections.append(connection)
            connection._start()
        return progressed

    # -- IReactorUDP ------------------------------------------------------------

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
        host = interface or "0.0.0.0"
        if port == 0:
            port = self._free_port(lambda n: (host, n) in self.udp)
        elif (host, port) in self.udp:
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "Address already in use"))
        udp = _UDPPort(self, (host, port), protocol)
        self.udp[(host, port)] = udp
        protocol.makeConnection(udp)
        return udp

    def _deliver_datagrams(self) -> bool:
        datagrams, self.datagrams = self.datagrams, []
        for packet, source, (host, port) in datagrams:
            receiver = self.udp.get((host, port)) or self.udp.get(("0.0.0.0", port))
            if receiver is not None:  # nobody listening: the datagram is lost, as on a real network
                receiver.protocol.datagramReceived(packet, source)
        return bool(datagrams)

    # -- moving bytes -----------------------------------------------------------

    def flush(self, limit: int = 100_000) -> None:
        """Run what is due on the clock now, complete connection attempts and move bytes until nothing moves."""
        for _ in range(limit):
            self.advance(0)
            progressed = self._complete()
            progressed = self._deliver_datagrams() or progressed
            for connection in list(self.connections):
                progressed = connection.pump() or progressed
            if not progressed and not any(call.getTime() <= self.seconds() for call in self.getDelayedCalls()):
                return
        raise AssertionError(f"the network did not settle after {limit} rounds")

    def run_for(self, seconds: float) -> None:
        """Let C{seconds} pass: fire each timer at its time, flushing after each, as a reactor would."""
        end = self.seconds() + seconds
        self.flush()
        while True:
            due = [call.getTime() for call in self.getDelayedCalls() if call.getTime() <= end]
            if not due:
                break
            self.advance(max(0.0, min(due) - self.seconds()))
            self.flush()
        self.advance(max(0.0, end - self.seconds()))
        self.flush()

    def open_connections(self, host: str | None = None, port: int | None = None) -> list[Connection]:
        """The connections not yet closed, to C{host:port} when given."""
        return [c for c in self.connections if not c.closed and _matches(c.server_address, host, port)]

    def connections_to(self, host: str, port: int) -> list[Connection]:
        """Every connection ever made to C{host:port}, closed ones included."""
        return [c for c in self.connections if _matches(c.server_address, host, port)]


def _matches(address: Any, host: str | None, port: int | None) -> bool:
    return (host is None or address.host == host) and (port is None or address.port == port)


class RawClient(Protocol):
    """A client that sends raw bytes and keeps every byte it gets back (HTTP/1.0, hostile request lines)."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[assignment]
        self.lost = reason

    @property
    def closed(self) -> bool:
        return self.lost is not None


class _RawFactory(ClientFactory):
    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.failed: Failure | None = None

    def buildProtocol(self, addr: Any) -> RawClient:
        return self.client

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failed = reason


def connect_raw(network: MemoryNetwork, host: str, port: int) -> RawClient:
    """A L{RawClient} connected to C{host:port} (the connection is made at the next flush)."""
    client = RawClient()
    network.connectTCP(host, port, _RawFactory(client))
    return client

