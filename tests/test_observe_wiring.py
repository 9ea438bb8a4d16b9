"""The balancer as built by makeBalancerService serves the state, /metrics and StatsD (real reactor, ports 0)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from paddler.config import BalancerConfig, UpstreamSpec
from paddler.observability.stream import ObservabilityService
from paddler.web.listeners import ListeningService
from paddler.observability.statsd import StatsDService
from paddler.tap import makeBalancerService

from .test_statsd import Receiver

DEADLINE = 10.0


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    protocol = Receiver()
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    protocol.port = port.getHost().port  # type: ignore[attr-defined]
    yield protocol
    pytest_twisted.blockon(port.stopListening())


async def listening(top: Any, what: str) -> str:
    """The base URL of the listener C{what} once it is bound (deadline: 10 s)."""
    [service] = [s for s in top if isinstance(s, ListeningService) and s.what == what]
    for _ in range(int(DEADLINE / 0.01)):
        if service.address is not None:
            return f"http://127.0.0.1:{service.address.port}"
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"{what} did not listen within {DEADLINE} s")


@pytest_twisted.ensureDeferred
async def test_the_balancer_wires_state_metrics_and_statsd(receiver: Receiver) -> None:
    """With --statsd and --no-dashboard: /api/v1/state and /metrics answer on the management
    port, /dashboard is a JSON 404, and StatsD gauges reach the UDP listener."""
    config = BalancerConfig(
        listen="tcp:0:interface=127.0.0.1",
        management_listen="tcp:0:interface=127.0.0.1",
        upstreams=[UpstreamSpec("http://127.0.0.1:9", "nowhere")],
        statsd=f"udp:127.0.0.1:{receiver.port}",
        statsd_prefix="test",
        statsd_interval=0.05,
        dashboard=False,
        probe_timeout=0.5,
    )
    top = makeBalancerService(config, reactor)
    assert [s for s in top if isinstance(s, ObservabilityService)]
    assert [s for s in top if isinstance(s, StatsDService)]
    connections = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=connections))
    top.startService()
    try:
        management = await listening(top, "paddler management")

        response = await http.get(management + "/api/v1/state").addTimeout(DEADLINE, reactor)
        state = json.loads(await treq.content(response))
        assert response.code == 200
        assert [u["name"] for u in state["upstreams"]] == ["nowhere"]
        assert len(state["history"]["samples"]) == 1

        response = await http.get(management + "/metrics").addTimeout(DEADLINE, reactor)
        text = (await treq.content(response)).decode()
        assert "paddler_upstreams" in {f.name for f in text_string_to_metric_families(text)}

        response = await http.get(management + "/dashboard").addTimeout(DEADLINE, reactor)
        assert response.code == 404
        assert "--no-dashboard" in json.loads(await treq.content(response))["error"]["message"]

        await receiver.until(8)
        assert "test.upstreams_total:1|g" in receiver.lines
        assert "test.upstream.nowhere.healthy:0|g" in receiver.lines
    finally:
        await top.stopService()
        await connections.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_the_dashboard_is_served_by_default() -> None:
    """Without --no-dashboard, GET /dashboard on the management port is the HTML page, and
    StatsD is off (no StatsD service)."""
    config = BalancerConfig(listen="tcp:0:interface=127.0.0.1", management_listen="tcp:0:interface=127.0.0.1")
    top = makeBalancerService(config, reactor)
    assert not [s for s in top if isinstance(s, StatsDService)]
    connections = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=connections))
    top.startService()
    try:
        management = await listening(top, "paddler management")
        response = await http.get(management + "/dashboard").addTimeout(DEADLINE, reactor)
        body = await treq.content(response)
        assert response.code == 200 and b"<title>paddler" in body
    finally:
        done: Deferred[Any] = top.stopService()
        await done
        await connections.closeCachedConnections()


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
