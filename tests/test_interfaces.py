"""Every class that declares an interface provides it (verifyObject), test fakes included."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogFilterPredicate
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from paddler.balancer.relay import AgentClient, BytesProducer, Relay
from paddler.interfaces import ISlotChooser, IUpstreamClient, IUpstreamProber
from paddler.logs import drop_noise
from paddler.observability.stream import StateStream, _StreamClient
from paddler.routing.policies import CHOOSERS
from paddler.web.endpoints import CachingEndpointFactory
from paddler.web.upstream_client import UpstreamClient

from .test_probe import RecordingProber
from .test_probe_now import HeldProber


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
        (IUpstreamClient, AgentClient(None)),
        (ILogFilterPredicate, drop_noise),
        (IUpstreamProber, RecordingProber()),
        (IUpstreamProber, HeldProber()),
    ]


@pytest.mark.parametrize("interface, provider", providers(), ids=lambda p: type(p).__name__)
def test_each_implementation_and_fake_provides_its_interface(interface: Any, provider: Any) -> None:
    assert verifyObject(interface, provider)
