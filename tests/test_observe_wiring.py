"""The balancer as built by makeBalancerService serves the state, /metrics and StatsD: the whole
service tree on an in-memory network (L{tests.memory_network}), its listeners on port 0."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from .helpers import BytesProducer
from paddler.config import BalancerConfig, UpstreamSpec
from paddler.observability.statsd import StatsDService
from paddler.observability.stream import ObservabilityService
from paddler.tap import makeBalancerService
from paddler.server.listeners import ListeningService

from .memory_network import MemoryNetwork
from .test_statsd import Receiver


def result(net: MemoryNetwork, d: Deferred[Any]) -> Any:
    """Flush C{net}; the result of C{d}, which must have fired."""
    net.flush()
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, f"{d!r} has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def listening(top: Any, what: str) -> str:
    """The base URL of the listener C{what}, bound when the service started."""
    [service] = [s for s in top if isinstance(s, ListeningService) and s.what == what]
    return f"http://{service.address.host}:{service.address.port}"


def http_client(net: MemoryNetwork) -> HTTPClient:
    return HTTPClient(Agent(net, pool=HTTPConnectionPool(net, persistent=False)), data_to_body_producer=BytesProducer)


def test_the_balancer_wires_state_metrics_and_statsd() -> None:
    """With --statsd and --no-dashboard: /api/v1/state and /metrics answer on the management
    port, /dashboard is a JSON 404, and StatsD gauges reach the UDP listener."""
    net = MemoryNetwork()
    receiver = Receiver()
    receiver_port = net.listenUDP(0, receiver, interface="127.0.0.1").getHost().port
    config = BalancerConfig(
        listen="tcp:0:interface=127.0.0.1",
        management_listen="tcp:0:interface=127.0.0.1",
        upstreams=[UpstreamSpec("http://127.0.0.1:9", "nowhere")],
        statsd=f"udp:127.0.0.1:{receiver_port}",
        statsd_prefix="test",
        statsd_interval=0.05,
        dashboard=False,
        probe_timeout=0.5,
    )
    top = makeBalancerService(config, net)
    assert [s for s in top if isinstance(s, ObservabilityService)]
    assert [s for s in top if isinstance(s, StatsDService)]
    http = http_client(net)
    top.startService()
    try:
        management = listening(top, "paddler management")
        assert management.startswith("http://127.0.0.1:")

        response = result(net, http.get(management + "/api/v1/state"))
        state = json.loads(result(net, response.content()))
        assert response.code == 200
        assert [u["name"] for u in state["upstreams"]] == ["nowhere"]
        assert len(state["history"]["samples"]) == 1

        response = result(net, http.get(management + "/metrics"))
        text = result(net, response.content()).decode()
        assert "paddler_upstreams" in {f.name for f in text_string_to_metric_families(text)}

        response = result(net, http.get(management + "/dashboard"))
        assert response.code == 404
        assert "--no-dashboard" in json.loads(result(net, response.content()))["error"]["message"]

        net.run_for(config.statsd_interval)
        assert len(receiver.lines) >= 8
        assert "test.upstreams_total:1|g" in receiver.lines
        assert "test.upstream.nowhere.healthy:0|g" in receiver.lines
    finally:
        result(net, top.stopService())


def test_the_dashboard_is_served_by_default() -> None:
    """Without --no-dashboard, GET /dashboard on the management port is the HTML page, and
    StatsD is off (no StatsD service)."""
    net = MemoryNetwork()
    config = BalancerConfig(listen="tcp:0:interface=127.0.0.1", management_listen="tcp:0:interface=127.0.0.1")
    top = makeBalancerService(config, net)
    assert not [s for s in top if isinstance(s, StatsDService)]
    http = http_client(net)
    top.startService()
    try:
        management = listening(top, "paddler management")
        response = result(net, http.get(management + "/dashboard"))
        body = result(net, response.content())
        assert response.code == 200 and b"<title>paddler" in body
    finally:
        result(net, top.stopService())


def test_the_balancer_proxies_through_its_listener_in_memory() -> None:
    """The proxy listener makeBalancerService binds serves /health for the configured fleet; the
    probes run on the clock (an upstream nobody listens on: refused, then unreachable); after
    stopping no connection is left open."""
    net = MemoryNetwork()
    config = BalancerConfig(
        listen="tcp:0:interface=127.0.0.1",
        management_listen="tcp:0:interface=127.0.0.1",
        upstreams=[UpstreamSpec("http://127.0.0.1:9", "nowhere")],
    )
    top = makeBalancerService(config, net)
    http = http_client(net)
    top.startService()
    try:
        net.run_for(config.unhealthy_after * config.probe_interval)  # every probe is refused
        proxy = listening(top, "paddler balancer proxy")
        response = result(net, http.get(proxy + "/health"))
        health = json.loads(result(net, response.content()))
        assert response.code == 200 and health["upstreams"] == {"healthy": 0, "total": 1}
        response = result(net, http.get(listening(top, "paddler management") + "/api/v1/state"))
        [upstream] = json.loads(result(net, response.content()))["upstreams"]
        assert upstream["state"] == "unreachable" and upstream["last_error"] == "connection refused"
    finally:
        result(net, top.stopService())
    assert net.open_connections() == [] and net.getDelayedCalls() == []


def test_client_connections_have_an_idle_deadline() -> None:
    """Both listeners close a client connection idle between requests after 120 s (not Twisted's 12 h)."""
    from twisted.internet.testing import MemoryReactorClock

    from paddler.config import BalancerConfig
    from paddler.tap import CLIENT_IDLE_TIMEOUT, makeBalancerService

    service = makeBalancerService(BalancerConfig(), MemoryReactorClock())
    sites = [child.factory for child in service if hasattr(child, "factory")]
    assert len(sites) == 2
    assert all(site.timeOut == CLIENT_IDLE_TIMEOUT == 120.0 for site in sites)
    # bodies are relayed, never parsed as HTML forms (that parse cost ~13 % of proxy CPU)
    assert all(site._parsePOSTFormSubmission is False for site in sites)
