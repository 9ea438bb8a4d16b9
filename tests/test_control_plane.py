"""The issue's table, re-run: two agents, two llama.cpp servers, one management API, attackers.

Each test is one row: forged and missing agent tokens, another agent's id, a lying agent, the
balancer's own port under other spellings, cloud metadata addresses, a fleet with nothing healthy.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from paddler.errors import BufferTimeout, NoHealthyUpstream
from paddler.fleet.addresses import AddressVetter, literal_address
from paddler.fleet.probe import HTTPProber
from paddler.fleet.registry import AgentRegistry
from paddler.fleet.upstream import FailureSeen, LoadingSeen, SlotsSeen, Upstream, upstream_id
from paddler.management.api import ManagementAPI

from .fake_llama import FakeLlama
from .helpers import MemoryUpstreams, make_pool

BASE = "http://mgmt"
PROXY_PORT, MANAGEMENT_PORT = 8086, 8085
GPU = {"gpu-1": "http://10.0.0.1:8080", "gpu-2": "http://10.0.0.2:8080"}
NAMES = {
    "gpu-1.internal": ["10.0.0.1"],
    "me.example": ["127.0.0.1"],
    "me6.example": ["::ffff:127.0.0.1"],
    "metadata.google.internal": ["169.254.169.254"],
    "mixed.example": ["10.0.0.7", "169.254.169.254"],
}


def resolve(host: str) -> Deferred[list[str]]:
    if host in NAMES:
        return succeed(list(NAMES[host]))
    if host == "slow.example":
        return Deferred()
    return fail(OSError(f"{host}: name or service not known"))


class ControlPlane:
    """Two llama.cpp servers, the registry checking reports against them, the management API."""

    def __init__(self, token: str | None = None, allowed: tuple[str, ...] = ()) -> None:
        self.upstreams = MemoryUpstreams(connect_timeout=2, max_idle_per_host=1)
        self.clock = self.upstreams.clock  # the in-memory network is the clock too
        self.pool = make_pool(self.clock)
        self.servers = {GPU["gpu-1"]: FakeLlama("gpu-1", slots=4), GPU["gpu-2"]: FakeLlama("gpu-2", slots=4)}
        for url, server in self.servers.items():
            self.upstreams.serve(server, url)
        self.prober = HTTPProber(self.upstreams.client, self.clock, self.pool, timeout=2)
        self.registry = AgentRegistry(self.pool, self.clock, expiry=3.0, reader=self.prober.read, check_every=0.0)
        self.registry.startService()
        own = [(ipaddress.ip_address("127.0.0.1"), PROXY_PORT), (None, MANAGEMENT_PORT)]
        self.vetter = AddressVetter(self.clock, resolve=resolve, own=lambda: own,
                                    allowed=[ipaddress.ip_network(c) for c in allowed])
        self.api = ManagementAPI(self.pool, self.registry, self.clock, token=token, vetter=self.vetter)
        self.http = StubTreq(self.api.app.resource())
        self.token = token
        self.tokens: dict[str, str] = {}

    async def call(self, method: str, path: str, body: Any = None, bearer: str | None = None,
                   raw: bytes | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = await self.http.request(method, BASE + path, data=data, headers=headers)
        content = await response.content()
        self.upstreams.flush()
        try:
            return response.code, json.loads(content)
        except ValueError:
            return response.code, content

    async def register(self, agent_id: str, url: str, name: str | None = None) -> tuple[int, Any]:
        code, body = await self.call("POST", "/api/v1/agents", {"agent_id": agent_id, "url": url,
                                                                 "name": name or agent_id}, bearer=self.token)
        if code == 201:
            self.tokens[agent_id] = body["agent_token"]
        return code, body

    async def report(self, agent_id: str, url: str, idle: int, processing: int, bearer: Any = "own",
                     name: str | None = None) -> tuple[int, Any]:
        token = self.tokens.get(agent_id) if bearer == "own" else bearer
        return await self.call(
            "POST", f"/api/v1/agents/{agent_id}/report",
            {"name": name or agent_id, "url": url, "slots_idle": idle, "slots_processing": processing},
            bearer=token,
        )

    def upstream(self, name: str) -> Upstream:
        return self.pool.upstreams[upstream_id(GPU[name])]

    def stop(self) -> None:
        self.registry.stopService()


@pytest.fixture
def cp():
    plane = ControlPlane()
    yield plane
    plane.stop()


async def two_agents(cp: ControlPlane) -> None:
    for name in ("gpu-1", "gpu-2"):
        code, body = await cp.register(name, GPU[name])
        assert code == 201, body
        code, body = await cp.report(name, GPU[name], idle=4, processing=0)
        assert code == 200, body


# -- row 1: agents prove who they are ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reports_without_a_token_with_a_forged_one_or_for_another_id_are_refused(cp):
    """The script that claimed 50 idle slots for a real agent's id: 401, 401, 403; nothing changes."""
    await two_agents(cp)
    cp.servers[GPU["gpu-1"]].busy = 4
    await cp.report("gpu-1", GPU["gpu-1"], idle=0, processing=4)
    before = {name: cp.upstream(name).describe(0) for name in GPU}
    for bearer, status in ((None, 401), ("forged-" + "x" * 40, 401), (cp.tokens["gpu-2"], 403)):
        code, body = await cp.report("gpu-1", GPU["gpu-1"], idle=50, processing=0, bearer=bearer)
        assert code == status, body
        assert body["error"]["param"] in ("authorization", "agent_id")
    code, body = await cp.call("POST", "/api/v1/agents/gpu-1/report", raw=b"{", bearer=None)
    assert code == 401  # the token is checked before the body is read
    assert {name: cp.upstream(name).describe(0) for name in GPU} == before
    assert cp.upstream("gpu-1").slots_idle == 0


@pytest_twisted.ensureDeferred
async def test_an_agent_may_report_only_the_url_it_registered(cp):
    """gpu-1's token reporting gpu-2's URL is 403; the id cannot be taken over while gpu-1 lives."""
    await two_agents(cp)
    code, body = await cp.report("gpu-1", GPU["gpu-2"], idle=4, processing=0)
    assert code == 403 and "may report only" in body["error"]["message"]
    code, body = await cp.register("gpu-1", "http://10.0.0.3:8080")  # no token: the live id is not given away
    assert code == 409 and body["error"]["param"] == "agent_id"
    code, body = await cp.register("thief", GPU["gpu-2"])  # another id for gpu-2's URL
    assert code == 409 and body["error"]["param"] == "url"
    # gpu-1 stops reporting: once it expired, its id may be registered again
    for _ in range(5):
        cp.clock.advance(1.0)
        await cp.report("gpu-2", GPU["gpu-2"], idle=4, processing=0)
    assert upstream_id(GPU["gpu-1"]) not in cp.pool.upstreams
    code, _ = await cp.register("gpu-1", GPU["gpu-1"])
    assert code == 201


@pytest_twisted.ensureDeferred
async def test_a_token_is_shown_once_and_kept_only_as_a_digest(cp):
    await two_agents(cp)
    for name, token in cp.tokens.items():
        credential = cp.registry.credentials[name]
        assert token.encode() not in credential.digest and len(credential.digest) == 32
    assert "agent_token" not in json.dumps((await cp.call("GET", "/api/v1/agents"))[1])


@pytest_twisted.ensureDeferred
async def test_a_lying_agent_loses_to_the_servers_own_slots_and_is_counted_and_logged(cp):
    """gpu-1's agent claims 4 idle of 4 (then 50 of 50) while /slots says 4 busy: the probe wins."""
    await two_agents(cp)
    cp.servers[GPU["gpu-1"]].busy = 4
    with capturedLogs() as events:
        await cp.report("gpu-1", GPU["gpu-1"], idle=4, processing=0)  # the check now reads 4 busy
        assert cp.upstream("gpu-1").slots_idle == 0
        for _ in range(3):
            await cp.report("gpu-1", GPU["gpu-1"], idle=4, processing=0)
            assert cp.upstream("gpu-1").slots_idle == 0
        await cp.report("gpu-1", GPU["gpu-1"], idle=50, processing=0)
        assert (cp.upstream("gpu-1").slots_total, cp.upstream("gpu-1").slots_idle) == (4, 0)
    # counted once per lie: the first when its check came back, the next four as they arrived
    assert cp.registry.contradicted == {"gpu-1": 5} and cp.registry.contradicted_total == 5
    warnings = [e for e in events if "its /slots shows" in e.get("log_format", "")]
    assert len(warnings) == 1 and warnings[0]["log_level"].name == "warn"  # once per lie, not per report
    # the other agent is honest, and its server takes the traffic
    lease = cp.pool.acquire()
    assert lease.result.upstream is cp.upstream("gpu-2")
    lease.result.release()


@pytest_twisted.ensureDeferred
async def test_an_honest_agent_is_not_taken_for_a_liar(cp):
    """Readings one slot apart (a request ended between the two reads) are not a contradiction."""
    await two_agents(cp)
    cp.servers[GPU["gpu-1"]].busy = 2
    for _ in range(3):
        await cp.report("gpu-1", GPU["gpu-1"], idle=3, processing=1)
    assert cp.registry.contradicted == {}
    assert cp.upstream("gpu-1").slots_idle == 3


@pytest_twisted.ensureDeferred
async def test_an_unreachable_server_leaves_the_agents_word_standing(cp):
    """The balancer cannot read the server itself: the report's slots apply (and nothing is counted)."""
    code, _ = await cp.register("gpu-9", "http://10.0.0.9:8080")
    assert code == 201
    for _ in range(2):
        code, _ = await cp.report("gpu-9", "http://10.0.0.9:8080", idle=3, processing=1)
        assert code == 200
    assert cp.pool.upstreams[upstream_id("http://10.0.0.9:8080")].slots_idle == 3
    assert cp.registry.contradicted == {}


@pytest_twisted.ensureDeferred
async def test_the_management_token_is_needed_to_register_when_one_is_set():
    cp = ControlPlane(token="mgmt-token")
    try:
        code, body = await cp.call("POST", "/api/v1/agents", {"agent_id": "a", "url": GPU["gpu-1"], "name": "a"})
        assert code == 401
        await two_agents(cp)  # with the management token
        # the management token registers, it does not report: reports carry the agent's own token
        code, _ = await cp.report("gpu-1", GPU["gpu-1"], idle=4, processing=0, bearer="mgmt-token")
        assert code == 401
        # an agent's token drains its own upstream, not the other one
        code, _ = await cp.call("POST", f"/api/v1/upstreams/{upstream_id(GPU['gpu-1'])}/drain",
                                bearer=cp.tokens["gpu-1"])
        assert code == 200 and cp.upstream("gpu-1").draining
        code, _ = await cp.call("POST", f"/api/v1/upstreams/{upstream_id(GPU['gpu-2'])}/drain",
                                bearer=cp.tokens["gpu-1"])
        assert code == 403 and not cp.upstream("gpu-2").draining
    finally:
        cp.stop()


# -- row 2: the balancer's own ports under other spellings ------------------------------

SELF_SPELLINGS = [
    "http://127.1:8086", "http://[::ffff:127.0.0.1]:8086", "http://2130706433:8086", "http://0x7f.0.0.1:8086",
    "http://0177.0.0.1:8086", "http://me.example:8086", "http://me6.example:8086", "http://localhost:8086",
    "http://127.0.0.2:8085", "http://[::1]:8085", "http://[64:ff9b::7f00:1]:8086",
]


@pytest.mark.parametrize("url", SELF_SPELLINGS)
@pytest_twisted.ensureDeferred
async def test_the_balancers_own_listeners_are_refused_under_every_spelling(cp, url):
    for path, body in (("/api/v1/upstreams", {"url": url, "name": "me"}),
                       ("/api/v1/agents", {"agent_id": "me", "url": url, "name": "me"})):
        code, answer = await cp.call("POST", path, body)
        assert code == 400, answer
        assert "this balancer itself" in answer["error"]["message"] and answer["error"]["param"] == "url"
    assert cp.pool.upstreams == {} and cp.registry.credentials == {}


@pytest_twisted.ensureDeferred
async def test_loopback_and_private_servers_stay_allowed(cp):
    for url in ("http://127.0.0.1:8080", "http://10.0.0.1:8080", "http://192.168.1.5:8080", "http://gpu-1.internal:8080"):
        code, body = await cp.call("POST", "/api/v1/upstreams", {"url": url, "name": url})
        assert code == 201, body


@pytest_twisted.ensureDeferred
async def test_a_registered_alias_is_stored_canonically(cp):
    """http://[::ffff:10.0.0.1]:8080 is 10.0.0.1: one upstream id, so an alias cannot register it twice."""
    code, body = await cp.call("POST", "/api/v1/upstreams", {"url": "http://[::ffff:10.0.0.1]:8080", "name": "a"})
    assert code == 201 and body["url"] == "http://10.0.0.1:8080"
    code, body = await cp.call("POST", "/api/v1/upstreams", {"url": "http://10.1:8080", "name": "b"})
    assert code == 409 and "already registered as 'a'" in body["error"]["message"]  # the same server


# -- row 3: cloud metadata and link-local addresses --------------------------------------

REFUSED = [
    "http://169.254.169.254", "http://[fd00:ec2::254]", "http://[::ffff:169.254.169.254]:80",
    "http://100.100.100.200", "http://metadata.google.internal", "http://[fe80::1]:8080",
    "http://2852039166", "http://169.254.1", "http://mixed.example:8080", "http://0.0.0.0:8080",
    "http://[64:ff9b::a9fe:a9fe]",
]


@pytest.mark.parametrize("url", REFUSED)
@pytest_twisted.ensureDeferred
async def test_metadata_and_link_local_upstreams_are_refused_with_403_saying_why(cp, url):
    for path, body in (("/api/v1/upstreams", {"url": url, "name": "meta"}),
                       ("/api/v1/agents", {"agent_id": "meta", "url": url, "name": "meta"})):
        code, answer = await cp.call("POST", path, body)
        assert code == 403, answer
        assert "--allow-upstream-network" in answer["error"]["message"] and answer["error"]["param"] == "url"
    assert cp.pool.upstreams == {} and cp.registry.credentials == {}


@pytest_twisted.ensureDeferred
async def test_allow_upstream_network_lets_a_refused_range_in():
    cp = ControlPlane(allowed=("169.254.0.0/16",))
    try:
        code, _ = await cp.call("POST", "/api/v1/upstreams", {"url": "http://169.254.10.10:8080", "name": "ll"})
        assert code == 201
        code, _ = await cp.call("POST", "/api/v1/upstreams", {"url": "http://[fd00:ec2::254]", "name": "aws6"})
        assert code == 403
    finally:
        cp.stop()


@pytest_twisted.ensureDeferred
async def test_names_that_do_not_resolve_or_resolve_too_slowly_are_400(cp):
    code, body = await cp.call("POST", "/api/v1/upstreams", {"url": "http://nowhere.example:1", "name": "n"})
    assert code == 400 and "does not resolve" in body["error"]["message"]
    from paddler.fleet.addresses import UpstreamRefused

    pending = cp.vetter.vet("http://slow.example:1")  # a resolver that never answers
    cp.clock.advance(1.9)
    assert not pending.called
    cp.clock.advance(0.1)
    refused = pending.result
    pending.addErrback(lambda _: None)
    assert refused.check(UpstreamRefused) and "did not resolve within 2 s" in refused.value.message
    assert refused.value.status == 400
    assert [c for c in cp.clock.getDelayedCalls() if "sweep" not in repr(c)] == []  # no timeout left behind


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254", "http://[::ffff:169.254.169.254]", "http://127.1:8086", "http://2130706433:8085"],
)
def test_static_upstreams_are_vetted_at_start(url):
    from twisted.python.usage import UsageError

    from paddler.tap import Options

    with pytest.raises(UsageError) as refused:
        Options().parseOptions(["balancer", "--upstream", url])
    assert "refused" in str(refused.value) or "itself" in str(refused.value) or "own" in str(refused.value)
    allowed = Options()
    if url.startswith("http://169") or url.startswith("http://[::ffff:169"):
        allowed.parseOptions(["balancer", "--upstream", url, "--allow-upstream-network", "169.254.169.254/32"])


@pytest.mark.parametrize(
    ("host", "address"),
    [("127.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("0177.1", "127.0.0.1"),
     ("10.1.2", "10.1.0.2"), ("::ffff:10.0.0.1", "10.0.0.1"), ("::1", "::1"), ("gpu-1", None),
     ("1.2.3.4.5", None), ("256.0.0.1", None), ("4294967296", None), ("08.0.0.1", None)],
)
def test_every_spelling_of_an_address_has_one_canonical_form(host, address):
    found = literal_address(host)
    assert (None if found is None else str(found)) == address


# -- row 4: nothing can serve ----------------------------------------------------------


def nothing_healthy_pool(clock: Clock) -> Any:
    from paddler.fleet.pool import UpstreamPool
    from paddler.routing.policies import MostIdleSlotsChooser

    pool = UpstreamPool(clock, MostIdleSlotsChooser(), 30, 30.0, no_upstream_timeout=3.0)
    for name in ("gpu-1", "gpu-2"):
        upstream = pool.add(Upstream(GPU[name], name, clock=clock))
        pool.observe(upstream, FailureSeen("/slots answered 500: boom", unreachable_after=1))
    return pool


def test_with_nothing_healthy_two_requests_wait_the_short_timeout_and_503_says_why():
    clock = Clock()
    pool = nothing_healthy_pool(clock)
    results: list[Any] = []
    for _ in range(2):
        pool.acquire().addBoth(results.append)
    clock.advance(2.9)
    assert results == []
    clock.advance(0.1)
    assert len(results) == 2 and all(r.check(NoHealthyUpstream) for r in results)
    error = results[0].value
    assert error.status == 503
    assert error.message.startswith(
        "no healthy upstream: gpu-1 unreachable: /slots answered 500: boom; gpu-2 unreachable: /slots answered 500"
    ), error.message
    assert error.headers[b"retry-after"] == b"1"
    assert pool.requests_buffered == 0 and clock.getDelayedCalls() == []


def test_busy_but_healthy_keeps_the_whole_buffer_timeout():
    clock = Clock()
    pool = nothing_healthy_pool(clock)
    for upstream in pool.upstreams.values():
        pool.observe(upstream, SlotsSeen(1, 1, upstream.probe_mark()))  # healthy, every slot busy
    results: list[Any] = []
    pool.acquire().addBoth(results.append)
    pool.acquire().addBoth(results.append)
    clock.advance(29.9)
    assert results == []
    clock.advance(0.1)
    assert len(results) == 2 and all(r.check(BufferTimeout) for r in results)


def test_a_loading_upstream_or_a_registering_agent_is_worth_waiting_for():
    clock = Clock()
    pool = nothing_healthy_pool(clock)
    gpu1 = pool.upstreams[upstream_id(GPU["gpu-1"])]
    pool.observe(gpu1, LoadingSeen())
    results: list[Any] = []
    pool.acquire().addBoth(results.append)
    clock.advance(10)
    assert results == []
    pool.observe(gpu1, SlotsSeen(4, 0, gpu1.probe_mark()))
    assert len(results) == 1 and results[0].upstream is gpu1
    results[0].release()
    pool.observe(gpu1, FailureSeen("connection refused", unreachable_after=1))
    pool.registering = lambda: 1  # an agent registered and has not reported yet
    pool.acquire().addBoth(results.append)
    clock.advance(10)
    assert len(results) == 1
    pool.registering = lambda: 0
    clock.advance(20)
    assert len(results) == 2 and results[1].check(NoHealthyUpstream)


def test_a_fleet_that_fails_while_requests_wait_cuts_their_wait_short():
    """Two requests wait behind busy upstreams; both servers go down: 503 three seconds later, not at 30 s."""
    clock = Clock()
    pool = nothing_healthy_pool(clock)
    for upstream in pool.upstreams.values():
        pool.observe(upstream, SlotsSeen(1, 1, upstream.probe_mark()))
    results: list[Any] = []
    pool.acquire().addBoth(results.append)
    pool.acquire().addBoth(results.append)
    clock.advance(5)
    for upstream in pool.upstreams.values():
        pool.observe(upstream, FailureSeen("connection refused", unreachable_after=1))
    clock.advance(2.9)
    assert results == []
    clock.advance(0.1)
    assert len(results) == 2 and all(r.check(NoHealthyUpstream) for r in results)
    assert "gpu-2 unreachable: connection refused" in results[0].value.message


def test_an_empty_fleet_says_so_and_zero_fails_at_once():
    clock = Clock()
    from paddler.fleet.pool import UpstreamPool
    from paddler.routing.policies import MostIdleSlotsChooser

    pool = UpstreamPool(clock, MostIdleSlotsChooser(), 30, 30.0, no_upstream_timeout=0.0)
    d = pool.acquire()
    failure = d.result
    d.addErrback(lambda _: None)
    assert failure.check(NoHealthyUpstream) and "no upstream is registered" in failure.value.message
    assert clock.getDelayedCalls() == []


# -- attacking the endpoints ---------------------------------------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
FIELD_VALUES = {
    "agent_id": st.sampled_from(["gpu-1", "gpu-2", "x" * 65, "bad id", "", "../gpu-1"]) | JUNK,
    "url": st.sampled_from([*GPU.values(), *SELF_SPELLINGS[:4], *REFUSED[:4], "gopher://x", "http://x/path",
                            "http://[::1", "http://a:99999"]) | JUNK,
    "name": st.sampled_from(["gpu-1", "gpu-2", "n" * 200, "\x00"]) | JUNK,
    "slots_idle": st.integers(-5, 10**9) | JUNK,
    "slots_processing": st.integers(-5, 10**9) | JUNK,
    "slots_total": st.integers(-5, 10**9) | JUNK,
    "state": st.sampled_from(["healthy", "loading", "unreachable", "sleeping"]) | JUNK,
    "interval": st.floats(allow_nan=True) | JUNK,
    "models": JUNK,
}
BODY = st.fixed_dictionaries({}, optional=FIELD_VALUES) | JUNK
CALL = st.tuples(
    st.sampled_from(["register", "report", "raw"]),
    st.sampled_from(["gpu-1", "gpu-2", "nobody", "bad%20id", "x" * 70]),
    st.sampled_from(["own", "other", "none", "forged", "mgmt", "huge"]),
    BODY,
    st.binary(max_size=60),
)


def invariants(cp: ControlPlane) -> None:
    """Registry and pool agree: every agent has its upstream and its credential, at the URL it registered."""
    for record in cp.registry.agents.values():
        upstream = cp.pool.upstreams.get(record.upstream_id)
        assert upstream is not None and upstream.source == "agent"
        credential = cp.registry.credentials.get(record.agent_id)
        assert credential is not None and upstream_id(credential.url) == record.upstream_id
        assert 0 <= upstream.slots_idle <= upstream.slots_total <= 4096
    for upstream in cp.pool.upstreams.values():
        host = urlsplit(upstream.url).hostname or ""
        address = literal_address(host)
        assert address is None or not (address.is_link_local or address.is_loopback), upstream.url


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(CALL, min_size=1, max_size=8))
@pytest_twisted.ensureDeferred
async def test_fuzzed_registrations_and_reports_never_500_and_never_corrupt_state(calls):
    """Bad JSON, huge numbers, wrong types, other ids, missing and forged tokens: only 2xx/4xx, state sound."""
    cp = ControlPlane()
    try:
        await two_agents(cp)
        with capturedLogs() as events:
            for kind, agent_id, bearer_kind, body, raw in calls:
                bearer = {
                    "own": cp.tokens.get(agent_id), "other": cp.tokens.get("gpu-2" if agent_id == "gpu-1" else "gpu-1"),
                    "none": None, "forged": "AAAA" + "x" * 40, "mgmt": "mgmt", "huge": "y" * 5000,  # (longer header lines are the listener's 431)
                }[bearer_kind]
                if kind == "register":
                    code, answer = await cp.call("POST", "/api/v1/agents", body, bearer=bearer)
                elif kind == "report":
                    code, answer = await cp.call("POST", f"/api/v1/agents/{agent_id}/report", body, bearer=bearer)
                else:
                    code, answer = await cp.call("POST", f"/api/v1/agents/{agent_id}/report", raw=raw, bearer=bearer)
                assert code in (200, 201, 400, 401, 403, 404, 409, 413), (code, answer)
                if code >= 400:
                    assert isinstance(answer, dict) and answer["error"]["code"] == code
                invariants(cp)
                cp.clock.advance(0.2)
        assert not [e for e in events if e.get("log_failure") is not None]
    finally:
        cp.stop()


def test_a_server_the_balancer_cannot_read_is_checked_less_and_less_often():
    """Checks of an unreadable server back off (1, 2, 4... intervals, up to 64); a good read resets."""
    from paddler.fleet.registry import AgentReport
    from paddler.llamacpp.slots import SlotReading

    clock = Clock()
    pool = make_pool(clock)
    reads: list[float] = []
    answer: list[Any] = [ConnectionRefusedError("refused")]

    def reader(upstream: Upstream) -> Deferred[Any]:
        reads.append(clock.seconds())
        if isinstance(answer[0], Exception):
            return fail(answer[0])
        return succeed(answer[0])

    registry = AgentRegistry(pool, clock, expiry=1000.0, reader=reader, check_every=1.0)
    report = AgentReport(url="http://10.0.0.1:8080", name="gpu-1", slots_total=4, slots_processing=0, interval=1.0)
    for _ in range(16):
        registry.report("gpu-1", report)
        clock.advance(1.0)
    assert reads == [0.0, 2.0, 6.0, 14.0]  # after each failure the gap doubles: 2, 4, 8
    answer[0] = SlotReading(4, 0, "slots")
    clock.advance(16.0)
    for _ in range(3):
        registry.report("gpu-1", report)
        clock.advance(1.0)
    assert reads[4:] == [32.0, 33.0, 34.0]  # read again, then every interval


def test_checks_in_flight_are_capped_whatever_the_number_of_agents():
    """Forty agents on servers that never answer: at most max_checks reads at once; stopping cancels them."""
    from paddler.fleet.registry import AgentReport

    clock = Clock()
    pool = make_pool(clock)
    pending: list[Deferred[Any]] = []

    def reader(upstream: Upstream) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append(d)
        return d

    registry = AgentRegistry(pool, clock, expiry=1000.0, reader=reader, check_every=1.0)
    registry.startService()
    for i in range(40):
        registry.report(f"a{i}", AgentReport(url=f"http://10.0.1.{i}:8080", name=f"gpu-{i}", slots_total=2))
    assert len(pending) == registry.max_checks == 32
    from paddler.llamacpp.slots import SlotReading

    pending[0].callback(SlotReading(2, 0, "slots"))  # one answers: room for one more
    registry.report("a39", AgentReport(url="http://10.0.1.39:8080", name="gpu-39", slots_total=2))
    assert len(pending) == 33
    registry.stopService()
    assert all(d.called for d in pending)
    for d in pending:
        d.addErrback(lambda _: None)
