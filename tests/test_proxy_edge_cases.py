"""Edge cases of the proxy, probes and listeners found in review: cancellation
while connecting, backpressure and idle timers, 503 bodies, counters, bind errors,
hostile JSON. Everything but the taken port runs in memory (L{tests.proxy_harness})."""
from __future__ import annotations

import json
import socket

import pytest
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.server import Site

from paddler.balancer.proxy import ProxyConfig
from paddler.balancer.relay import Relay
from paddler.fleet.probe import HTTPProber
from paddler.fleet.upstream import Upstream, UpstreamState
from paddler.server.listeners import ListenFailed, ListeningService
from paddler.upstream.client import UpstreamClient

from .helpers import FakeUpstreamBody, make_pool
from .memory_network import MemoryNetwork
from .proxy_harness import make_harness

#: every test here runs with each request parser of the proxy port (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("both_parsers")


# 1 ---------------------------------------------------------------------------
def test_client_leaving_while_the_upstream_connect_is_pending_is_a_quiet_cancel(request):
    """Client gone while the proxy is still connecting: counted as cancelled, nothing logged as an error,
    and the connection attempt is abandoned."""
    h = make_harness(request)
    upstream = h.add_unreachable()  # connects are made and never complete
    d = h.raw_post("/completion")
    d.addErrback(lambda _: None)
    h.flush()
    assert upstream.in_flight == 1 and h.net.pending
    d.cancel()
    h.flush()
    assert h.proxy.stats.by_status == {"cancelled": 1}
    assert upstream.in_flight == 0 and h.net.pending == []


# 2 ---------------------------------------------------------------------------
def test_data_arriving_while_paused_does_not_rearm_the_idle_timer():
    """The HTTP client parser keeps delivering chunks of an already-read segment after
    pauseProducing; a client slower than --idle-timeout must not get its stream cut."""

    class Request:
        producer = None
        channel = object()
        def registerProducer(self, producer, streaming): self.producer = producer
        def unregisterProducer(self): self.producer = None
        def write(self, data): pass

    clock = Clock()
    relay = Relay(Request(), clock, idle_timeout=10)
    body = FakeUpstreamBody()
    relay.start(body)
    relay.body_data(b"data: 1\n\n")  # this write fills the client's buffer...
    relay.pauseProducing()            # ...so the channel pauses us, synchronously
    relay.body_data(b"data: 2\n\n")  # rest of the same upstream read still arrives
    clock.advance(100)                # the client stays slow; upstream is not at fault
    try:
        assert not relay.done.called and not body.stopped
    finally:
        relay.done.addErrback(lambda _: None)


# 3 ---------------------------------------------------------------------------
class Refusing(Resource):
    """Answers 503; C{stall}: headers + 1 byte of a 100-byte body, then silence."""
    isLeaf = True

    def __init__(self, stall: bool = False, size: int = 100) -> None:
        super().__init__()
        self.stall, self.size, self.held = stall, size, []

    def render(self, request):
        request.setResponseCode(503)
        if self.stall:
            request.setHeader(b"content-length", b"100")
            request.write(b"{")
            self.held.append(request)
            return server.NOT_DONE_YET
        return json.dumps({"error": {"message": "x" * self.size}}).encode()


def test_a_503_whose_body_stalls_is_bounded_by_a_deadline(request):
    """A 503 whose body never ends must not hold the client and the slot forever."""
    h = make_harness(request, config=ProxyConfig(upstream_timeout=5, idle_timeout=5))
    refusing = Refusing(stall=True)
    up = h.add_resource(refusing, "stalls")
    result = []
    h.post("/completion", {"prompt": "hi"}).addBoth(result.append)
    h.flush()
    assert refusing.held
    h.run(1000)
    try:
        assert result, "client still waiting after 1000 s"
        assert up.in_flight == 0
    finally:
        for r in refusing.held:
            r.transport.abortConnection()
        h.flush()


def test_a_503_with_a_large_body_is_an_upstream_error_not_a_500(request):
    """A >64 KiB 503 body (an HTML page from a sidecar) must not become 'internal error in the balancer'."""
    h = make_harness(request)
    h.add_resource(Refusing(size=100_000), "big503")
    response = h.result(h.post("/completion", {"prompt": "hi"}))
    h.content(response)
    assert response.code != 500


# 4 ---------------------------------------------------------------------------
def test_an_idle_timeout_counts_one_failed_request_not_two(request):
    h = make_harness(request, config=ProxyConfig(idle_timeout=10))
    fake, upstream = h.add_fake(hold=True)
    held, response, chunks = h.open_stream(fake)
    chunks.done.addErrback(lambda _: None)
    h.run(10)
    assert held.gone
    assert upstream.in_flight == 0
    assert h.proxy.stats.requests_total == 1
    assert upstream.requests_failed == 1


# 5 ---------------------------------------------------------------------------
def test_deeply_nested_json_is_a_400_json_error(request):
    h = make_harness(request)
    h.add_fake()
    response = h.result(h.post("/completion", b"[" * 100_000))
    assert response.code == 400
    assert h.json(response)["error"]["type"] == "invalid_request_error"


# 6 ---------------------------------------------------------------------------
def test_a_listener_whose_port_is_taken_fails_startup():
    """Port in use: privilegedStartService must raise (twistd exits) instead of logging and running portless."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        svc = ListeningService(reactor, f"tcp:{port}:interface=127.0.0.1", Site(Resource()), "proxy")
        with pytest.raises(ListenFailed, match=f"proxy cannot listen on tcp:{port}:interface=127.0.0.1: .*in use"):
            svc.privilegedStartService()
    finally:
        taken.close()


# 7 ---------------------------------------------------------------------------
class Silent(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held = []

    def render(self, request):
        self.held.append(request)
        return server.NOT_DONE_YET


def test_a_probe_that_times_out_says_so():
    """The production client: a cancelled request fails with ResponseNeverReceived([CancelledError]), which addTimeout does not convert."""
    net = MemoryNetwork()
    silent = Silent()
    net.listenTCP(8080, Site(silent, reactor=net), interface="10.0.0.1")
    pool = make_pool(net)
    client = UpstreamClient(net, connect_timeout=2, max_idle_per_host=1)  # as paddler.tap builds the probes' client
    prober = HTTPProber(client, net, pool, timeout=2, unhealthy_after=1)
    upstream = pool.add(Upstream("http://10.0.0.1:8080", clock=net))
    d = prober.probe(upstream)
    net.flush()
    assert silent.held and not d.called
    net.run_for(2)
    assert d.called
    assert upstream.state is UpstreamState.UNREACHABLE
    assert upstream.last_error == "no answer within 2 s"
    pool.stop()


# 8 ---------------------------------------------------------------------------
def test_every_upstream_loading_answers_503_not_502(request):
    h = make_harness(request)
    loading, _ = h.add_fake("loading", slots=8)
    loading.answer_status = 503
    response = h.result(h.post("/completion", {"prompt": "hi"}))
    h.content(response)
    assert response.code == 503


def test_idle_timeout_before_any_body_byte_answers_504_json(request):
    """Upstream sent 200 headers then nothing: nothing reached the client yet, so it gets a clean JSON 504."""
    h = make_harness(request, config=ProxyConfig(idle_timeout=10))
    fake, upstream = h.add_fake(hold=True)
    response_d = h.post("/completion", {"prompt": "hi", "stream": True})
    held = h.held(fake)
    held.start_stream()
    h.flush()
    assert upstream.in_flight == 1
    h.run(9.9)
    h.pending(response_d)
    h.run(0.1)
    response = h.result(response_d)
    assert response.code == 504
    error = h.json(response)["error"]
    assert error["type"] == "timeout_error" and "before the body began" in error["message"]
    assert upstream.in_flight == 0
    assert upstream.requests_failed == 1
