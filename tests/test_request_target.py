"""Request targets and Host headers: only a path reaches an upstream (RFC 9112 section 3.2).

A target once concatenated to the upstream URL could extend its port
(``69/api/v1/upstreams`` on ``http://127.0.0.1:371`` reached port 37169).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.server import Site

from paddler.balancer.proxy import ProxyConfig, ProxyResource
from paddler.web.request import bounded_request_factory
from paddler.web.target import Target, TargetRejected, check_target

from .fake_llama import FakeLlama
from .helpers import healthy_upstream, make_pool


class RecordingAgent:
    """Routes requests to an in-memory fake llama-server and records every URI asked for."""

    def __init__(self, resource: Any) -> None:
        self.uris: list[bytes] = []
        self.hosts: list[list[bytes] | None] = []
        self._agent = RequestTraversalAgent(resource)

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        self.uris.append(uri)
        self.hosts.append(None if headers is None else headers.getRawHeaders(b"host"))
        return self._agent.request(method, uri, headers, bodyProducer)


def exchange(site: Site, raw: bytes) -> bytes:
    """Feed C{raw} to a new connection of C{site}; return what it wrote back."""
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
    protocol = site.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    written = transport.value()
    protocol.connectionLost(None)
    return written


def status_and_body(response: bytes) -> tuple[int, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return status, json.loads(body)


@pytest.fixture
def proxy():
    clock = Clock()
    pool = make_pool(clock)
    upstreams = [healthy_upstream("http://127.0.0.1:371", clock=clock),
                 healthy_upstream("http://127.0.0.1:372", clock=clock)]
    for upstream in upstreams:
        pool.add(upstream)
    agent = RecordingAgent(FakeLlama())
    resource = ProxyResource(pool, agent, clock, ProxyConfig())
    site = Site(resource, requestFactory=bounded_request_factory(1024))
    yield site, agent, pool
    pool.stop()


@pytest.mark.parametrize(
    "request_line, status, words",
    [
        (b"GET 69/api/v1/upstreams HTTP/1.1", 400, "must be a path"),
        (b"POST 69/api/v1/upstreams HTTP/1.1", 400, "must be a path"),
        (b"GET I HTTP/1.1", 400, "must be a path"),
        (b"GET @evil.example/x HTTP/1.1", 400, "must be a path"),
        (b"CONNECT host:1 HTTP/1.1", 405, "CONNECT"),
        (b"CONNECT evil.example:443 HTTP/1.1", 405, "CONNECT"),
        (b"OPTIONS * HTTP/1.1", 400, "asterisk"),
        (b"GET /v1/models#frag HTTP/1.1", 400, "fragment"),
        (b"GET /v1/%ffmodels\x7f HTTP/1.1", 400, "visible ASCII"),
        (b"GET http://user@evil.example/ HTTP/1.1", 400, "invalid host"),
        (b"GET http:///v1/models HTTP/1.1", 400, "must be a path"),
        (b"GET ftp://evil.example/ HTTP/1.1", 400, "must be a path"),
    ],
)
def test_a_target_that_is_not_a_path_is_refused_and_reaches_no_upstream(proxy, request_line, status, words):
    """Relative, authority, asterisk and odd targets get a JSON 4xx; no upstream is asked, the pool is unchanged."""
    site, agent, pool = proxy
    before = pool.totals()
    answer = exchange(site, request_line + b"\r\nHost: balancer\r\nContent-Length: 2\r\n\r\n{}")
    code, body = status_and_body(answer)
    assert code == status
    assert body["error"]["code"] == status and words in body["error"]["message"]
    assert agent.uris == []
    assert pool.totals() == before


@pytest.mark.parametrize("request_line", [b"GET /v1/\xffmodels HTTP/1.1", b"GET /v1/\x01models HTTP/1.1"])
def test_a_request_line_the_http_parser_refuses_is_a_400_that_reaches_no_upstream(proxy, request_line):
    """Bytes Twisted's parser refuses in the request line: 400 and the connection closed, no upstream asked."""
    site, agent, _ = proxy
    answer = exchange(site, request_line + b"\r\nHost: balancer\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert agent.uris == []


def test_absolute_form_is_served_as_its_path_on_the_upstream_with_its_host(proxy):
    """GET http://evil.example/v1/models goes to <upstream>/v1/models, Host taken from the target."""
    site, agent, _ = proxy
    answer = exchange(site, b"GET http://evil.example/v1/models?x=1 HTTP/1.1\r\nHost: other\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    (uri,) = agent.uris
    assert uri in (b"http://127.0.0.1:371/v1/models?x=1", b"http://127.0.0.1:372/v1/models?x=1")
    assert agent.hosts == [[b"evil.example"]]


def test_absolute_form_without_a_path_is_the_root(proxy):
    """http://host?q (no path) is / with its query."""
    site, agent, _ = proxy
    exchange(site, b"GET HTTP://evil.example:8080?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert agent.uris and agent.uris[0].endswith(b":371/?q=1") or agent.uris[0].endswith(b":372/?q=1")


def test_two_host_headers_are_refused(proxy):
    """Two Host lines are a 400 (RFC 9112 section 3.2), not a 500."""
    site, agent, _ = proxy
    answer = exchange(site, b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    code, body = status_and_body(answer)
    assert code == 400 and "more than one Host" in body["error"]["message"]
    assert agent.uris == []


def test_http11_without_host_is_refused_but_http10_is_served(proxy):
    """HTTP/1.1 needs a Host header; HTTP/1.0 does not."""
    site, agent, _ = proxy
    code, body = status_and_body(exchange(site, b"GET /v1/models HTTP/1.1\r\n\r\n"))
    assert code == 400 and "needs a Host" in body["error"]["message"]
    assert exchange(site, b"GET /v1/models HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
    assert len(agent.uris) == 1


def test_two_clients_with_hostile_and_good_targets_interleaved(proxy):
    """A hostile target on one connection does not disturb a good request on another."""
    site, agent, _ = proxy
    bad = exchange(site, b"GET 69/api/v1/upstreams HTTP/1.1\r\nHost: h\r\n\r\n")
    good = exchange(site, b"GET /v1/models HTTP/1.1\r\nHost: h\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400") and good.startswith(b"HTTP/1.1 200")
    assert len(agent.uris) == 1 and agent.uris[0].endswith(b"/v1/models")


@pytest.mark.parametrize(
    "method, target, expected",
    [
        (b"GET", b"/", Target(b"/")),
        (b"POST", b"/completion?a=1", Target(b"/completion?a=1")),
        (b"GET", b"http://h:1/p", Target(b"/p", b"h:1")),
        (b"GET", b"https://[::1]:8080/p?q", Target(b"/p?q", b"[::1]:8080")),
        (b"GET", b"http://h", Target(b"/", b"h")),
    ],
)
def test_check_target_accepts_origin_and_absolute_forms(method, target, expected):
    assert check_target(method, target, [b"h"], b"HTTP/1.1") == expected


@pytest.mark.parametrize("target", [b"h:1", b"", b"*", b"//", b"http://h:99999999/", b"http://[::1/"])
def test_check_target_refuses_the_rest(target):
    if target == b"//":  # a path of two slashes is origin-form and harmless
        assert check_target(b"GET", target, [b"h"], b"HTTP/1.1") == Target(b"//")
        return
    with pytest.raises(TargetRejected):
        check_target(b"GET", target, [b"h"], b"HTTP/1.1")
