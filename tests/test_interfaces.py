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
from paddler.web.endpoints import CachingEndpointFactory
from paddler.web.upstream_client import UpstreamClient

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
        *memory_network_parts(),
    ]


@pytest.mark.parametrize("interface, provider", providers(), ids=lambda p: type(p).__name__)
def test_each_implementation_and_fake_provides_its_interface(interface: Any, provider: Any) -> None:
    assert verifyObject(interface, provider)
