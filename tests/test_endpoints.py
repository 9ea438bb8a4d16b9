"""Upstream endpoints are built once per (scheme, host, port)."""

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface.verify import verifyObject

from paddler.upstream.endpoints import CachingEndpointFactory


def test_factory_provides_the_interface():
    assert verifyObject(IAgentEndpointFactory, CachingEndpointFactory(MemoryReactorClock()))


def test_same_upstream_reuses_its_endpoint_and_others_get_their_own():
    factory = CachingEndpointFactory(MemoryReactorClock(), connect_timeout=3)
    a1 = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.5:8080/completion"))
    a2 = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.5:8080/v1/models"))
    b = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.6:8080/completion"))
    tls = factory.endpointForURI(URI.fromBytes(b"https://10.0.0.5:8080/completion"))
    assert a1 is a2
    assert b is not a1 and tls is not a1


def test_connect_timeout_reaches_the_endpoint_and_the_cache_is_bounded():
    reactor = MemoryReactorClock()
    factory = CachingEndpointFactory(reactor, connect_timeout=3, max_entries=2)
    endpoint = factory.endpointForURI(URI.fromBytes(b"http://a:1/"))
    assert endpoint._timeout == 3
    factory.endpointForURI(URI.fromBytes(b"http://b:1/"))
    factory.endpointForURI(URI.fromBytes(b"http://c:1/"))
    assert len(factory._cache) == 1


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError):
        CachingEndpointFactory(MemoryReactorClock()).endpointForURI(URI.fromBytes(b"ftp://a:1/"))
