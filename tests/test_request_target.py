"""Request targets and Host headers: only a path reaches an upstream (RFC 9112 section 3.2).

A target once concatenated to the upstream URL could extend its port
(``69/api/v1/upstreams`` on ``http://127.0.0.1:371`` reached port 37169).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from paddler.server.target import Target, TargetRejected, check_target

from .memory_network import connect_raw
from .proxy_harness import PROXY_HOST, PROXY_PORT, Harness

#: every test here runs with each request parser of the proxy port (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("both_parsers")


def exchange(h: Harness, raw: bytes) -> bytes:
    """Send C{raw} on a new client connection to the proxy; return what it wrote back, then hang up."""
    client = h.raw(raw)
    if not client.closed:
        client.transport.loseConnection()
        h.flush()
    return client.received


def upstream_requests(h: Harness) -> list[tuple[str, bytes, list[bytes] | None]]:
    """(upstream, request target, Host header) of every request an upstream received."""
    seen = []
    for fake in h.fakes:
        for method, uri, headers, body in fake.seen:
            lower = {name.lower(): values for name, values in headers.items()}
            seen.append((fake.name, uri, lower.get(b"host")))
    return seen


def upstream_connection_attempts(h: Harness) -> list[Any]:
    """Every connection (made or still being made) to an address other than the proxy's."""
    made = [c.server_address for c in h.net.connections
            if (c.server_address.host, c.server_address.port) != (PROXY_HOST, PROXY_PORT)]
    return made + [connector.getDestination() for connector in h.net.pending]


def status_and_body(response: bytes) -> tuple[int, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return status, json.loads(body)


@pytest.fixture
def proxy():
    h = Harness()
    h.add_fake("a")
    h.add_fake("b")
    yield h, h.pool
    h.stop()


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
    h, pool = proxy
    before = pool.totals()
    answer = exchange(h, request_line + b"\r\nHost: balancer\r\nContent-Length: 2\r\n\r\n{}")
    code, body = status_and_body(answer)
    assert code == status
    assert body["error"]["code"] == status and words in body["error"]["message"]
    assert upstream_requests(h) == [] and upstream_connection_attempts(h) == []
    assert pool.totals() == before


@pytest.mark.parametrize("request_line", [b"GET /v1/\xffmodels HTTP/1.1", b"GET /v1/\x01models HTTP/1.1"])
def test_a_request_line_the_http_parser_refuses_is_a_400_that_reaches_no_upstream(proxy, request_line):
    """Bytes Twisted's parser refuses in the request line: 400 and the connection closed, no upstream asked."""
    h, _ = proxy
    answer = exchange(h, request_line + b"\r\nHost: balancer\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert upstream_requests(h) == [] and upstream_connection_attempts(h) == []


def test_absolute_form_is_served_as_its_path_on_the_upstream_with_its_host(proxy):
    """GET http://evil.example/v1/models goes to <upstream>/v1/models, Host taken from the target."""
    h, _ = proxy
    answer = exchange(h, b"GET http://evil.example/v1/models?x=1 HTTP/1.1\r\nHost: other\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    ((name, uri, host),) = upstream_requests(h)
    assert name in ("a", "b") and uri == b"/v1/models?x=1"
    assert [(a.host, a.port) for a in upstream_connection_attempts(h)] in ([("10.0.0.1", 8080)], [("10.0.0.2", 8080)])
    assert host == [b"evil.example"]


def test_absolute_form_without_a_path_is_the_root(proxy):
    """http://host?q (no path) is / with its query."""
    h, _ = proxy
    exchange(h, b"GET HTTP://evil.example:8080?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [(uri, host) for _, uri, host in upstream_requests(h)] == [(b"/?q=1", [b"evil.example:8080"])]


def test_two_host_headers_are_refused(proxy):
    """Two Host lines are a 400 (RFC 9112 section 3.2), not a 500."""
    h, _ = proxy
    answer = exchange(h, b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    code, body = status_and_body(answer)
    assert code == 400 and "more than one Host" in body["error"]["message"]
    assert upstream_requests(h) == [] and upstream_connection_attempts(h) == []


def test_http11_without_host_is_refused_but_http10_is_served(proxy):
    """HTTP/1.1 needs a Host header; HTTP/1.0 does not."""
    h, _ = proxy
    code, body = status_and_body(exchange(h, b"GET /v1/models HTTP/1.1\r\n\r\n"))
    assert code == 400 and "needs a Host" in body["error"]["message"]
    assert exchange(h, b"GET /v1/models HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
    assert len(upstream_requests(h)) == 1


def test_two_clients_with_hostile_and_good_targets_interleaved(proxy):
    """A hostile target on one connection does not disturb a good request on another."""
    h, _ = proxy
    clients = [connect_raw(h.net, PROXY_HOST, PROXY_PORT) for _ in range(2)]
    h.flush()
    bad_client, good_client = clients
    bad_client.transport.write(b"GET 69/api/v1/")
    good_client.transport.write(b"GET /v1/models HTTP/1.1\r\n")
    h.flush()
    bad_client.transport.write(b"upstreams HTTP/1.1\r\nHost: h\r\n\r\n")
    good_client.transport.write(b"Host: h\r\n\r\n")
    h.flush()
    bad, good = bad_client.received, good_client.received
    assert bad.startswith(b"HTTP/1.1 400") and good.startswith(b"HTTP/1.1 200")
    assert [uri for _, uri, _ in upstream_requests(h)] == [b"/v1/models"]


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


TARGETS = [b"/", b"/completion?a=1", b"//", b"69/api", b"I", b"*", b"h:1", b"/a#b", b"/v1/\x7f", b"http://h/p", b""]


@pytest.mark.parametrize("target", TARGETS)
def test_what_goes_upstream_is_decided_by_one_function(target):
    """origin_form is the one rule: check_target keeps a path exactly when origin_form does, and the proxy's
    send refuses with origin_form's own message (the proxy used to keep a copy of the rule)."""
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import Clock
    from twisted.web.test.requesthelper import DummyRequest

    from paddler.balancer.proxy import ProxyConfig, ProxyResource
    from paddler.errors import BadRequest
    from paddler.server.target import origin_form

    try:
        kept: bytes | None = origin_form(target)
        refusal = None
    except TargetRejected as e:
        kept, refusal = None, e.message
    if target.startswith(b"/"):
        try:
            checked: bytes | None = check_target(b"GET", target, [b"h"], b"HTTP/1.1").uri
        except TargetRejected:
            checked = None
        assert checked == kept
    request = DummyRequest([b""])
    request.uri = target
    sent = ensureDeferred(ProxyResource(None, None, Clock(), ProxyConfig())._send(None, request, b""))
    failures: list[Any] = []
    sent.addErrback(failures.append)
    if refusal is not None:
        assert failures and failures[0].check(BadRequest) and failures[0].value.message == refusal
    else:
        assert kept == target
        # past the check: the send goes on and trips over the absent upstream
        assert len(failures) == 1 and failures[0].check(AttributeError)
