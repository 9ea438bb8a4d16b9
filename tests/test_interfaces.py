"""Every class that declares an interface provides it (verifyObject), test fakes included."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.interfaces import (
    IConnector,
    IConsumer,
    IHostnameResolver,
    IHostResolution,
    IListeningPort,
    IPushProducer,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
    ITCPTransport,
    IUDPTransport,
)
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.interfaces import IProtocol
from twisted.logger import ILogFilterPredicate
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from paddler.balancer.relay import Relay
from paddler.interfaces import ISlotChooser, IUpstreamBody, IUpstreamClient, IUpstreamProber
from paddler.logs import drop_noise
from paddler.observability.stream import StateStream, _StreamClient
from paddler.routing.policies import CHOOSERS
from paddler.upstream.endpoints import CachingEndpointFactory
from paddler.upstream.client import UpstreamClient

from .helpers import BytesProducer, FakeUpstreamBody
from .memory_network import MemoryNetwork, connect_raw
from .proxy_harness import Chunks
from .test_probe import RecordingProber
from .test_probe_now import HeldProber
from .test_self_upstream import RecordingClient


def memory_network_parts() -> list[tuple[Any, Any]]:
    """The in-memory network of the proxy tests (L{tests.memory_network}) and each of its parts."""
    net = MemoryNetwork()
    port = net.listenTCP(80, Factory.forProtocol(Protocol), interface="10.0.0.1")
    client = connect_raw(net, "10.0.0.1", 80)
    [connector] = net.pending
    net.flush()
    [connection] = net.connections
    resolutions: list[Any] = []

    class Receiver:
        def resolutionBegan(self, resolution: Any) -> None:
            resolutions.append(resolution)

        def addressResolved(self, address: Any) -> None:
            pass

        def resolutionComplete(self) -> None:
            pass

    net.nameResolver.resolveHostName(Receiver(), "localhost")
    return [
        (IReactorTCP, net),
        (IReactorUDP, net),
        (IReactorTime, net),
        (IReactorPluggableNameResolver, net),
        (ITCPTransport, connection.client),
        (IConsumer, connection.server),
        (IPushProducer, connection.server),
        (IConnector, connector),
        (IListeningPort, port),
        (IUDPTransport, net.listenUDP(0, DatagramProtocol())),
        (IHostnameResolver, net.nameResolver),
        (IHostResolution, resolutions[0]),
        (IProtocol, client),
        (IProtocol, Chunks()),
    ]


def providers() -> list[tuple[Any, Any]]:
    clock = Clock()
    stream = StateStream(clock, lambda full: {})
    return [
        *[(ISlotChooser, make(clock)) for make in CHOOSERS.values()],
        (IPushProducer, Relay(DummyRequest([b""]), clock, idle_timeout=1.0)),
        (IPushProducer, _StreamClient(stream, DummyRequest([b""]))),
        (IBodyProducer, BytesProducer(b"{}")),
        (IAgentEndpointFactory, CachingEndpointFactory(MemoryReactorClock())),
        (IUpstreamClient, UpstreamClient(MemoryReactorClock())),
        (IUpstreamBody, FakeUpstreamBody()),
        (IUpstreamClient, RecordingClient(None)),
        (ILogFilterPredicate, drop_noise),
        (IUpstreamProber, RecordingProber()),
        (IUpstreamProber, HeldProber()),
        *guarded_listener_parts(),
        *memory_network_parts(),
        *slot_source_parts(),
    ]


def slot_source_parts() -> list[tuple[Any, Any]]:
    """The pool's two slot sources: its own (no --state) and the shared store's side."""
    from paddler.fleet.pool import LocalSlotSource, UpstreamPool
    from paddler.interfaces import ISlotSource
    from paddler.sharedstate.fleet import SharedFleet
    from paddler.sharedstate.memory import MemorySlotState, MemorySlotStore

    clock = Clock()
    pool = UpstreamPool(clock, CHOOSERS["slots"](clock))
    store = MemorySlotStore(MemorySlotState(clock), "a")
    return [(ISlotSource, LocalSlotSource(pool)), (ISlotSource, SharedFleet(pool, store, clock))]


def guarded_listener_parts() -> list[tuple[Any, Any]]:
    """The channel, request and site of a listener: what they tell each other is typed (no getattr probes)."""
    from twisted.web.resource import Resource

    from paddler.interfaces import IBoundedRequest, IGuardedChannel, IGuardedSite
    from paddler.server.channel import ClientLimits, GuardedSite
    from paddler.server.request import bounded_request_factory

    site = GuardedSite(
        Resource(), ClientLimits(), MemoryReactorClock(), request_factory=bounded_request_factory(1024)
    )
    from twisted.internet.address import IPv4Address

    from twisted.internet.testing import StringTransport

    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    channel.makeConnection(StringTransport())
    fast_site = GuardedSite(
        Resource(), ClientLimits(), MemoryReactorClock(), request_factory=bounded_request_factory(1024),
        parser="httptools",
    )
    fast_channel = fast_site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    fast_channel.makeConnection(StringTransport())
    return [
        (IGuardedSite, site),
        (IGuardedChannel, channel),
        (IBoundedRequest, site.requestFactory(channel, True)),
        (IGuardedChannel, fast_channel),  # the --request-parser httptools channel
    ]


@pytest.mark.parametrize("interface, provider", providers(), ids=lambda p: type(p).__name__)
def test_each_implementation_and_fake_provides_its_interface(interface: Any, provider: Any) -> None:
    assert verifyObject(interface, provider)


def test_the_channel_the_request_and_the_proxy_probe_no_attributes():
    """What the channel, the request and the proxy tell each other goes through IBoundedRequest, IGuardedChannel
    and IGuardedSite: no getattr/hasattr probe is left in the three files but those on Twisted's own objects
    (a transport that may half-close, an address that may have a host)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "paddler"
    allowed = {("loseWriteConnection",), ("host",)}
    for name in ("server/channel.py", "server/request.py", "balancer/proxy.py"):
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                probed = tuple(a.value for a in node.args[1:2] if isinstance(a, ast.Constant))
                assert probed in allowed, f"{name}:{node.lineno} probes {probed}"
