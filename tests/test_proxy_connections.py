"""The proxy at the connection level, in memory: backpressure from a slow client, resets,
connect timeouts, HTTP/1.0 clients, keep-alive on both sides and its deadlines."""

from __future__ import annotations

import json

from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from paddler.balancer.proxy import ProxyConfig
from .helpers import BytesProducer
from paddler.fleet.upstream import UpstreamState
from paddler.tap import CLIENT_IDLE_TIMEOUT
from paddler.upstream.clients import CACHED_CONNECTION_TIMEOUT

from .proxy_harness import Chunks, Harness, make_harness
import pytest

#: every test here runs with each request parser of the proxy port (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("both_parsers")

EVENT = b"data: " + b"x" * 1000 + b"\n\n"


def client_connection(h: Harness, index: int = -1):  # type: ignore[no-untyped-def]
    """The client's connection to the proxy (the last one opened, by default)."""
    return h.client_connections_to_proxy()[index]


def test_a_client_that_stops_reading_pauses_its_upstream_and_is_not_cut_for_it(request):
    """The proxy keeps at most about one buffer of a slow client's stream: the rest waits on the
    upstream's side, and the upstream's unread bytes do not count as its silence. Once the client
    reads again everything arrives, in order."""
    h = make_harness(request, buffer_size=4096, config=ProxyConfig(idle_timeout=10))
    fake, upstream = h.add_fake(hold=True)
    held, _, chunks = h.open_stream(fake)
    [to_upstream] = h.connections_to(upstream)
    slow = client_connection(h)
    slow.client.hold()
    for _ in range(5):
        for _ in range(8):  # eight events in one read: the proxy is paused in the middle of it
            held.send(EVENT)
        h.flush()
    assert slow.server.unread_size < 4096 + 9 * len(EVENT)  # what the proxy holds for the client
    assert to_upstream.server.unread_size > 30 * len(EVENT)  # what the upstream could not send yet
    h.run(100)  # ten idle timeouts while the client does not read
    assert not chunks.done.called and upstream.in_flight == 1
    slow.client.release()
    held.finish(b"data: [DONE]\n\n")
    body = h.result(chunks.done)
    assert body == b"data: {}\n\n" + EVENT * 40 + b"data: [DONE]\n\n"
    assert upstream.in_flight == 0 and h.proxy.stats.by_status == {"2xx": 1}


def test_one_slow_client_does_not_hold_back_another(request):
    """Two streams on two upstreams: the first client stops reading, the second's events keep arriving."""
    h = make_harness(request, buffer_size=4096)
    streams = [h.open_stream(h.add_fake(f"u{i}", slots=1, hold=True)[0]) for i in range(2)]
    client_connection(h, 0).client.hold()
    for _ in range(20):
        for held, _, _ in streams:
            held.send(EVENT)
        h.flush()
    (_, _, slow), (_, _, fast) = streams
    assert len(fast.body) == len(b"data: {}\n\n") + 20 * len(EVENT)
    assert len(slow.body) < len(fast.body) // 2


def test_an_upstream_reset_mid_stream_cuts_the_client_and_frees_the_slot(request):
    """Bytes already reached the client, so nothing is retried: the client's stream ends
    with an error, the request counts as a 502, the slot is free."""
    h = make_harness(request)
    fake, upstream = h.add_fake("a", slots=8, hold=True)
    other, _ = h.add_fake("b", slots=2)
    held, _, chunks = h.open_stream(fake)
    held.send(b"data: 2\n\n")
    h.flush()
    held.reset()
    failure = h.failure(chunks.done)
    assert chunks.body == b"data: {}\n\ndata: 2\n\n"
    assert failure.check(Exception)
    assert upstream.in_flight == 0 and upstream.slots_idle == 8
    assert h.proxy.stats.by_status == {"5xx": 1}
    assert other.seen == []


def test_an_upstream_reset_before_the_first_body_byte_is_a_502_not_a_second_run_elsewhere(request):
    """The response head came but no body byte: the client has seen nothing, yet the upstream had the
    request and may be running it, so it is not sent to another upstream: a 502, the failure counted."""
    h = make_harness(request)
    fake, first = h.add_fake("a", slots=8, hold=True)
    other, _ = h.add_fake("b", slots=2)
    response_d = h.post("/completion", {"prompt": "hi", "stream": True})
    held = h.held(fake)
    held.start_stream()
    h.flush()
    held.reset()
    response = h.result(response_d)
    assert response.code == 502 and "not tried elsewhere" in h.json(response)["error"]["message"]
    assert first.requests_failed == 1 and first.state is UpstreamState.UNREACHABLE
    assert first.in_flight == 0 and [seen for seen in other.seen if seen[1] == b"/completion"] == []


def test_an_upstream_that_never_accepts_the_connection_times_out_and_another_answers(request):
    """Connecting has its own deadline (min(10 s, --upstream-timeout)) on the clock; then the next upstream is tried."""
    h = make_harness(request)
    blackhole = h.add_unreachable(slots=8)
    h.add_fake("live", slots=2)
    response_d = h.post("/completion", {"prompt": "hi"})
    h.run(9.9)
    h.pending(response_d)
    assert blackhole.in_flight == 1
    h.run(0.1)
    response = h.result(response_d)
    assert response.code == 200 and h.json(response)["upstream"] == "live"
    assert blackhole.state is UpstreamState.UNREACHABLE and blackhole.in_flight == 0


def test_an_http10_client_gets_its_stream_raw_and_the_connection_closed_at_the_end(request):
    """No chunked encoding for HTTP/1.0: events are relayed as they come and the end of the body is the close."""
    h = make_harness(request)
    fake, upstream = h.add_fake(hold=True)
    body = json.dumps({"prompt": "hi", "stream": True}).encode()
    client = h.raw(b"POST /completion HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    held = h.held(fake)
    held.start_stream()
    held.send(b"data: 1\n\n")
    h.flush()
    assert client.received.startswith(b"HTTP/1.0 200 ")
    assert client.received.endswith(b"\r\n\r\ndata: 1\n\n") and not client.closed
    held.finish(b"data: 2\n\n")
    h.flush()
    assert client.closed
    head, _, rest = client.received.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and rest == b"data: 1\n\ndata: 2\n\n"
    assert upstream.in_flight == 0


def test_an_http10_request_is_answered_and_its_connection_closed(request):
    h = make_harness(request)
    h.add_fake()
    client = h.raw(b"GET /health HTTP/1.0\r\n\r\n")
    assert client.received.startswith(b"HTTP/1.0 200 ") and client.closed
    assert json.loads(client.received.partition(b"\r\n\r\n")[2])["status"] == "ok"


def test_keep_alive_connections_are_reused_on_both_sides_and_closed_when_idle(request):
    """Two requests from one keep-alive client use one client connection and one upstream
    connection; the proxy closes its idle upstream connection after 4 s and the idle client
    connection after 120 s, both on the clock."""
    h = make_harness(request)
    fake, upstream = h.add_fake()
    connections = HTTPConnectionPool(h.net, persistent=True)
    request.addfinalizer(lambda: connections.closeCachedConnections())
    client = HTTPClient(Agent(h.net, pool=connections), data_to_body_producer=BytesProducer)
    for prompt in ("a", "b"):
        response = h.result(client.post(h.url + "/completion", data=json.dumps({"prompt": prompt}).encode()))
        assert h.json(response)["upstream"] == "fake"
    [to_proxy] = h.client_connections_to_proxy()
    [to_upstream] = h.connections_to(upstream)
    assert [body for _, _, _, body in fake.seen] == [b'{"prompt": "a"}', b'{"prompt": "b"}']
    h.run(CACHED_CONNECTION_TIMEOUT - 0.1)
    assert not to_upstream.closed
    h.run(0.1)
    assert to_upstream.closed and not to_proxy.closed
    h.run(CLIENT_IDLE_TIMEOUT - CACHED_CONNECTION_TIMEOUT - 0.1)
    assert not to_proxy.closed
    h.run(0.1)
    assert to_proxy.closed


def test_a_client_connection_is_not_closed_as_idle_while_its_request_runs(request):
    """The idle deadline between requests does not cut a stream that runs longer than it."""
    h = make_harness(request, config=ProxyConfig(idle_timeout=3600))
    fake, _ = h.add_fake(hold=True)
    held, _, chunks = h.open_stream(fake)
    h.run(CLIENT_IDLE_TIMEOUT * 3)
    assert not client_connection(h).closed
    held.finish(b"data: [DONE]\n\n")
    assert h.result(chunks.done).endswith(b"data: [DONE]\n\n")


def test_chunks_is_a_protocol_collecting_a_body():
    """The harness's body collector (used above) fires with the whole body, or fails with the reason."""
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseDone

    whole, broken = Chunks(), Chunks()
    for chunks in (whole, broken):
        chunks.dataReceived(b"a")
        chunks.dataReceived(b"b")
    whole.connectionLost(Failure(ResponseDone()))
    broken.connectionLost(Failure(ValueError("cut")))
    assert whole.done.result == b"ab"
    assert broken.done.result.check(ValueError)
    broken.done.addErrback(lambda _: None)
