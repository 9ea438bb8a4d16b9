"""The balancer as its own upstream is refused: by address, by its X-Paddler-Instance, by its Via.

Registered as an upstream, the balancer showed the fleet's slots as its own
(phantom slots) and sent requests round in a loop.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from zope.interface import implementer
from twisted.internet.address import IPv4Address
from twisted.logger import capturedLogs
from twisted.web.resource import Resource

from paddler.balancer.proxy import ProxyConfig, ProxyResource
from paddler.config import build_config, url_reaches_endpoint
from paddler.fleet.probe import HTTPProber, ProbeService
from paddler.fleet.registry import AgentRegistry
from paddler.fleet.upstream import Upstream, UpstreamState
from paddler.interfaces import IUpstreamClient
from paddler.management.api import ManagementAPI
from paddler.settings import ConfigError
from paddler.server.instance import INSTANCE_HEADER, THIS_BALANCER, came_through, via_token
from paddler.server.listeners import urls_of

from .fake_llama import FakeLlama
from .helpers import MemoryUpstreams, healthy_upstream, make_pool
from .test_client_limits import Transport, responses

#: every test here runs with each request parser of the proxy port (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("both_parsers")


@implementer(IUpstreamClient)
class RecordingClient:
    """The production upstream client, recording the URI and the headers of every request sent."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.uris: list[bytes] = []
        self.headers: list[list[tuple[bytes, bytes]]] = []

    def send(self, method: bytes, origin: bytes, target: bytes, headers: Any, body: bytes | None = None) -> Any:
        self.uris.append(origin + target)
        self.headers.append(list(headers))
        return self._client.send(method, origin, target, headers, body)

    def close(self) -> Any:
        return self._client.close()


def exchange(site: Any, raw: bytes, flush: Any) -> bytes:
    """Feed C{raw} to a new connection of C{site}; return what it wrote back once C{flush} moved the upstream's bytes."""
    transport = Transport()
    protocol = site.buildProtocol(transport.getPeer())
    transport.protocol = protocol
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    flush()
    written = transport.value()
    transport.close()
    return written

OWN = "0123456789abcdef"
LOOP = "fedcba9876543210"


class AnswersAs(Resource):
    """Every path answers 404 JSON with C{X-Paddler-Instance: instance} (a balancer's proxy port)."""

    isLeaf = True

    def __init__(self, instance: str) -> None:
        super().__init__()
        self.instance = instance.encode()

    def render(self, request: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(INSTANCE_HEADER, self.instance)
        return b'{"error": {"code": 404, "message": "/slots is disabled"}}'


# -- the configuration file ----------------------------------------------------


@pytest.mark.parametrize(
    "url, endpoint, same",
    [
        ("http://127.0.0.1:8086", "tcp:8086:interface=127.0.0.1", True),
        ("http://localhost:8086", "tcp:8086:interface=127.0.0.1", True),
        ("http://127.0.0.1:8086", "tcp:8086", True),
        ("http://[::1]:8086", "tcp6:8086:interface=\\:\\:1", True),
        ("http://10.0.0.5:8086", "tcp:port=8086:interface=10.0.0.5", True),
        ("http://127.0.0.1:8087", "tcp:8086:interface=127.0.0.1", False),
        ("http://10.0.0.6:8086", "tcp:8086:interface=10.0.0.5", False),
        ("http://127.0.0.1:8086", "unix:/tmp/p.sock", False),
        ("http://127.0.0.1:0", "tcp:0:interface=127.0.0.1", False),
    ],
)
def test_an_upstream_url_is_matched_against_a_listen_endpoint(url, endpoint, same):
    assert url_reaches_endpoint(url, endpoint) is same


def test_a_config_file_naming_the_balancers_own_proxy_port_is_refused(tmp_path):
    """[[upstream]] http://localhost:8086 while --listen is tcp:8086:interface=127.0.0.1: one clear error."""
    path = tmp_path / "paddler.toml"
    path.write_text(
        'listen = "tcp:8086:interface=127.0.0.1"\n'
        '[[upstream]]\nurl = "http://127.0.0.1:8080"\nname = "real"\n'
        '[[upstream]]\nurl = "http://localhost:8086"\nname = "me"\n'
    )
    with pytest.raises(ConfigError, match="own --listen address"):
        build_config({}, [], {}, str(path))
    path.write_text('[[upstream]]\nurl = "http://127.0.0.1:8085"\n')  # the default management port
    with pytest.raises(ConfigError, match="own --management-listen address"):
        build_config({}, [], {}, str(path))


def test_the_listen_addresses_give_the_urls_that_reach_them():
    assert urls_of(IPv4Address("TCP", "127.0.0.1", 8086)) >= {
        "http://127.0.0.1:8086", "http://localhost:8086", "http://[::1]:8086", "https://127.0.0.1:8086"
    }
    assert urls_of(IPv4Address("TCP", "10.0.0.5", 80)) == {"http://10.0.0.5:80", "https://10.0.0.5:80"}


# -- the probe -------------------------------------------------------------------


def probe_setup(answer: Resource) -> tuple[Any, Any, MemoryUpstreams, HTTPProber, Upstream]:
    """A prober on the production client; C{answer} serves at http://balancer.example:8086."""
    stub = MemoryUpstreams(connect_timeout=2, max_idle_per_host=1)
    stub.serve(answer, "http://balancer.example:8086")
    clock = stub.clock
    pool = make_pool(clock)
    prober = HTTPProber(stub.client, clock, pool, timeout=2, instance_id=OWN)
    upstream = pool.add(Upstream("http://balancer.example:8086", name="me", clock=clock))
    return clock, pool, stub, prober, upstream


def test_a_probe_answered_with_the_balancers_own_id_marks_the_upstream_and_warns_once():
    clock, pool, stub, prober, upstream = probe_setup(AnswersAs(OWN))
    with capturedLogs() as events:
        for _ in range(3):
            d = prober.probe(upstream)
            stub.flush()
            assert d.called
    assert upstream.state is UpstreamState.UNREACHABLE and upstream.last_error == THIS_BALANCER
    assert sum("is this balancer itself" in e.get("log_format", "") for e in events) == 1
    assert pool.totals()["slots_total"] == 0


def test_another_balancers_id_is_not_mistaken_for_this_one():
    """A paddler in front of another paddler is not refused: only the own id counts."""
    _, _, stub, prober, upstream = probe_setup(AnswersAs("another-instance"))
    prober.probe(upstream)
    stub.flush()
    assert upstream.last_error != THIS_BALANCER


def test_a_llama_server_is_probed_as_before_with_an_instance_id_set():
    _, _, stub, prober, upstream = probe_setup(FakeLlama(slots=2))
    prober.probe(upstream)
    stub.flush()
    assert upstream.state is UpstreamState.HEALTHY and upstream.slots_total == 2


# -- the management API -----------------------------------------------------------


class Management:
    def __init__(self, answer: Resource, own: set[str] = frozenset()) -> None:
        clock, pool, stub, prober, _ = probe_setup(answer)
        pool.remove(next(iter(pool.upstreams)))
        self.clock, self.pool, self.stub = clock, pool, stub
        self.probes = ProbeService(pool, prober, clock)
        self.probes.startService()
        self.registry = AgentRegistry(pool, clock)
        self.registry.startService()
        api = ManagementAPI(pool, self.registry, clock, probes=self.probes, own_urls=lambda: set(own))
        self.http = StubTreq(api.app.resource())

    def stop(self) -> None:
        self.probes.stopService()
        self.registry.stopService()
        self.pool.stop()

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        d = self.http.post("http://mgmt" + path, data=json.dumps(payload).encode())
        self.stub.flush()
        self.http.flush()
        response = await d
        return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_registering_a_url_whose_first_probe_answers_as_this_balancer_is_refused():
    """POST /api/v1/upstreams with a URL the static check cannot know (a DNS name): its first
    probe reads the own instance id, so the answer is 400 and the fleet stays empty."""
    m = Management(AnswersAs(OWN))
    try:
        status, body = await m.post("/api/v1/upstreams", {"url": "http://balancer.example:8086", "name": "me"})
        assert status == 400 and body["error"]["param"] == "url"
        assert "this balancer itself" in body["error"]["message"]
        assert m.pool.upstreams == {}
        status, _ = await m.post("/api/v1/upstreams", {"url": "http://balancer.example:8086", "name": "me"})
        assert status == 400 and m.pool.upstreams == {}  # and again
    finally:
        m.stop()


@pytest_twisted.ensureDeferred
async def test_registering_or_reporting_one_of_the_balancers_own_addresses_is_refused_at_once():
    m = Management(FakeLlama(), own={"http://127.0.0.1:8086", "http://localhost:8086"})
    try:
        status, body = await m.post("/api/v1/upstreams", {"url": "http://localhost:8086", "name": "me"})
        assert status == 400 and "this balancer itself" in body["error"]["message"]
        status, body = await m.post("/api/v1/agents", {"agent_id": "a1", "name": "me", "url": "http://127.0.0.1:8086"})
        assert status == 400 and body["error"]["param"] == "url"
        assert m.pool.upstreams == {} and m.registry.agents == {}
    finally:
        m.stop()


# -- the request loop guard --------------------------------------------------------


def loop_rig() -> tuple[Any, RecordingClient, MemoryUpstreams]:
    from paddler.server.channel import ClientLimits, GuardedSite
    from paddler.server.request import bounded_request_factory

    upstreams = MemoryUpstreams()
    clock = upstreams.clock
    pool = make_pool(clock)
    fake = FakeLlama()
    for port in (371, 372):
        upstreams.serve(fake, f"http://127.0.0.1:{port}")
        pool.add(healthy_upstream(f"http://127.0.0.1:{port}", clock=clock))
    client = RecordingClient(upstreams.client)
    proxy = ProxyResource(pool, client, clock, ProxyConfig())
    site = GuardedSite(
        proxy, ClientLimits(), clock, "proxy",
        request_factory=bounded_request_factory(1024, instance_id=OWN, loop_token=LOOP), instance_id=OWN,
    )
    return site, client, upstreams


def test_forwarded_requests_carry_the_balancers_via_and_answers_its_instance_id():
    site, client, upstreams = loop_rig()
    raw = b"GET /v1/models HTTP/1.1\r\nHost: h\r\nVia: 1.1 corporate-proxy\r\n\r\n"
    answer = exchange(site, raw, upstreams.flush)
    ((status, headers, _),) = responses(answer)
    assert status == 200 and headers[INSTANCE_HEADER] == OWN.encode()
    assert len(client.uris) == 1
    assert [v for n, v in client.headers[0] if n.lower() == b"via"] == [b"1.1 corporate-proxy", via_token(LOOP)]


def test_a_request_that_comes_back_through_its_own_via_is_answered_508_and_not_forwarded():
    site, agent, upstreams = loop_rig()
    raw = b"GET /v1/models HTTP/1.1\r\nHost: h\r\nVia: 1.1 x, " + via_token(LOOP) + b"\r\n\r\n"
    ((status, _, body),) = responses(exchange(site, raw, upstreams.flush))
    assert status == 508 and "balancer itself" in json.loads(body)["error"]["message"]
    assert agent.uris == []


def test_a_client_copying_the_public_instance_id_into_via_gets_no_508():
    """The Via token is not the id every answer shows: a client cannot forge a loop."""
    site, agent, upstreams = loop_rig()
    raw = b"GET /v1/models HTTP/1.1\r\nHost: h\r\nVia: " + via_token(OWN) + b"\r\n\r\n"
    ((status, _, _),) = responses(exchange(site, raw, upstreams.flush))
    assert status == 200 and len(agent.uris) == 1


def test_via_matching_is_exact():
    assert came_through(LOOP, [b"1.1 a, " + via_token(LOOP)])
    assert not came_through(LOOP, [b"1.1 paddler-" + LOOP.encode() + b"0"])
    assert not came_through(LOOP, None)
