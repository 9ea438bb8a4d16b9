"""paddler agent beside router-mode llama-servers: two agents, two simulated router hosts
(``paddler simulate --models a,b --models-max 1``) and one balancer, all in memory on a Clock.

The agents read their routers (/props role, /models, /slots?model= of loaded models) and
report each model; the balancer builds the same per-(router, model) child upstreams as its
probes do, routes by model to them, places models on them, validates every field of a
router report (400 with the field, nothing changed), and expires the children of an agent
that vanished."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from paddler.agent.service import AgentConfig, AgentService
from paddler.fleet.placement import ModelPlacement
from paddler.fleet.registry import AgentRegistry
from paddler.fleet.routers import child_id, children_of
from paddler.fleet.upstream import Upstream, UpstreamState, upstream_id
from paddler.management.api import ManagementAPI
from paddler.simulator.engine import SimulatorConfig
from paddler.simulator.router import RouterConfig
from paddler.simulator.service import router_site

from .fake_llama import FakeLlama
from .helpers import make_pool
from .test_management import Harness

MODELS = ("a", "b")


class Host:
    """One simulated router-mode llama-server (models a, b; --models-max 1; 2 slots a model)."""

    def __init__(self, clock: Clock, index: int, **settings: Any) -> None:
        settings.setdefault("models", MODELS)
        settings.setdefault("models_max", 1)
        settings.setdefault("load_seconds", 0.5)
        self.site = router_site(clock, RouterConfig(**settings),
                                SimulatorConfig(slots=2, n_ctx=512, tokens_per_second=10.0))
        self.router = self.site.router
        self.clock = clock
        self.local = f"http://llama{index}:8080"
        self.external = f"http://10.0.0.{index}:8080"
        self.stub = StubTreq(self.site.resource)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        response = self.stub.post(self.local + path, data=json.dumps(body).encode(),
                                  headers={b"content-type": [b"application/json"]}).result
        return response.code, self.stub.content(response).result

    def load(self, model: str) -> None:
        assert self.post("/models/load", {"model": model})[0] == 200
        self.clock.advance(0.5)

    def states(self) -> dict[str, str]:
        return {m.name: m.state.value for m in self.router.models.values()}


class Network:
    """An HTTP client for every host by name: the balancer, the routers (by local and external
    URL), each up or down (per agent: C{down} holds the hosts this agent cannot reach)."""

    def __init__(self, routes: dict[str, Any]) -> None:
        self.routes = routes
        self.down: set[str] = set()

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        host = urlsplit(url).hostname or ""
        if host in self.down:
            return fail(ConnectionRefusedError("down"))
        return self.routes[host].request(method, url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return self.request("GET", url, **kwargs)


class RouterFleet:
    """A balancer (pool, registry, management API), two router hosts and an agent beside each."""

    def __init__(self, clock: Clock, hosts: int = 2, **settings: Any) -> None:
        self.clock = clock
        self.pool = make_pool(clock, max_buffered=20, timeout=60.0)
        self.registry = AgentRegistry(self.pool, clock, expiry=3.0)
        self.registry.startService()
        self.api = ManagementAPI(self.pool, self.registry, clock)
        balancer = StubTreq(self.api.app.resource())
        self.hosts = [Host(clock, i + 1, **settings) for i in range(hosts)]
        self.agents: list[AgentService] = []
        self.networks: list[Network] = []
        for i, host in enumerate(self.hosts):
            net = Network({"balancer": balancer, f"llama{i + 1}": host.stub})
            config = AgentConfig(llamacpp=host.local, external_url=host.external,
                                 balancer="http://balancer:8085", name=f"gpu-{i + 1}", interval=1.0)
            self.networks.append(net)
            self.agents.append(AgentService(config, net, clock))

    def start(self) -> None:
        for agent in self.agents:
            agent.startService()

    def router(self, index: int) -> Upstream:
        return self.pool.upstreams[upstream_id(self.hosts[index].external)]

    def child(self, index: int, model: str) -> Upstream:
        return self.pool.upstreams[child_id(self.hosts[index].external, model)]

    def report_now(self, index: int) -> None:
        agent = self.agents[index]
        d = agent._tick()
        assert d is None or d.called, "the agent's report did not complete at once"

    def close(self) -> None:
        for agent in self.agents:
            if agent.running:
                agent.stopService()
        self.clock.advance(60)
        self.registry.stopService()
        self.pool.stop()
        for host in self.hosts:
            host.router.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fleet(clock: Clock) -> Iterator[RouterFleet]:
    f = RouterFleet(clock)
    yield f
    f.close()
    assert clock.getDelayedCalls() == []


def test_two_agents_of_two_routers_make_one_child_per_router_and_model(fleet: RouterFleet) -> None:
    """Each agent sees /props role router and reports its models: the balancer holds both
    routers (source agent, role router, taking no request) and four children, one per (router,
    model), unloaded, taking requests because the routers autoload, with max_instances 1."""
    fleet.start()
    assert [a.role for a in fleet.agents] == ["router", "router"]
    assert len(fleet.pool.upstreams) == 6
    for index in (0, 1):
        router = fleet.router(index)
        assert (router.source, router.role, router.max_instances, router.autoload) == ("agent", "router", 1, True)
        assert router.state is UpstreamState.HEALTHY and not router.accepts_requests
        children = children_of(fleet.pool.upstreams.values(), router)
        assert sorted(c.router_model for c in children) == list(MODELS)
        for child in children:
            assert child.model_state == "unloaded" and child.accepts_requests
    sent = fleet.agents[0].last_report
    assert sent is not None and sent["role"] == "router" and "slots_idle" not in sent
    assert [m["id"] for m in sent["router_models"]] == list(MODELS)
    assert fleet.agents[0].status()["llamacpp"]["role"] == "router"


def test_a_model_loaded_on_each_router_is_routed_by_model_to_its_router(fleet: RouterFleet) -> None:
    """a loaded on gpu-1, b on gpu-2 (each router holds one model): after the next reports the
    loaded children carry the models' slots (2 each), and requests for a go to gpu-1's a, for b
    to gpu-2's b; the agents never loaded anything themselves (autoload=false on /slots)."""
    fleet.start()
    fleet.hosts[0].load("a")
    fleet.hosts[1].load("b")
    for index in (0, 1):
        fleet.report_now(index)
    assert fleet.hosts[0].states() == {"a": "loaded", "b": "unloaded"}
    assert fleet.hosts[1].states() == {"a": "unloaded", "b": "loaded"}
    a1, b2 = fleet.child(0, "a"), fleet.child(1, "b")
    assert (a1.model_state, a1.slots_total, a1.slots_idle) == ("loaded", 2, 2)
    assert (b2.model_state, b2.slots_total, b2.slots_idle) == ("loaded", 2, 2)
    leases = [fleet.pool.acquire("a").result for _ in range(2)] + [fleet.pool.acquire("b").result]
    assert [lease.upstream for lease in leases] == [a1, a1, b2]
    for lease in leases:
        lease.release()
    assert fleet.hosts[0].states() == {"a": "loaded", "b": "unloaded"}


def test_busy_slots_of_a_loaded_model_are_reported(fleet: RouterFleet, clock: Clock) -> None:
    """A request running on gpu-1's a (sent to the router directly, not through paddler) shows
    up in the next report as one of a's two slots busy."""
    fleet.start()
    fleet.hosts[0].load("a")
    stub = fleet.hosts[0].stub
    running = stub.post(fleet.hosts[0].local + "/completion",
                        data=json.dumps({"model": "a", "prompt": "hi", "n_predict": 50}).encode(),
                        headers={b"content-type": [b"application/json"]})
    clock.advance(0.1)
    fleet.report_now(0)
    model = next(m for m in fleet.agents[0].last_report["router_models"] if m["id"] == "a")
    assert (model["slots_total"], model["slots_processing"]) == (2, 1)
    assert fleet.child(0, "a").slots_idle == 1
    clock.advance(10)
    assert running.called


def test_a_model_whose_load_fails_is_reported_failed_with_its_exit_code(clock: Clock) -> None:
    """b fails to load on gpu-2 (exit code 3): its agent reports b failed with exit_code 3; the
    balancer's child for b there is failed, takes no request, and b is still served by gpu-1."""
    fleet = RouterFleet(clock, failing={"b": 3})
    try:
        fleet.start()
        fleet.hosts[1].post("/models/load", {"model": "b"})
        clock.advance(1.0)
        fleet.report_now(1)
        sent = {m["id"]: m for m in fleet.agents[1].last_report["router_models"]}
        assert (sent["b"]["state"], sent["b"]["exit_code"]) == ("failed", 3)
        failed = fleet.child(1, "b")
        assert (failed.model_state, failed.exit_code, failed.accepts_requests) == ("failed", 3, False)
        assert [u.id for u in fleet.pool.eligible("b")] == [fleet.child(0, "b").id]
    finally:
        fleet.close()


def test_an_agent_that_vanishes_takes_its_router_and_children_with_it(fleet: RouterFleet, clock: Clock) -> None:
    """gpu-2's agent stops reporting (it cannot reach the balancer any more, as if it crashed):
    after the expiry its router and both its children leave the pool; gpu-1's router and
    children stay, and a request for b is then served by gpu-1 only."""
    fleet.start()
    fleet.networks[1].down.add("balancer")
    clock.advance(1.0)
    clock.advance(1.0)
    clock.advance(1.0)
    clock.advance(1.5)
    ids = set(fleet.pool.upstreams)
    assert upstream_id(fleet.hosts[1].external) not in ids
    assert not any(child_id(fleet.hosts[1].external, m) in ids for m in MODELS)
    assert {fleet.router(0).id, fleet.child(0, "a").id, fleet.child(0, "b").id} == ids
    assert [u.id for u in fleet.pool.eligible("b")] == [fleet.child(0, "b").id]


def test_a_vanished_agents_children_wait_for_their_requests_before_leaving(
    fleet: RouterFleet, clock: Clock
) -> None:
    """A request still running on gpu-2's b when its agent goes silent: the router and its
    children drain (b takes no new request) and leave only once that request ended."""
    fleet.start()
    lease = fleet.pool.acquire("b").result
    if lease.upstream.parent_id != fleet.router(1).id:
        lease.release()
        lease = None
        fleet.hosts[1].load("b")
        fleet.report_now(1)
        fleet.hosts[0].post("/models/unload", {"model": "b"})
        lease = fleet.pool.acquire("b").result
    assert lease.upstream.parent_id == fleet.router(1).id
    fleet.networks[1].down.add("balancer")
    clock.advance(5.0)
    assert fleet.router(1).draining and fleet.child(1, "b").draining
    lease.release()
    assert upstream_id(fleet.hosts[1].external) not in fleet.pool.upstreams
    assert child_id(fleet.hosts[1].external, "b") not in fleet.pool.upstreams


def test_an_agent_that_comes_back_before_its_expiry_keeps_its_children(fleet: RouterFleet, clock: Clock) -> None:
    """One missed report is not an expiry: the children stay and are not draining."""
    fleet.start()
    fleet.networks[1].down.add("balancer")
    clock.advance(1.0)
    fleet.networks[1].down.discard("balancer")
    clock.advance(2.0)
    assert not fleet.child(1, "a").draining and len(fleet.pool.upstreams) == 6


def test_a_router_restarted_as_a_single_model_server_loses_its_children(fleet: RouterFleet, clock: Clock) -> None:
    """gpu-2's llama-server restarts with -m (one model, 4 slots): its agent reads it as one
    server again and the balancer drops gpu-2's children; gpu-2 serves as a single upstream."""
    fleet.start()
    fleet.networks[1].routes["llama2"] = StubTreq(FakeLlama(slots=4, model="m.gguf"))
    fleet.report_now(1)
    assert fleet.agents[1].role == "single"
    router = fleet.router(1)
    assert router.role == "single" and router.slots_total == 4
    assert children_of(fleet.pool.upstreams.values(), router) == []
    assert len(fleet.pool.upstreams) == 4


def test_a_router_that_cannot_be_read_is_reported_unreachable_and_its_children_stop(
    fleet: RouterFleet, clock: Clock
) -> None:
    """gpu-1's llama-server stops answering: its agent reports it unreachable (still role
    router); its children become unreachable with it and take no request."""
    fleet.start()
    fleet.networks[0].down.add("llama1")
    fleet.report_now(0)
    assert fleet.agents[0].last_report["state"] == "unreachable"
    assert fleet.agents[0].last_report["role"] == "router"
    assert fleet.router(0).state is UpstreamState.UNREACHABLE
    assert all(not c.accepts_requests for c in children_of(fleet.pool.upstreams.values(), fleet.router(0)))
    fleet.networks[0].down.discard("llama1")
    fleet.report_now(0)
    assert fleet.child(0, "a").accepts_requests


def test_placement_loads_models_on_agent_registered_routers(clock: Clock) -> None:
    """--model-placement with routers known only through their agents: two requests for a and
    one for b wait; placement loads a on one router and b on the other (max 1 model each), and
    every waiting request gets a slot of its model once the agents report it loaded."""
    fleet = RouterFleet(clock)
    fleet.pool.model_placement = True

    def host_of(router: Upstream) -> Host:
        return next(h for h in fleet.hosts if upstream_id(h.external) == router.id)

    def post(router: Upstream, path: str, body: dict[str, Any]) -> Any:
        return succeed(host_of(router).post(path, body))

    def probe_now(router: Upstream) -> Any:
        fleet.report_now(fleet.hosts.index(host_of(router)))
        return succeed(None)

    placement = ModelPlacement(fleet.pool, clock, post, probe_now, interval=0.5, min_residency=30.0,
                               load_timeout=10.0, poll_interval=0.25)
    try:
        fleet.start()
        placement.startService()
        assert all(not c.accepts_requests for c in fleet.pool.upstreams.values())
        waiting = [fleet.pool.acquire("a"), fleet.pool.acquire("a"), fleet.pool.acquire("b")]
        assert not any(d.called for d in waiting)
        for _ in range(8):
            clock.advance(0.25)
        assert all(d.called for d in waiting)
        leases = [d.result for d in waiting]
        assert [lease.upstream.router_model for lease in leases] == ["a", "a", "b"]
        assert leases[0].upstream.parent_id != leases[2].upstream.parent_id
        loaded = sorted((h.external, m) for h in fleet.hosts for m, s in h.states().items() if s == "loaded")
        assert len(loaded) == 2 and {m for _, m in loaded} == {"a", "b"}
        assert sum(placement.loads_total.values()) == 2
        for lease in leases:
            lease.release()
    finally:
        placement.stopService()
        fleet.close()
    assert clock.getDelayedCalls() == []


# -- garbage from an agent: a clear 400 naming the field, nothing changed --------------------

ROUTER_REPORT: dict[str, Any] = {
    "name": "gpu-1",
    "url": "http://10.0.0.1:8080",
    "state": "healthy",
    "role": "router",
    "max_instances": 1,
    "models_autoload": True,
    "router_models": [
        {"id": "a", "aliases": ["alpha"], "state": "loaded", "exit_code": 0, "slots_total": 2,
         "slots_processing": 1},
        {"id": "b", "aliases": [], "state": "unloaded", "exit_code": 0, "slots_total": 0, "slots_processing": 0},
    ],
}


def _model(**changes: Any) -> dict[str, Any]:
    return {**ROUTER_REPORT, "router_models": [{**ROUTER_REPORT["router_models"][0], **changes}]}


GARBAGE: list[tuple[str, dict[str, Any], str]] = [
    ("role is unknown", {**ROUTER_REPORT, "role": "proxy"}, "role"),
    ("role is not a string", {**ROUTER_REPORT, "role": ["router"]}, "role"),
    ("no router_models", {k: v for k, v in ROUTER_REPORT.items() if k != "router_models"}, "router_models"),
    ("router_models is an object", {**ROUTER_REPORT, "router_models": {"a": {}}}, "router_models"),
    ("too many models", {**ROUTER_REPORT, "router_models": [
        {"id": f"m{i}", "state": "unloaded"} for i in range(257)]}, "router_models"),
    ("a model is a string", {**ROUTER_REPORT, "router_models": ["a"]}, "router_models"),
    ("a model without id", _model(id=None), "router_models"),
    ("an empty id", _model(id=""), "router_models"),
    ("a numeric id", _model(id=7), "router_models"),
    ("an id with a newline", _model(id="a\nb"), "router_models"),
    ("an id too long", _model(id="x" * 513), "router_models"),
    ("aliases not a list", _model(aliases="alpha"), "router_models"),
    ("an alias not a string", _model(aliases=[1]), "router_models"),
    ("17 aliases", _model(aliases=[f"x{i}" for i in range(17)]), "router_models"),
    ("an unknown state", _model(state="warming"), "router_models"),
    ("no state", _model(state=None), "router_models"),
    ("slots_total negative", _model(slots_total=-1), "router_models"),
    ("slots_total huge", _model(slots_total=10**9), "router_models"),
    ("slots_total a float", _model(slots_total=2.5), "router_models"),
    ("slots_total a bool", _model(slots_total=True), "router_models"),
    ("more busy than total", _model(slots_processing=3), "router_models"),
    ("slots of an unloaded model", _model(state="unloaded", slots_total=2, slots_processing=0), "router_models"),
    ("exit_code of a loaded model", _model(exit_code=3), "router_models"),
    ("exit_code a string", _model(state="failed", exit_code="3", slots_total=0, slots_processing=0),
     "router_models"),
    ("exit_code beyond int32", _model(state="failed", exit_code=2**40, slots_total=0, slots_processing=0),
     "router_models"),
    ("a model id twice", {**ROUTER_REPORT, "router_models": [ROUTER_REPORT["router_models"][0]] * 2},
     "router_models"),
    ("max_instances negative", {**ROUTER_REPORT, "max_instances": -1}, "max_instances"),
    ("max_instances a string", {**ROUTER_REPORT, "max_instances": "1"}, "max_instances"),
    ("max_instances NaN-like float", {**ROUTER_REPORT, "max_instances": 1.5}, "max_instances"),
    ("models_autoload a string", {**ROUTER_REPORT, "models_autoload": "yes"}, "models_autoload"),
    ("a router with top-level slots", {**ROUTER_REPORT, "slots_idle": 4}, "slots_idle"),
    ("a router with a model field", {**ROUTER_REPORT, "model": "a"}, "model"),
    ("a healthy router with an error", {**ROUTER_REPORT, "error": "boom"}, "state"),
]


@pytest.mark.parametrize("body,param", [(b, p) for _, b, p in GARBAGE], ids=[name for name, _, _ in GARBAGE])
def test_a_router_report_with_garbage_is_a_400_naming_the_field_and_changes_nothing(
    body: dict[str, Any], param: str
) -> None:
    """A good router report first (gpu-1: a loaded with 1 of 2 slots busy, b unloaded), then
    the garbage one: 400 in the JSON error shape naming the field, and the router, its
    children and their slots are as the good report left them."""
    import pytest_twisted  # noqa: F401  (the harness needs the reactor-free StubTreq only)

    h = Harness()
    try:
        d = Deferred.fromCoroutine(h.report("agent-1", ROUTER_REPORT))
        status, answer, _ = d.result
        assert status == 200, answer
        before = {uid: (u.role, u.model_state, u.slots_total, u.slots_idle, u.models)
                  for uid, u in h.pool.upstreams.items()}
        assert len(before) == 3
        d = Deferred.fromCoroutine(h.report("agent-1", body))
        status, answer, _ = d.result
        assert status == 400, answer
        assert answer["error"]["param"] == param, answer
        assert answer["error"]["message"]
        after = {uid: (u.role, u.model_state, u.slots_total, u.slots_idle, u.models)
                 for uid, u in h.pool.upstreams.items()}
        assert after == before
    finally:
        h.stop()


def test_a_valid_router_report_by_hand_is_applied_with_aliases_and_slots() -> None:
    """The good report on its own: the children carry a's alias and slots (1 of 2 idle), b
    unloaded with a's slot count as its guess; requests naming the alias resolve to a."""
    h = Harness()
    try:
        status, answer, _ = Deferred.fromCoroutine(h.report("agent-1", ROUTER_REPORT)).result
        assert status == 200, answer
        router = h.pool.upstreams[answer["upstream_id"]]
        a = h.pool.upstreams[child_id(router.url, "a")]
        b = h.pool.upstreams[child_id(router.url, "b")]
        assert (a.models, a.slots_total, a.slots_idle, a.model_state) == (("a", "alpha"), 2, 1, "loaded")
        assert (b.model_state, b.slots_total) == ("unloaded", 2)
        assert a.serves("alpha") and router.role == "router" and router.max_instances == 1
        failed = {**ROUTER_REPORT, "router_models": [
            ROUTER_REPORT["router_models"][0],
            {"id": "b", "state": "failed", "exit_code": 139},
        ]}
        status, answer, _ = Deferred.fromCoroutine(h.report("agent-1", failed)).result
        assert status == 200, answer
        assert (b.model_state, b.exit_code, b.accepts_requests) == ("failed", 139, False)
        status, answer, _ = Deferred.fromCoroutine(h.report("agent-1", {
            **ROUTER_REPORT, "router_models": [ROUTER_REPORT["router_models"][0]]})).result
        assert status == 200 and child_id(router.url, "b") not in h.pool.upstreams  # b left the router
    finally:
        h.stop()


def test_an_unreachable_router_report_needs_no_models() -> None:
    """A router's agent that cannot read it reports role router, state unreachable and no
    router_models: 200, and the router (with its children) is unreachable."""
    h = Harness()
    try:
        Deferred.fromCoroutine(h.report("agent-1", ROUTER_REPORT))
        down = {"name": "gpu-1", "url": ROUTER_REPORT["url"], "role": "router", "state": "unreachable",
                "error": "connection refused"}
        status, answer, _ = Deferred.fromCoroutine(h.report("agent-1", down)).result
        assert status == 200, answer
        router = h.pool.upstreams[answer["upstream_id"]]
        assert router.state is UpstreamState.UNREACHABLE
        assert all(c.state is UpstreamState.UNREACHABLE for c in children_of(h.pool.upstreams.values(), router))
    finally:
        h.stop()
