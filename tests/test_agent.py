"""AgentService with a Clock: reports, backoff, one log per state change, drain on stop, status."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import provider

from paddler.agent.service import AgentConfig, AgentService, AgentStatusApp
from paddler.management.api import ManagementAPI
from paddler.fleet.registry import AgentRegistry
from paddler.fleet.upstream import UpstreamState, upstream_id

from .fake_llama import FakeLlama
from .helpers import make_pool

EXTERNAL = "http://10.0.0.5:8080"


class Network:
    """An HTTP client for two hosts, "llama" and "balancer", each up, down or hanging."""

    def __init__(self, llama: Any, balancer: Any) -> None:
        self.stubs = {"llama": StubTreq(llama), "balancer": StubTreq(balancer)}
        self.down: set[str] = set()
        self.hanging: set[str] = set()
        self.requests: list[tuple[str, str, str]] = []

    def _host(self, url: str) -> str:
        return urlsplit(url).hostname or ""

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        host = self._host(url)
        self.requests.append((host, method, urlsplit(url).path))
        if host in self.down:
            return fail(ConnectionRefusedError("down"))
        if host in self.hanging:
            return Deferred()
        return self.stubs[host].request(method, url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return self.request("GET", url, **kwargs)


class World:
    def __init__(self, token: str | None = None, agent_token: str | None = None, **config: Any) -> None:
        self.clock = Clock()
        self.pool = make_pool(self.clock)
        self.registry = AgentRegistry(self.pool, self.clock, expiry=3.0)
        self.registry.startService()
        self.api = ManagementAPI(self.pool, self.registry, self.clock, token=token)
        self.llama = FakeLlama(slots=4, model="m.gguf")
        self.net = Network(self.llama, self.api.app.resource())
        self.config = AgentConfig(
            llamacpp="http://llama:8080", external_url=EXTERNAL, balancer="http://balancer:8085",
            name="gpu-1", management_token=agent_token, **config,
        )
        self.agent = AgentService(self.config, self.net, self.clock)

    @property
    def upstream(self):
        return self.pool.upstreams.get(upstream_id(EXTERNAL))

    def balancer_calls(self) -> list[tuple[str, str, str]]:
        return [r for r in self.net.requests if r[0] == "balancer"]


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    if w.agent.running:
        w.agent.stopService()
    w.registry.stopService()
    assert w.clock.getDelayedCalls() == []


@pytest.fixture
def logs() -> Iterator[list[str]]:
    lines: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        if event.get("log_namespace", "").startswith("paddler.agent.service"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def test_agent_id_and_upstream_id_derive_from_the_external_url(world):
    """The upstream id is paddler.upstream.upstream_id of the normalised external URL."""
    assert world.agent.upstream_id == upstream_id("http://10.0.0.5:8080") == world.agent.agent_id


def test_first_report_makes_the_host_appear_with_its_slots(world):
    """On start the agent reads /slots and reports: the balancer has a healthy agent upstream."""
    world.llama.busy = 1
    world.agent.startService()
    up = world.upstream
    assert up is not None and up.source == "agent" and up.name == "gpu-1"
    assert up.state is UpstreamState.HEALTHY
    assert (up.slots_total, up.slots_processing, up.model) == (4, 1, "m.gguf")
    assert world.agent.balancer_state == "reporting"


def test_reports_every_interval_and_keep_the_host_alive(world):
    """Reports every interval keep the host from expiring."""
    world.agent.startService()
    for _ in range(10):
        world.clock.advance(1)
    assert world.upstream is not None
    assert sum(1 for _, m, p in world.balancer_calls() if p.endswith("/report")) == 11


def test_llamacpp_down_is_reported_as_unreachable_then_recovers(world, logs):
    """A dead local llama.cpp is reported as unreachable with its error; recovery is logged once."""
    world.net.down.add("llama")
    world.agent.startService()
    up = world.upstream
    assert up.state is UpstreamState.UNREACHABLE and up.last_error == "connection refused"
    world.clock.advance(1)
    world.net.down.clear()
    world.clock.advance(1)
    assert up.state is UpstreamState.HEALTHY
    assert [line for line in logs if "llama.cpp" in line] == [
        "agent {}: llama.cpp at http://llama:8080 is unreachable: connection refused".format(world.agent.agent_id),
        "agent {}: llama.cpp at http://llama:8080 is healthy".format(world.agent.agent_id),
    ]


def test_loading_llamacpp_is_reported_as_loading(world):
    """503 Loading model is reported as state loading."""
    world.llama.slots_status = 503
    world.agent.startService()
    assert world.upstream.state is UpstreamState.LOADING


def test_slots_disabled_falls_back_like_the_probes(world):
    """A llama.cpp without /slots is read through /props and /metrics, remembered for next time."""
    world.llama.slots_status = 501
    world.llama.busy = 2
    world.agent.startService()
    assert (world.upstream.slots_total, world.upstream.slots_processing) == (4, 2)
    world.clock.advance(1)
    llama_paths = [p for h, _, p in world.net.requests if h == "llama"]
    assert llama_paths.count("/slots") == 1


def test_hanging_llamacpp_hits_the_deadline(world):
    """A local server that never answers is reported unreachable after the request deadline."""
    world.net.hanging.add("llama")
    world.agent.startService()
    assert world.upstream is None
    world.clock.advance(world.config.timeout)
    assert world.upstream.state is UpstreamState.UNREACHABLE
    assert "no answer within 2 s" in world.upstream.last_error


def test_unreachable_balancer_backs_off_exponentially_capped_and_logs_once(logs):
    """Balancer down: retries at 1, 2, 4, 8, 8... s (cap 8), one log line down and one on recovery."""
    w = World(max_backoff=8.0)
    w.net.down.add("balancer")
    w.agent.startService()
    attempts = [0.0]
    for _ in range(40):
        before = len(w.balancer_calls())
        w.clock.advance(1)
        if len(w.balancer_calls()) > before:
            attempts.append(w.clock.seconds())
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[:5] == [1, 2, 4, 8, 8]
    assert w.agent.balancer_state == "unreachable"
    w.net.down.clear()
    w.clock.advance(8)
    assert w.agent.balancer_state == "reporting" and w.upstream is not None
    w.clock.advance(1)
    assert w.agent.failures == 0
    state_lines = [line for line in logs if "balancer http://balancer:8085" in line]
    assert len(state_lines) == 2, state_lines  # down from the start, then back: two lines
    assert "unreachable" in state_lines[0] and "reporting again" in state_lines[1]
    w.net.down.add("balancer")
    w.agent.stopService()  # the drain cannot reach the balancer: logged, stop still ends
    w.registry.stopService()
    assert w.clock.getDelayedCalls() == []


def test_hanging_balancer_hits_the_deadline_and_never_overlaps():
    """A balancer that never answers: the report fails at its deadline; reports never run twice at once."""
    w = World()
    w.net.hanging.add("balancer")
    w.agent.startService()
    w.clock.advance(0.5)
    assert len(w.balancer_calls()) == 1
    w.clock.advance(1.5)
    assert w.agent.balancer_state == "unreachable"
    assert len(w.balancer_calls()) == 1
    w.agent.stopService()
    w.clock.advance(w.config.drain_timeout + 10)
    w.registry.stopService()
    assert w.clock.getDelayedCalls() == []


def test_rejected_report_is_its_own_state():
    """A balancer answering 401 (no token) puts the agent in 'rejected', with backoff."""
    w = World(token="t")
    w.agent.startService()
    assert w.agent.balancer_state == "rejected" and "401" in w.agent.balancer_error
    assert w.upstream is None
    w.agent.stopService()
    w.registry.stopService()


def test_agent_sends_the_management_token():
    """With --management-token the agent's reports are accepted by a protected balancer."""
    w = World(token="t", agent_token="t")
    w.agent.startService()
    assert w.agent.balancer_state == "reporting" and w.upstream is not None
    w.agent.stopService()
    w.registry.stopService()


def test_stop_drains_waits_for_in_flight_then_removes(world, logs):
    """stopService drains the host, waits while a request runs, then deletes it; then it returns."""
    world.agent.startService()
    lease = []
    world.pool.acquire().addCallback(lease.append)
    up = world.upstream
    assert up.in_flight == 1
    stopped = []
    world.agent.stopService().addBoth(stopped.append)
    assert up.draining and stopped == []
    world.clock.advance(1)
    assert stopped == [] and up.id in world.pool.upstreams
    lease[0].release()
    world.clock.advance(world.config.drain_poll)
    assert stopped == [None]
    assert up.id not in world.pool.upstreams
    assert any("drained and removed" in line for line in logs)
    assert [p for _, m, p in world.balancer_calls() if m == "DELETE"] == [f"/api/v1/upstreams/{up.id}"]


def test_stop_with_nothing_in_flight_is_immediate(world):
    """With no request running, stop drains and removes the host at once."""
    world.agent.startService()
    stopped = []
    world.agent.stopService().addBoth(stopped.append)
    assert stopped == [None] and world.upstream is None


def test_stop_gives_up_after_drain_timeout(logs):
    """A request that never ends does not hold the agent forever: it stops after drain_timeout."""
    w = World(drain_timeout=5.0)
    w.agent.startService()
    lease = []
    w.pool.acquire().addCallback(lease.append)
    stopped = []
    w.agent.stopService().addBoth(stopped.append)
    w.clock.advance(4.9)
    assert stopped == []
    for _ in range(5):
        w.clock.advance(0.25)
    assert stopped == [None]
    assert any("still in flight" in line for line in logs)
    assert w.pool.removal_pending(w.upstream.id)  # removed by the balancer when it ends
    lease[0].release()
    assert w.upstream is None
    w.registry.stopService()
    assert w.clock.getDelayedCalls() == []


def test_stop_before_any_report_is_quiet(world):
    """An agent stopped before it registered (404 on drain) just stops."""
    world.net.down.add("llama")
    world.agent.startService()
    world.pool.remove(world.upstream.id)
    stopped = []
    world.agent.stopService().addBoth(stopped.append)
    assert stopped == [None]


def test_status_app_reports_llamacpp_and_balancer(world):
    """GET /health on --status-listen shows both sides and the last report age."""
    world.agent.startService()
    world.clock.advance(0.5)
    http = StubTreq(AgentStatusApp(world.agent).app.resource())
    responses = []
    http.get("http://agent/health").addCallback(responses.append)
    [response] = responses
    bodies = []
    response.content().addCallback(bodies.append)
    status = json.loads(bodies[0])
    assert response.code == 200 and status["status"] == "ok"
    assert status["llamacpp"]["state"] == "healthy" and status["llamacpp"]["slots_total"] == 4
    assert status["balancer"]["state"] == "reporting" and status["balancer"]["last_report_age"] == 0.5


def test_the_agent_registers_once_then_reports_with_its_own_token():
    """One registration (with the management token), then every report carries the agent's token."""
    w = World(token="t", agent_token="t")
    seen: list[tuple[str, bytes]] = []
    original = w.net.request

    def recording(method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        header = (kwargs.get("headers") or {}).get(b"authorization", [b""])[0]
        seen.append((urlsplit(url).path, header))
        return original(method, url, **kwargs)

    w.net.request = recording  # type: ignore[method-assign]
    w.agent.startService()
    w.clock.advance(1)
    w.clock.advance(1)
    balancer = [(path, header) for path, header in seen if path.startswith("/api/v1/agents")]
    assert [path for path, _ in balancer] == ["/api/v1/agents"] + [f"/api/v1/agents/{w.agent.agent_id}/report"] * 3
    assert balancer[0][1] == b"Bearer t"
    assert all(header == b"Bearer " + w.agent.agent_token.encode() for _, header in balancer[1:])
    assert w.registry.credentials[w.agent.agent_id].url == EXTERNAL
    w.agent.stopService()
    w.registry.stopService()


def test_a_balancer_that_forgot_the_agent_answers_401_and_the_agent_registers_again(world):
    """The balancer restarted (its registrations are gone): the next report is 401, the agent
    registers again at once and the report goes through in the same tick."""
    world.agent.startService()
    first = world.agent.agent_token
    world.registry.credentials.clear()  # what a restart forgets
    world.clock.advance(1)
    assert world.agent.balancer_state == "reporting" and world.agent.failures == 0
    assert world.agent.agent_token != first and world.agent.agent_token is not None
    assert world.registry.authenticate(world.agent.agent_id, world.agent.agent_token.encode()) is not None


def test_a_restarted_agent_waits_until_its_old_registration_expired():
    """Without a management token, a new agent process for a live id gets 409 and retries with
    backoff; once the old registration expired it registers and reports."""
    w = World()
    w.agent.startService()
    w.agent.stopService()  # the drain removes the host: a clean stop frees the id at once
    again = AgentService(w.config, w.net, w.clock)
    again.startService()
    assert again.balancer_state == "reporting"
    again._loop.stop()  # a crash: no drain, the registration stays alive
    third = AgentService(w.config, w.net, w.clock)
    third.startService()
    assert third.balancer_state == "rejected" and "409" in third.balancer_error
    for _ in range(20):
        w.clock.advance(1)
    assert third.balancer_state == "reporting" and w.upstream is not None
    third.stopService()
    w.clock.advance(5)
    w.registry.stopService()
