"""The management API through StubTreq: every route, every validation error, auth on and off."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from paddler.management.api import ManagementAPI
from paddler.fleet.registry import AgentRegistry
from paddler.fleet.upstream import SlotsSeen, Upstream, UpstreamState, upstream_id

from .helpers import healthy_upstream, make_pool, mark_healthy

BASE = "http://mgmt"
TOKEN = "s3cret-token"


class FakeProbes:
    """probe_now that the test finishes (or that finishes at once)."""

    def __init__(self, hold: bool = False, healthy: bool = True) -> None:
        self.hold = hold
        self.healthy = healthy
        self.probed: list[Upstream] = []
        self.pending: list[Deferred[None]] = []

    def probe_now(self, upstream: Upstream) -> Deferred[None]:
        self.probed.append(upstream)
        d: Deferred[None] = Deferred()
        if self.hold:
            self.pending.append(d)
        else:
            if self.healthy:
                upstream.record(SlotsSeen(4, 0, upstream.probe_mark()), 0.0)
            d.callback(None)
        return d


class Harness:
    def __init__(self, token: str | None = None, probes: Any = None, expiry: float = 3.0) -> None:
        self.clock = Clock()
        self.pool = make_pool(self.clock)
        self.registry = AgentRegistry(self.pool, self.clock, expiry=expiry)
        self.registry.startService()
        self.probes = probes if probes is not None else FakeProbes()
        self.api = ManagementAPI(self.pool, self.registry, self.clock, probes=self.probes, token=token)
        self.http = StubTreq(self.api.app.resource())
        self.token = token
        self.agent_tokens: dict[str, tuple[str, str]] = {}

    def headers(self, auth: bool = True) -> dict[str, str]:
        if auth and self.token:
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    async def register_agent(self, agent_id: str, url: str, name: str) -> tuple[int, Any, Any]:
        """Register C{agent_id} for C{url} (with its previous token, or the management token)."""
        headers = self.headers()
        if not self.token and agent_id in self.agent_tokens:
            headers = {"Authorization": f"Bearer {self.agent_tokens[agent_id][0]}"}
        code, body, response = await self.call(
            "POST", "/api/v1/agents", {"agent_id": agent_id, "url": url, "name": name}, headers=headers
        )
        if code == 201:
            self.agent_tokens[agent_id] = (body["agent_token"], body["url"])
        return code, body, response

    async def report(self, agent_id: str, body: Any) -> tuple[int, Any, Any]:
        """POST a report as the agent would: registered first (again when its URL changes), with its token."""
        url = body.get("url") if isinstance(body, dict) and isinstance(body.get("url"), str) else None
        name = body.get("name") if isinstance(body, dict) and isinstance(body.get("name"), str) else agent_id
        from paddler.fleet.addresses import canonical_url

        try:
            wanted = canonical_url(url) if url else None
        except ValueError:
            wanted = None
        held = self.agent_tokens.get(agent_id)
        if wanted is None and held is None:  # a report with a bad url: registered as the default one
            url, wanted = REPORT["url"], canonical_url(REPORT["url"])
        if wanted is not None and (held is None or held[1] != wanted):
            registered = await self.register_agent(agent_id, url, name or agent_id)
            if registered[0] != 201:
                return registered  # the agent is refused at its registration
            held = self.agent_tokens.get(agent_id)
        headers = {"Authorization": f"Bearer {held[0]}"} if held else {}
        return await self.call("POST", f"/api/v1/agents/{agent_id}/report", body, headers=headers)

    async def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                   auth: bool = True, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        if (method == "POST" and headers is None and raw is None and path.startswith("/api/v1/agents/")
                and path.endswith("/report") and auth):
            return await self.report(path[len("/api/v1/agents/"):-len("/report")], body)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = await self.http.request(method, BASE + path, data=data,
                                           headers=headers if headers is not None else self.headers(auth))
        content = await response.content()
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = content
        return response.code, parsed, response

    def stop(self) -> None:
        self.registry.stopService()


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.stop()
    assert harness.clock.getDelayedCalls() == []


@pytest.fixture
def authed():
    harness = Harness(token=TOKEN)
    yield harness
    harness.stop()


def assert_error(code: int, body: Any, status: int, field: str | None = None, words: str = "") -> None:
    assert code == status, body
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == status and isinstance(error["message"], str) and error["type"]
    assert "Traceback" not in error["message"]
    if field is not None:
        assert error["param"] == field
        assert field.split("_")[0] in error["message"] or field == "body" or field == "authorization"
    assert words in error["message"]


# -- reading ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_counts_upstreams_and_agents(h):
    """GET /health answers {"status":"ok","upstreams":N,"agents":M} as application/json."""
    h.pool.add(healthy_upstream("http://a:1"))
    await h.call("POST", "/api/v1/agents/a1/report",
                 {"name": "gpu-1", "url": "http://10.0.0.5:8080", "slots_idle": 1, "slots_processing": 0})
    code, body, response = await h.call("GET", "/health")
    assert code == 200 and body == {"status": "ok", "upstreams": 2, "agents": 1}
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]


@pytest_twisted.ensureDeferred
async def test_list_upstreams_gives_every_field(h):
    """GET /api/v1/upstreams lists each upstream with every field of Upstream.describe()."""
    up = h.pool.add(healthy_upstream("http://a:1", total=3))
    code, body, _ = await h.call("GET", "/api/v1/upstreams")
    assert code == 200
    [entry] = body["upstreams"]
    expected = up.describe(h.clock.seconds())
    assert {k: entry[k] for k in expected} == expected
    assert entry["removal_pending"] is False


@pytest_twisted.ensureDeferred
async def test_get_one_upstream_by_id_or_name_and_404(h):
    """GET /api/v1/upstreams/{id} finds by id or name; an unknown one is a JSON 404 naming id."""
    up = h.pool.add(healthy_upstream("http://a:1"))
    for key in (up.id, up.name):
        code, body, _ = await h.call("GET", f"/api/v1/upstreams/{key}")
        assert code == 200 and body["id"] == up.id
    code, body, _ = await h.call("GET", "/api/v1/upstreams/nope")
    assert_error(code, body, 404, "id", "nope")


@pytest_twisted.ensureDeferred
async def test_unknown_path_and_wrong_method_are_json(h):
    """Paths the API does not have answer JSON 404, wrong methods JSON 405 (never HTML)."""
    code, body, _ = await h.call("GET", "/api/v1/nothing")
    assert_error(code, body, 404, None, "/api/v1/nothing")
    code, body, _ = await h.call("PUT", "/api/v1/upstreams")
    assert_error(code, body, 405, None, "PUT")


@pytest_twisted.ensureDeferred
async def test_list_agents(h):
    """GET /api/v1/agents lists agents with their upstream and report age."""
    await h.call("POST", "/api/v1/agents/a1/report",
                 {"name": "gpu-1", "url": "http://10.0.0.5:8080", "slots_idle": 1, "slots_processing": 0})
    h.clock.advance(0.5)
    code, body, _ = await h.call("GET", "/api/v1/agents")
    assert code == 200
    [agent] = body["agents"]
    assert agent["agent_id"] == "a1" and agent["upstream_id"] == upstream_id("http://10.0.0.5:8080")
    assert agent["last_report_age"] == 0.5


# -- registering --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_register_probes_before_answering_201(h):
    """POST /api/v1/upstreams adds the upstream, probes it, answers 201 with its probed state."""
    code, body, _ = await h.call("POST", "/api/v1/upstreams",
                                 {"url": "http://10.0.0.7:8080/", "name": "gpu-7", "api_key": "k"})
    assert code == 201
    assert body["url"] == "http://10.0.0.7:8080" and body["name"] == "gpu-7"
    assert body["state"] == "healthy" and body["has_api_key"] is True and body["source"] == "api"
    assert "k" not in json.dumps(body).replace("has_api_key", "")  # the key itself is never shown
    up = h.pool.upstreams[body["id"]]
    assert h.probes.probed == [up] and up.api_key == "k"


@pytest_twisted.ensureDeferred
async def test_registered_upstream_takes_no_traffic_before_its_first_probe():
    """Until the first probe answers, a new upstream is unknown and no request is sent to it."""
    h = Harness(probes=FakeProbes(hold=True))
    pending = h.http.post(BASE + "/api/v1/upstreams", json={"url": "http://n:1", "name": "n"})
    answered = []
    pending.addCallback(answered.append)
    [up] = h.pool.upstreams.values()
    assert up.state is UpstreamState.UNKNOWN and h.pool.eligible(None) == []
    assert answered == []
    mark_healthy(up, 4)
    h.probes.pending[0].callback(None)
    h.http.flush()
    assert answered, "no answer once the probe finished"
    response = answered[0]
    assert response.code == 201 and json.loads(await response.content())["state"] == "healthy"
    h.stop()


@pytest_twisted.ensureDeferred
async def test_register_answers_after_the_wait_bound_if_the_probe_hangs():
    """A probe that does not finish in register_wait does not hold the answer: 201, state unknown."""
    h = Harness(probes=FakeProbes(hold=True))
    pending = h.http.post(BASE + "/api/v1/upstreams", json={"url": "http://n:1", "name": "n"})
    answered = []
    pending.addCallback(answered.append)
    h.clock.advance(h.api.register_wait)
    h.http.flush()
    assert answered, "no answer after register_wait"
    response = answered[0]
    assert response.code == 201
    assert json.loads(await response.content())["state"] == "unknown"
    h.stop()
    assert h.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_register_is_idempotent_on_url(h):
    """Registering the same URL and name again answers 200 with the same upstream, no second probe."""
    first = await h.call("POST", "/api/v1/upstreams", {"url": "http://a:1", "name": "a"})
    again = await h.call("POST", "/api/v1/upstreams", {"url": "http://a:1/", "name": "a"})
    assert first[0] == 201 and again[0] == 200 and again[1]["id"] == first[1]["id"]
    assert len(h.pool.upstreams) == 1 and len(h.probes.probed) == 1


@pytest_twisted.ensureDeferred
async def test_registering_again_with_a_new_api_key_updates_it(h):
    """The latest registration's api_key applies; the name that looks like a URL is no clash."""
    await h.call("POST", "/api/v1/upstreams", {"url": "http://a:1", "name": "a", "api_key": "old"})
    code, body, _ = await h.call("POST", "/api/v1/upstreams", {"url": "http://a:1", "name": "a", "api_key": "new"})
    assert code == 200 and h.pool.find("a").api_key == "new"
    code, _, _ = await h.call("POST", "/api/v1/upstreams", {"url": "http://b:1", "name": "http://c:1"})
    assert code == 201
    code, _, _ = await h.call("POST", "/api/v1/upstreams", {"url": "http://c:1", "name": "c"})
    assert code == 201


@pytest_twisted.ensureDeferred
async def test_registering_again_cancels_a_pending_removal(h):
    """A host deleted while busy and registered again stays and takes traffic again."""
    _, body, _ = await h.call("POST", "/api/v1/upstreams", {"url": "http://a:1", "name": "a"})
    lease = await h.pool.acquire()
    code, _, _ = await h.call("DELETE", f"/api/v1/upstreams/{body['id']}")
    assert code == 202
    code, again, _ = await h.call("POST", "/api/v1/upstreams", {"url": "http://a:1", "name": "a"})
    assert code == 200 and again["draining"] is False and again["removal_pending"] is False
    lease.release()
    assert body["id"] in h.pool.upstreams


@pytest.mark.parametrize(
    ("payload", "status", "field", "words"),
    [
        ({"name": "x"}, 400, "url", "required"),
        ({"url": 5, "name": "x"}, 400, "url", "string"),
        ({"url": "ftp://a:1", "name": "x"}, 400, "url", "http://"),
        ({"url": "http://a:1/v1", "name": "x"}, 400, "url", "path"),
        ({"url": "http://a:99999", "name": "x"}, 400, "url", "port"),
        ({"url": "http://a:1"}, 400, "name", "required"),
        ({"url": "http://a:1", "name": ""}, 400, "name", "empty"),
        ({"url": "http://a:1", "name": "x" * 129}, 400, "name", "128"),
        ({"url": "http://a:1", "name": "a\nb"}, 400, "name", "control"),
        ({"url": "http://a:1", "name": "x", "api_key": 3}, 400, "api_key", "string"),
        ({"url": "http://a:1", "name": "x", "weight": 3}, 400, "weight", "unknown"),
        ({"url": "http://taken:1", "name": "other"}, 409, "url", "already registered"),
        ({"url": "http://b:1", "name": "taken"}, 409, "name", "already used"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_register_validation_leaves_nothing_behind(h, payload, status, field, words):
    """Every bad registration is a 400/409 naming its field, and the pool is left as it was."""
    h.pool.add(Upstream("http://taken:1", "taken", clock=h.clock))
    code, body, _ = await h.call("POST", "/api/v1/upstreams", payload)
    assert_error(code, body, status, field, words)
    assert list(h.pool.upstreams) == [upstream_id("http://taken:1")]
    assert h.probes.probed == []


@pytest.mark.parametrize(
    ("raw", "words"),
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "JSON object"),
     (b"\xff\xfe", "not valid JSON")],
)
@pytest_twisted.ensureDeferred
async def test_bad_json_bodies_are_400(h, raw, words):
    """A body that is not a JSON object is a 400 naming the body."""
    code, body, _ = await h.call("POST", "/api/v1/upstreams", raw=raw)
    assert_error(code, body, 400, "body", words)
    assert h.pool.upstreams == {}


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413(h):
    """A body over 64 KiB is refused with 413 before it is parsed."""
    code, body, _ = await h.call("POST", "/api/v1/upstreams", raw=b" " * (64 * 1024 + 1))
    assert_error(code, body, 413)


@pytest_twisted.ensureDeferred
async def test_register_of_an_agent_url_is_409(h):
    """A URL an agent reports cannot be registered by hand too."""
    await h.call("POST", "/api/v1/agents/a1/report",
                 {"name": "gpu-1", "url": "http://10.0.0.5:8080", "slots_idle": 1, "slots_processing": 0})
    code, body, _ = await h.call("POST", "/api/v1/upstreams", {"url": "http://10.0.0.5:8080", "name": "gpu-1"})
    assert_error(code, body, 409, "url", "agent")


# -- draining and removing ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_of_an_idle_upstream_removes_it_at_once(h):
    """DELETE on an idle upstream answers 200 {"removed": true} and the pool no longer has it."""
    up = h.pool.add(healthy_upstream("http://a:1"))
    code, body, _ = await h.call("DELETE", f"/api/v1/upstreams/{up.id}")
    assert code == 200 and body["removed"] is True and body["upstream"]["id"] == up.id
    assert h.pool.upstreams == {}


@pytest_twisted.ensureDeferred
async def test_delete_of_a_busy_upstream_drains_then_removes(h):
    """DELETE with a request in flight answers 202 draining; the upstream goes when it ends."""
    up = h.pool.add(healthy_upstream("http://a:1"))
    lease = await h.pool.acquire()
    code, body, _ = await h.call("DELETE", f"/api/v1/upstreams/{up.id}")
    assert code == 202 and body["removed"] is False
    assert body["upstream"]["draining"] is True and body["upstream"]["requests_in_flight"] == 1
    assert body["upstream"]["removal_pending"] is True
    lease.release()
    assert h.pool.upstreams == {}


@pytest_twisted.ensureDeferred
async def test_delete_force_removes_a_busy_upstream_at_once(h):
    """DELETE ?force=true removes even with requests in flight."""
    up = h.pool.add(healthy_upstream("http://a:1"))
    lease = await h.pool.acquire()
    code, body, _ = await h.call("DELETE", f"/api/v1/upstreams/{up.id}?force=true")
    assert code == 200 and body["removed"] is True and h.pool.upstreams == {}
    lease.release()


@pytest_twisted.ensureDeferred
async def test_delete_validates_force_and_id(h):
    """?force=maybe is a 400 naming force; an unknown id is a 404 and nothing changes."""
    up = h.pool.add(healthy_upstream("http://a:1"))
    code, body, _ = await h.call("DELETE", f"/api/v1/upstreams/{up.id}?force=maybe")
    assert_error(code, body, 400, "force", "true or false")
    code, body, _ = await h.call("DELETE", "/api/v1/upstreams/nope")
    assert_error(code, body, 404, "id")
    assert not up.draining and up.id in h.pool.upstreams


@pytest_twisted.ensureDeferred
async def test_drain_and_undrain_routes(h):
    """POST .../drain stops new requests; .../undrain resumes them and serves a waiting request."""
    up = h.pool.add(healthy_upstream("http://a:1", total=1))
    code, body, _ = await h.call("POST", f"/api/v1/upstreams/{up.name}/drain")
    assert code == 200 and body["draining"] is True and body["status"] == "draining"
    waiting = []
    h.pool.acquire().addCallback(waiting.append)
    assert waiting == []
    code, body, _ = await h.call("POST", f"/api/v1/upstreams/{up.id}/undrain")
    assert code == 200 and body["draining"] is False
    assert waiting and waiting[0].upstream is up
    waiting[0].release()
    for action in ("drain", "undrain"):
        code, body, _ = await h.call("POST", f"/api/v1/upstreams/nope/{action}")
        assert_error(code, body, 404, "id")


# -- agent reports ------------------------------------------------------------

REPORT = {"name": "gpu-1", "url": "http://10.0.0.5:8080", "slots_idle": 3, "slots_processing": 1,
          "slots_total": 4, "model": "qwen", "error": None, "interval": 1}


@pytest_twisted.ensureDeferred
async def test_agent_report_creates_and_updates_its_upstream(h):
    """A report registers an agent upstream with its slots and model; it answers ids and expiry."""
    code, body, _ = await h.call("POST", "/api/v1/agents/gpu-1.a_b/report", REPORT)
    uid = upstream_id("http://10.0.0.5:8080")
    assert code == 200
    assert body == {"agent_id": "gpu-1.a_b", "upstream_id": uid, "draining": False, "expiry": 3.0}
    up = h.pool.upstreams[uid]
    assert (up.source, up.state, up.slots_idle, up.model) == ("agent", UpstreamState.HEALTHY, 3, "qwen")
    await h.call("POST", "/api/v1/agents/gpu-1.a_b/report", {**REPORT, "slots_idle": 0, "slots_processing": 4})
    assert up.slots_idle == 0


@pytest_twisted.ensureDeferred
async def test_agent_report_with_error_and_no_slots(h):
    """A report of an unreachable llama.cpp needs no slot counts and takes the host out of rotation."""
    code, _, _ = await h.call("POST", "/api/v1/agents/a1/report",
                              {"name": "gpu-1", "url": "http://10.0.0.5:8080", "error": "connection refused"})
    assert code == 200
    [up] = h.pool.upstreams.values()
    assert up.state is UpstreamState.UNREACHABLE and up.last_error == "connection refused"
    code, _, _ = await h.call("POST", "/api/v1/agents/a1/report",
                              {"name": "gpu-1", "url": "http://10.0.0.5:8080", "state": "loading",
                               "error": "Loading model"})
    assert code == 200 and up.state is UpstreamState.LOADING


@pytest_twisted.ensureDeferred
async def test_agent_report_ignores_unknown_fields(h):
    """Newer agents may send more fields; the report is still taken."""
    code, _, _ = await h.call("POST", "/api/v1/agents/a1/report", {**REPORT, "gpu_temp": 71})
    assert code == 200


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"name": None}, "name", "required"),
        ({"url": None}, "url", "required"),
        ({"url": "gopher://x:1"}, "url", "http://"),
        ({"slots_idle": None}, "slots_idle", "required"),
        ({"slots_processing": -1}, "slots_processing", "whole number"),
        ({"slots_idle": 1.5}, "slots_idle", "whole number"),
        ({"slots_idle": True}, "slots_idle", "whole number"),
        ({"slots_total": 9}, "slots_total", "equal"),
        ({"state": "sleeping"}, "state", "one of"),
        ({"state": "healthy", "error": "boom"}, "state", "error"),
        ({"error": 5}, "error", "string"),
        ({"model": ["x"]}, "model", "string"),
        ({"models": "x"}, "models", "list"),
        ({"interval": 0}, "interval", "positive"),
        ({"interval": 1e9}, "interval", "at most 300"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_agent_report_validation(h, change, field, words):
    """Every bad report is a 400 naming its field, and no upstream or agent is created."""
    code, body, _ = await h.call("POST", "/api/v1/agents/a1/report", {**REPORT, **change})
    assert_error(code, body, 400, field, words)
    assert h.pool.upstreams == {} and h.registry.agents == {}


@pytest_twisted.ensureDeferred
async def test_agent_id_in_the_path_is_validated(h):
    """An agent id with characters outside [A-Za-z0-9._-] is a 400 naming agent_id."""
    code, body, _ = await h.call("POST", "/api/v1/agents/bad%20id/report", REPORT)
    assert_error(code, body, 400, "agent_id")


@pytest_twisted.ensureDeferred
async def test_agent_report_conflicts_are_409(h):
    """An agent reporting another upstream's name or a hand-registered URL gets 409."""
    h.pool.add(Upstream("http://static:1", "static-1", clock=h.clock))
    code, body, _ = await h.call("POST", "/api/v1/agents/a1/report", {**REPORT, "name": "static-1"})
    assert_error(code, body, 409, "name")
    code, body, _ = await h.register_agent("a2", "http://static:1", "s")
    assert_error(code, body, 409, "url")
    code, body, _ = await h.call("POST", "/api/v1/agents/a1/report", {**REPORT, "url": "http://static:1"})
    assert_error(code, body, 409, "url")  # its registration is refused
    assert len(h.pool.upstreams) == 1


@pytest_twisted.ensureDeferred
async def test_agent_upstream_expires_without_reports():
    """An agent upstream with no report for agent_expiry seconds leaves the fleet."""
    h = Harness(expiry=2.0)
    await h.call("POST", "/api/v1/agents/a1/report", {**REPORT, "interval": None})
    h.clock.advance(2.5)
    _, body, _ = await h.call("GET", "/health")
    assert body == {"status": "ok", "upstreams": 0, "agents": 0}
    h.stop()


@pytest_twisted.ensureDeferred
async def test_report_tells_the_agent_its_host_is_draining(h):
    """A drained agent host stays drained through reports and the report answer says so."""
    await h.call("POST", "/api/v1/agents/a1/report", REPORT)
    await h.call("POST", f"/api/v1/upstreams/{upstream_id('http://10.0.0.5:8080')}/drain")
    code, body, _ = await h.call("POST", "/api/v1/agents/a1/report", REPORT)
    assert code == 200 and body["draining"] is True


# -- authentication -----------------------------------------------------------

MUTATING = [
    ("POST", "/api/v1/upstreams", {"url": "http://n:1", "name": "n"}),
    ("DELETE", "/api/v1/upstreams/a", None),
    ("POST", "/api/v1/upstreams/a/drain", None),
    ("POST", "/api/v1/upstreams/a/undrain", None),
    ("POST", "/api/v1/agents/a1/report", REPORT),
]


@pytest.mark.parametrize(("method", "path", "body"), MUTATING)
@pytest_twisted.ensureDeferred
async def test_mutating_calls_need_the_token(authed, method, path, body):
    """With a token set: no header is 401 (with WWW-Authenticate), a wrong token 403; nothing changes."""
    a = authed.pool.add(healthy_upstream("http://a:1"))
    a.name = "a"
    before = a.describe(0)
    code, answer, response = await authed.call(method, path, body, auth=False)
    assert_error(code, answer, 401, "authorization")
    realm = b"paddler-agent" if path.endswith("/report") else b"paddler"
    assert response.headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="' + realm + b'"']
    for header in ("Bearer wrong", "Basic czNjcmV0LXRva2Vu", f"Bearer {TOKEN}x"):
        code, answer, _ = await authed.call(method, path, body, headers={"Authorization": header})
        assert code in (401, 403), header
        assert_error(code, answer, code, "authorization")
    assert list(authed.pool.upstreams) == [a.id] and a.describe(0) == before
    assert authed.registry.agents == {}


@pytest.mark.parametrize(("method", "path", "body"), MUTATING)
@pytest_twisted.ensureDeferred
async def test_mutating_calls_with_the_right_token_succeed(authed, method, path, body):
    """The right bearer token is accepted on every mutating route."""
    a = authed.pool.add(healthy_upstream("http://a:1"))
    a.name = "a"
    code, answer, _ = await authed.call(method, path, body)
    assert code in (200, 201, 202), answer


@pytest_twisted.ensureDeferred
async def test_reads_need_no_token(authed):
    """GET routes stay open with a token set (they show no secrets)."""
    for path in ("/health", "/api/v1/upstreams", "/api/v1/agents"):
        code, _, _ = await authed.call("GET", path, auth=False)
        assert code == 200


@pytest_twisted.ensureDeferred
async def test_no_token_means_no_auth(h):
    """Without a configured token, mutating calls need no header."""
    code, _, _ = await h.call("POST", "/api/v1/upstreams", {"url": "http://n:1", "name": "n"}, auth=False)
    assert code == 201


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_an_unexpected_error_is_a_json_500_without_traceback(h):
    """A bug in a handler answers a JSON 500 and logs the failure; no traceback reaches the client."""
    def broken(*args, **kwargs):
        raise RuntimeError("kaboom")

    h.registry.report = broken  # type: ignore[method-assign]
    code, body, _ = await h.call("POST", "/api/v1/agents/a1/report", REPORT)
    assert_error(code, body, 500)
    assert "kaboom" not in json.dumps(body)


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example", "Host": "mgmt"},
        {"Origin": "null", "Host": "mgmt"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://mgmt"},
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_cross_site_browser_request_cannot_change_the_fleet_even_without_a_token(h, headers):
    """A page elsewhere posting through a visitor's browser gets 403; nothing is registered or drained."""
    up = h.pool.add(healthy_upstream("http://10.0.0.1:8080"))
    for method, path, body in (("POST", "/api/v1/upstreams", {"url": "http://10.0.0.9:1", "name": "x"}),
                               ("POST", f"/api/v1/upstreams/{up.id}/drain", None),
                               ("DELETE", f"/api/v1/upstreams/{up.id}", None)):
        status, answer, _ = await h.call(method, path, body, headers=headers)
        assert status == 403 and answer["error"]["param"] == "origin"
    assert list(h.pool.upstreams) == [up.id] and not up.draining


@pytest_twisted.ensureDeferred
async def test_same_origin_and_non_browser_clients_may_change_the_fleet(h):
    """The dashboard (same origin) and agents or curl (no Origin) are not refused."""
    up = h.pool.add(healthy_upstream("http://10.0.0.1:8080"))
    status, _, _ = await h.call("POST", f"/api/v1/upstreams/{up.id}/drain",
                                headers={"Origin": "http://mgmt", "Host": "mgmt", "Sec-Fetch-Site": "same-origin"})
    assert status == 200 and up.draining
    status, _, _ = await h.call("POST", f"/api/v1/upstreams/{up.id}/undrain", headers={})
    assert status == 200 and not up.draining
