"""Edge case: agent ids, management request bodies bounded before they are stored."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.test.requesthelper import DummyChannel

from paddler.config import BalancerConfig
from paddler.management.validation import MAX_BODY
from paddler.tap import makeBalancerService

from .test_management import Harness, assert_error


@pytest_twisted.ensureDeferred
async def test_agent_id_with_a_trailing_newline_is_400():
    """The agent id pattern is anchored at the real end: 'abc\\n' (%0A) is refused, not stored."""
    h = Harness()
    code, body, _ = await h.call(
        "POST", "/api/v1/agents/abc%0A/report",
        {"name": "g", "url": "http://10.0.0.9:1", "slots_idle": 1, "slots_processing": 0},
    )
    assert_error(code, body, 400, "agent_id")
    assert h.registry.agents == {} and h.pool.upstreams == {}
    h.stop()


def _management_site():
    reactor = MemoryReactorClock()
    top = makeBalancerService(
        BalancerConfig(listen="tcp:8086:interface=127.0.0.1", management_listen="tcp:8085:interface=127.0.0.1"),
        reactor,
    )
    top.startService()
    [factory] = [f for port, f, *_ in reactor.tcpServers if port == 8085]
    return reactor, top, factory


def test_management_site_keeps_at_most_max_body_bytes_of_a_request_body():
    """The management port stores no more than MAX_BODY bytes of a body (the API is checked only
    after the whole body is in: an unauthenticated client must not fill the disk)."""
    reactor, top, site = _management_site()
    request = site.requestFactory(DummyChannel(), True)
    request.gotLength(None)  # chunked: no length to refuse up front
    for _ in range(64):
        request.handleContentChunk(b"x" * 65536)  # 4 MiB
    request.content.seek(0, 2)
    assert request.content.tell() <= MAX_BODY
    top.stopService()


def test_management_site_answers_413_to_an_oversized_body():
    """Through the management site as tap wires it, a body over MAX_BODY is a JSON 413."""
    reactor, top, site = _management_site()
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    body = b'{"url": "http://10.0.0.7:8080", "name": "' + b"x" * (MAX_BODY + 10) + b'"}'
    protocol.dataReceived(
        b"POST /api/v1/upstreams HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\n"
        + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 413 "), out[:200]
    assert b'"code": 413' in out
    protocol.connectionLost(None)
    top.stopService()


@pytest_twisted.ensureDeferred
async def test_a_non_ascii_token_sent_utf8_encoded_is_accepted():
    """The agent sends b'Bearer ' + token.encode('utf-8'); the API compares those bytes, so a
    non-ASCII --management-token works (it was decoded as latin-1 and re-encoded as UTF-8)."""
    token = "pässwörd-✓"
    h = Harness(token=token)
    code, body, _ = await h.call(
        "POST", "/api/v1/agents",
        {"agent_id": "a1", "name": "g", "url": "http://10.0.0.9:1"},
        headers={b"Authorization": [b"Bearer " + token.encode("utf-8")]},
    )
    assert code == 201, body
    code, body, _ = await h.call(
        "POST", "/api/v1/agents/a1/report",
        {"name": "g", "url": "http://10.0.0.9:1", "slots_idle": 1, "slots_processing": 0},
        headers={b"Authorization": [b"Bearer " + body["agent_token"].encode("ascii")]},
    )
    assert code == 200, body
    code, body, _ = await h.call("POST", "/api/v1/upstreams/g/drain",
                                 headers={b"Authorization": [b"Bearer wrong"]})
    assert_error(code, body, 403, "authorization")
    h.stop()
