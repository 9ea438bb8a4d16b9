"""Router-mode upstreams in the fleet, on a fake clock: reading a router (``read_router``
against the simulated router), one child upstream per (router, model), routing by model
(loaded copies with a free slot first), model resolution and the fleet's model list."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from paddler.errors import BufferFull
from paddler.fleet.models import (
    ModelNotFound,
    ModelRequired,
    fleet_models,
    parse_model_aliases,
    resolve_model,
)
from paddler.fleet.routers import child_id, children_of, observe_router
from paddler.fleet.upstream import FailureSeen, Upstream, UpstreamState
from paddler.llamacpp.slots import RouterMode, read_router, read_slots
from paddler.simulator.engine import SimulatorConfig
from paddler.simulator.router import RouterConfig
from paddler.simulator.service import RouterSite, router_site
from paddler.simulator.testing import MemoryHTTPClient

from .helpers import healthy_upstream, make_pool


class SimulatedRouterHost:
    """A simulated router-mode server in memory, with a Getter that records the paths asked."""

    def __init__(self, clock: Clock, url: str, **settings: Any) -> None:
        settings.setdefault("load_seconds", 0.5)
        settings.setdefault("models", ("alpha", "beta", "gamma"))
        site = router_site(clock, RouterConfig(**settings),
                           SimulatorConfig(slots=2, n_ctx=512, tokens_per_second=10.0))
        self.client = MemoryHTTPClient(site)
        assert isinstance(site, RouterSite)
        self.router = site.router
        self.clock = clock
        self.url = url
        self.paths: list[str] = []

    async def get(self, path: str) -> tuple[int, bytes]:
        self.paths.append(path)
        response = self.client.get(path).response
        return response.status, response.body

    def read(self, mark: Any = lambda: 0, model_mark: Any = lambda _: 0) -> Any:
        d = ensureDeferred(read_router(self.get, mark, model_mark))
        return d.result if d.called else pytest.fail("read_router did not answer at once")

    def load(self, name: str) -> None:
        assert self.client.post("/models/load", {"model": name}).response.status == 200
        self.clock.advance(0.5)

    def close(self) -> None:
        self.client.close()
        self.router.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hosts(clock: Clock):
    made: list[SimulatedRouterHost] = []

    def make(url: str = "http://10.0.0.1:8080", **settings: Any) -> SimulatedRouterHost:
        host = SimulatedRouterHost(clock, url, **settings)
        made.append(host)
        return host

    yield make
    for host in made:
        host.close()
    assert clock.getDelayedCalls() == []


def run(coroutine: Any) -> Any:
    d = ensureDeferred(coroutine)
    failures: list[Any] = []
    d.addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    return d.result


# reading a router


def test_read_router_never_loads_a_model(hosts) -> None:
    """A reading of a fresh router lists every model unloaded and asks no /slots; once alpha
    is loaded, only alpha's /slots is asked, with autoload=false, and nothing else loads."""
    host = hosts()
    reading = host.read()
    assert (reading.max_instances, reading.autoload) == (4, True)
    assert [(m.id, m.state) for m in reading.models] == [
        ("alpha", "unloaded"), ("beta", "unloaded"), ("gamma", "unloaded")]
    assert host.paths == ["/props", "/models"]
    host.load("alpha")
    host.paths.clear()
    reading = host.read()
    assert host.paths == ["/props", "/models", "/slots?model=alpha&autoload=false"]
    assert [(m.id, m.state, m.total, m.processing) for m in reading.models] == [
        ("alpha", "loaded", 2, 0), ("beta", "unloaded", 0, 0), ("gamma", "unloaded", 0, 0)]
    assert {m.name: m.state.value for m in host.router.models.values()} == {
        "alpha": "loaded", "beta": "unloaded", "gamma": "unloaded"}


def test_read_router_sees_busy_slots_and_failed_loads(hosts, clock: Clock) -> None:
    """A request running on alpha shows as 1 of 2 slots processing; a failed load of beta is
    state failed with its exit code."""
    host = hosts(failing={"beta": 7})
    host.load("alpha")
    running = host.client.post("/completion", {"model": "alpha", "prompt": "hi", "n_predict": 50})
    host.load("beta")
    [alpha, beta, _] = host.read().models
    assert (alpha.state, alpha.total, alpha.processing) == ("loaded", 2, 1)
    assert (beta.state, beta.exit_code) == ("failed", 7)
    clock.advance(6)
    running.pump()
    assert running.response.status == 200


def test_the_single_model_reader_hands_a_router_over(hosts) -> None:
    """read_slots raises RouterMode for a router: /slots' 400 "model name is missing" in slots
    mode, /props' role router in health mode (instead of "unreachable")."""
    host = hosts()
    for mode in ("slots", "health"):
        with pytest.raises(RouterMode):
            run(read_slots(host.get, mode=mode))


# the fleet picture


def two_routers(hosts, clock: Clock, **settings: Any):
    pool = make_pool(clock)
    first, second = hosts("http://10.0.0.1:8080", **settings), hosts("http://10.0.0.2:8080", **settings)
    parents = []
    for host in (first, second):
        parent = pool.add(Upstream(host.url, clock=clock))
        observe_router(pool, parent, host.read())
        parents.append(parent)
    return pool, (first, second), parents


def test_each_model_of_each_router_is_a_child_upstream(hosts, clock: Clock) -> None:
    """Two routers of three models: six children (one per router and model) plus the two
    routers, which take no request themselves; children of unloaded models take requests
    (the routers autoload) with the slot count they would have."""
    pool, _, parents = two_routers(hosts, clock)
    assert len(pool.upstreams) == 8
    for parent in parents:
        assert parent.role == "router" and parent.state is UpstreamState.HEALTHY
        assert not parent.accepts_requests
        children = children_of(pool.upstreams.values(), parent)
        assert sorted(c.router_model for c in children) == ["alpha", "beta", "gamma"]
        for child in children:
            assert child.id == child_id(parent.url, child.router_model)
            assert child.model_state == "unloaded" and child.accepts_requests
    assert sorted(u.name for u in pool.eligible("beta")) == ["10.0.0.1:8080/beta", "10.0.0.2:8080/beta"]


def test_a_loaded_copy_with_a_free_slot_is_chosen_before_a_router_that_must_load(
    hosts, clock: Clock
) -> None:
    """alpha loaded on the second router only: two concurrent requests for alpha both go to
    it (its 2 free slots); a third, with both busy, may go where alpha must be loaded."""
    pool, (first, second), parents = two_routers(hosts, clock)
    second.load("alpha")
    observe_router(pool, parents[1], second.read())
    loaded = pool.upstreams[child_id(second.url, "alpha")]
    assert loaded.model_state == "loaded" and loaded.slots_idle == 2
    leases = [pool.acquire("alpha").result for _ in range(2)]
    assert [lease.upstream for lease in leases] == [loaded, loaded]
    third = pool.acquire("alpha").result
    assert third.upstream is pool.upstreams[child_id(first.url, "alpha")]
    for lease in (*leases, third):
        lease.release()


def test_without_autoload_an_unloaded_model_takes_no_request(hosts, clock: Clock) -> None:
    """A router started with --no-models-autoload: its unloaded models' children are not
    eligible (the router would answer 400); a failed model is never eligible."""
    pool = make_pool(clock)
    host = hosts(autoload=False, failing={"gamma": 1})
    parent = pool.add(Upstream(host.url, clock=clock))
    host.load("alpha")
    host.client.post("/models/load", {"model": "gamma"})
    clock.advance(0.5)
    observe_router(pool, parent, host.read())
    states = {c.router_model: (c.model_state, c.accepts_requests)
              for c in children_of(pool.upstreams.values(), parent)}
    assert states == {"alpha": ("loaded", True), "beta": ("unloaded", False), "gamma": ("failed", False)}


def test_a_router_that_fails_fails_for_its_models_and_takes_them_when_removed(
    hosts, clock: Clock
) -> None:
    """Probe failures of a router reach its children (unreachable together); removing the
    router removes its children; the other router's children stay."""
    pool, _, parents = two_routers(hosts, clock)
    pool.observe(parents[0], FailureSeen("connection refused", unreachable_after=1))
    for child in children_of(pool.upstreams.values(), parents[0]):
        assert child.state is UpstreamState.UNREACHABLE
    assert [u.name for u in pool.eligible("alpha")] == ["10.0.0.2:8080/alpha"]
    pool.remove(parents[0].id)
    assert len(pool.upstreams) == 4
    assert children_of(pool.upstreams.values(), parents[0]) == []


# model resolution and the fleet's models


def test_resolve_model_in_a_multi_model_fleet(hosts, clock: Clock) -> None:
    """Known model: itself; alias: its target; unknown: ModelNotFound (404, OpenAI's
    model_not_found, naming only the model asked for); none: ModelRequired unless a default."""
    pool, _, _ = two_routers(hosts, clock)
    upstreams = list(pool.upstreams.values())
    assert resolve_model(upstreams, "beta") == "beta"
    assert resolve_model(upstreams, "fast", {"fast": "beta"}) == "beta"
    with pytest.raises(ModelNotFound) as unknown:
        resolve_model(upstreams, "nope")
    assert unknown.value.status == 404
    assert b'"code": "model_not_found"' in unknown.value.body()
    assert b"alpha" not in unknown.value.body()
    with pytest.raises(ModelRequired):
        resolve_model(upstreams, None)
    assert resolve_model(upstreams, None, default="gamma") == "gamma"


def test_a_single_model_fleet_keeps_ignoring_model_names() -> None:
    """Without a router upstream any model name (or none) passes, as llama-server ignores it."""
    upstreams = [healthy_upstream("http://10.0.0.9:8080", models=("tiny.gguf",))]
    assert resolve_model(upstreams, "gpt-4o") == "gpt-4o"
    assert resolve_model(upstreams, None) is None


def test_fleet_models_is_the_union_with_fleet_wide_status(hosts, clock: Clock) -> None:
    """Two routers (alpha loaded on one) and a single-model server (delta): one entry per id,
    alpha loaded on 1 upstream, beta unloaded, delta loaded; OpenAI list shape."""
    pool, (first, _), parents = two_routers(hosts, clock)
    first.load("alpha")
    observe_router(pool, parents[0], first.read())
    pool.add(healthy_upstream("http://10.0.0.3:8080", models=("delta",), clock=clock))
    body = fleet_models(pool.upstreams.values(), 1234)
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"], m["created"]) for m in body["data"]] == [
        ("alpha", "model", "llamacpp", 1234), ("beta", "model", "llamacpp", 1234),
        ("delta", "model", "llamacpp", 1234), ("gamma", "model", "llamacpp", 1234)]
    status = {m["id"]: (m["status"]["value"], m["status"]["loaded"], len(m["status"]["upstreams"]))
              for m in body["data"]}
    assert status == {"alpha": ("loaded", 1, 2), "beta": ("unloaded", 0, 2),
                      "delta": ("loaded", 1, 1), "gamma": ("unloaded", 0, 2)}


def test_parse_model_aliases_refuses_bad_entries() -> None:
    """NAME=TARGET, each name once."""
    assert parse_model_aliases(["fast=alpha", " big = gamma "]) == {"fast": "alpha", "big": "gamma"}
    for bad in (["fast"], ["=alpha"], ["fast="], ["a=b", "a=c"]):
        with pytest.raises(ValueError):
            parse_model_aliases(bad)


# the buffer per model, and its metrics


def busy_router_pool(hosts, clock: Clock, max_buffered: int = 4):
    """One router with alpha and beta loaded (2 slots each), every slot leased."""
    pool = make_pool(clock, max_buffered=max_buffered)
    host = hosts()
    parent = pool.add(Upstream(host.url, clock=clock))
    host.load("alpha")
    host.load("beta")
    observe_router(pool, parent, host.read())
    leases = {m: [pool.acquire(m).result for _ in range(2)] for m in ("alpha", "beta")}
    pool.router_host = host  # type: ignore[attr-defined]  # for a test that reads it again
    return pool, leases


def test_a_cold_models_burst_cannot_keep_a_hot_model_out_of_the_full_buffer(hosts, clock: Clock) -> None:
    """Buffer of 4 full of beta requests: each of two alpha clients takes the place of the
    newest beta waiter (which gets 503 buffer full, naming beta), and both are served first
    as alpha's slots free, before the older beta waiters; one more beta is then refused."""
    pool, leases = busy_router_pool(hosts, clock)
    betas = [pool.acquire("beta") for _ in range(4)]
    refused: list[Any] = []
    for d in betas[2:]:
        d.addErrback(refused.append)
    alphas = [pool.acquire("alpha") for _ in range(2)]
    assert len(refused) == 2 and all(f.check(BufferFull) for f in refused)
    assert "for model beta" in refused[0].getErrorMessage()
    assert pool.buffered_by_model() == {"beta": 2, "alpha": 2}
    more: list[Any] = []
    pool.acquire("beta").addErrback(more.append)
    assert more and more[0].check(BufferFull)  # beta is no longer the crowded one
    for lease in leases["alpha"]:
        lease.release()
    served = [d.result for d in alphas]
    assert [lease.upstream.router_model for lease in served] == ["alpha", "alpha"]
    assert not any(d.called for d in betas[:2])
    for lease in (*served, *leases["beta"]):
        lease.release()
    for d in betas[:2]:
        d.result.release()


def test_a_single_model_fleet_full_buffer_refuses_the_newcomer_as_before(clock: Clock) -> None:
    """Without router-mode upstreams a full buffer refuses the new request, whatever model it names."""
    pool = make_pool(clock, max_buffered=2)
    pool.add(healthy_upstream("http://10.0.0.9:8080", total=1, models=("tiny.gguf",), clock=clock))
    lease = pool.acquire("tiny.gguf").result
    waiting = [pool.acquire("a"), pool.acquire("a")]
    refused: list[Any] = []
    pool.acquire("b").addErrback(refused.append)
    assert refused and refused[0].check(BufferFull)
    assert not any(d.called for d in waiting)
    lease.release()
    waiting[0].result.release()
    waiting[1].result.release()


def test_metrics_per_model(hosts, clock: Clock) -> None:
    """paddler_requests_buffered{model} counts each model's waiters (0 for gamma, which nobody
    waits for) and paddler_slots{model,state} each model's idle and busy slots."""
    from prometheus_client.parser import text_string_to_metric_families

    from paddler.observability.prometheus import PrometheusMetrics
    from paddler.observability.requests import RequestStats

    pool, leases = busy_router_pool(hosts, clock, max_buffered=10)
    waiting = [pool.acquire("beta"), pool.acquire("beta"), pool.acquire("alpha")]
    leases["alpha"][0].release()
    text = PrometheusMetrics(pool, RequestStats(clock)).render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    buffered = {s.labels["model"]: s.value for s in families["paddler_requests_buffered"].samples}
    assert buffered == {"": 0, "alpha": 0, "beta": 2, "gamma": 0}
    slots = {(s.labels["model"], s.labels["state"]): s.value for s in families["paddler_slots"].samples}
    assert slots[("alpha", "busy")] == 2 and slots[("beta", "busy")] == 2
    assert slots[("alpha", "idle")] == 0
    for lease in (leases["alpha"][1], *leases["beta"]):
        lease.release()
    for d in waiting:
        d.result.release()


# hostile routers and clients


@pytest.mark.parametrize(
    "models, reason",
    [
        (b"not json", "no data list"),
        (b'{"data": "x"}', "no data list"),
        (b'{"data": [{"id": 7, "status": {"value": "loaded"}}]}', "entries must be objects with an id"),
        (b'{"data": [{"id": "a\\u0000b", "status": {"value": "loaded"}}]}', "printable"),
        (b'{"data": [{"id": "a", "status": {"value": "exploded"}}]}', "no known status.value"),
        (b'{"data": [{"id": "a", "status": {"value": "unloaded"}}, {"id": "a", "status": {"value": "unloaded"}}]}',
         "twice"),
        (b'{"data": [' + b",".join(b'{"id": "m%d", "status": {"value": "unloaded"}}' % i for i in range(300)) + b"]}",
         "more than 256"),
    ],
)
def test_a_hostile_routers_models_are_a_probe_error_not_a_crash(models: bytes, reason: str) -> None:
    """A /models answer that is not what a router sends fails the probe with a reason (the
    upstream becomes unreachable), and never creates hundreds of upstreams."""
    from paddler.llamacpp.errors import ProbeError

    answers = {"/props": b'{"role": "router", "max_instances": 2}', "/models": models}

    async def get(path: str) -> tuple[int, bytes]:
        return 200, answers[path]

    with pytest.raises(ProbeError, match=reason):
        run(read_router(get))


def test_an_unknown_model_message_is_bounded() -> None:
    """A client naming a 100 kB model gets a 404 whose message shows 200 characters of it."""
    error = ModelNotFound("x" * 100_000)
    assert len(error.message) < 300


# the prober, through HTTP (the production upstream client over the in-memory network)


class Swappable:
    """A web resource that is whichever simulated server is plugged in now (a restart)."""

    isLeaf = True

    def __init__(self, resource: Any) -> None:
        self.resource = resource

    def render(self, request: Any) -> Any:
        return self.resource.render(request)

    def getChildWithDefault(self, path: Any, request: Any) -> Any:
        return self

    def putChild(self, path: Any, child: Any) -> None:
        raise NotImplementedError


def test_the_prober_reads_a_router_and_follows_a_restart_as_a_single_model_server() -> None:
    """HTTPProber on a router-mode server: the router and its 3 models become upstreams, and
    the probe loads nothing; the same URL restarted as a single-model server is read as one
    again (its model upstreams removed), and back as a router again."""
    from paddler.fleet.probe import HTTPProber
    from paddler.simulator.service import simulator_site

    from .helpers import MemoryUpstreams

    upstreams = MemoryUpstreams(connect_timeout=2, max_idle_per_host=1)
    clock = upstreams.clock
    router = router_site(clock, RouterConfig(models=("alpha", "beta", "gamma")), SimulatorConfig(slots=2))
    single = simulator_site(clock, SimulatorConfig(slots=3, model="solo"))
    resource = Swappable(router.resource)
    upstreams.serve(resource, "http://gpu-1:8080")
    pool = make_pool(clock)
    prober = HTTPProber(upstreams.client, clock, pool, timeout=2)
    upstream = pool.add(Upstream("http://gpu-1:8080", name="gpu-1", clock=clock))

    def probe() -> None:
        d = prober.probe(upstream)
        upstreams.flush()
        assert d.called

    probe()
    assert upstream.role == "router"
    assert sorted(u.name for u in pool.upstreams.values()) == [
        "gpu-1", "gpu-1/alpha", "gpu-1/beta", "gpu-1/gamma"]
    assert {m.state.value for m in router.router.models.values()} == {"unloaded"}
    resource.resource = single.resource
    probe()
    assert upstream.role == "single" and list(pool.upstreams) == [upstream.id]
    assert (upstream.slots_total, upstream.model, upstream.accepts_requests) == (3, "solo", True)
    resource.resource = router.resource
    probe()
    assert upstream.role == "router" and len(pool.upstreams) == 4
    router.router.stop()
    upstreams.client.close()
    upstreams.flush()


def test_statsd_reports_each_model_and_zeroes_a_model_that_left(hosts, clock: Clock) -> None:
    """With a router: model.NAME.requests_buffered, .slots_idle and .slots_busy per model;
    a model the fleet no longer serves is sent as 0 once."""
    from paddler.observability.requests import RequestStats
    from paddler.observability.statsd import StatsDService

    class Client:
        prefix = "paddler"

        def __init__(self) -> None:
            self.gauges: dict[str, float] = {}

        def gauge(self, name: str, value: float) -> None:
            self.gauges[name] = value

        def increment(self, name: str, value: int = 1) -> None:
            pass

        def timing(self, name: str, value: float) -> None:
            pass

        def flush(self) -> None:
            pass

    pool, leases = busy_router_pool(hosts, clock, max_buffered=10)
    waiting = pool.acquire("beta")
    client = Client()
    service = StatsDService(client, pool, RequestStats(clock), clock)  # type: ignore[arg-type]
    service.report()
    assert client.gauges["model.beta.requests_buffered"] == 1
    assert (client.gauges["model.alpha.slots_busy"], client.gauges["model.alpha.slots_idle"]) == (2, 0)
    assert client.gauges["model.gamma.requests_buffered"] == 0
    [router] = [u for u in pool.upstreams.values() if u.role == "router"]
    pool.remove(router.id)
    client.gauges.clear()
    service.report()
    assert client.gauges["model.beta.requests_buffered"] == 0 and client.gauges["model.alpha.slots_busy"] == 0
    waiting.cancel()
    waiting.addErrback(lambda _: None)


def test_health_reports_each_model(hosts, clock: Clock) -> None:
    """/health of a multi-model fleet has "models": idle slots and copies where each model is
    loaded, and requests waiting for it; a single-model fleet's /health has no "models"."""
    pool, leases = busy_router_pool(hosts, clock, max_buffered=10)
    waiting = pool.acquire("beta")
    leases["alpha"][0].release()
    status, body = pool.health()
    assert status == 200
    assert body["models"] == {
        "alpha": {"slots_idle": 1, "loaded_on": 1, "requests_buffered": 0},
        "beta": {"slots_idle": 0, "loaded_on": 1, "requests_buffered": 1},
        "gamma": {"slots_idle": 0, "loaded_on": 0, "requests_buffered": 0},
    }
    single = make_pool(clock)
    single.add(healthy_upstream("http://10.0.0.9:8080", models=("tiny.gguf",), clock=clock))
    assert "models" not in single.health()[1]
    waiting.cancel()
    waiting.addErrback(lambda _: None)
    for lease in (leases["alpha"][1], *leases["beta"]):
        lease.release()


def test_draining_a_router_drains_its_models_and_removal_waits_for_their_requests(
    hosts, clock: Clock
) -> None:
    """Draining a router drains all its model upstreams (undrain undoes it); draining one model
    leaves the others and survives the next reading; removing a router when idle waits for
    the requests running on its models."""
    pool, leases = busy_router_pool(hosts, clock, max_buffered=10)
    [router] = [u for u in pool.upstreams.values() if u.role == "router"]
    children = children_of(pool.upstreams.values(), router)
    pool.drain(router.id, requested=True)
    assert all(c.draining for c in children)
    pool.undrain(router.id)
    assert not any(c.draining for c in children)
    gamma = pool.upstreams[child_id(router.url, "gamma")]
    pool.drain(gamma.id, requested=True)
    observe_router(pool, router, pool.router_host.read())  # type: ignore[attr-defined]
    assert gamma.draining and not pool.upstreams[child_id(router.url, "alpha")].draining
    removed = pool.remove_when_idle(router.id)
    assert removed is not None and not removed.called and router.id in pool.upstreams
    leases["alpha"][0].release()
    leases["alpha"][1].release()
    leases["beta"][0].release()
    assert not removed.called
    leases["beta"][1].release()
    assert removed.called and pool.upstreams == {}


def test_an_unloaded_model_counts_the_slots_it_had_or_the_routers_largest(hosts, clock: Clock) -> None:
    """Before any load every unloaded model counts 1 slot; once alpha was loaded (2 slots) the
    other unloaded models count 2 (the router's largest), and alpha, unloaded again, its own 2."""
    pool = make_pool(clock)
    host = hosts()
    parent = pool.add(Upstream(host.url, clock=clock))
    observe_router(pool, parent, host.read())
    assert {c.router_model: c.slots_total for c in children_of(pool.upstreams.values(), parent)} == {
        "alpha": 1, "beta": 1, "gamma": 1}
    host.load("alpha")
    observe_router(pool, parent, host.read())
    host.client.post("/models/unload", {"model": "alpha"})
    observe_router(pool, parent, host.read())
    assert {c.router_model: c.slots_total for c in children_of(pool.upstreams.values(), parent)} == {
        "alpha": 2, "beta": 2, "gamma": 2}


def test_requests_naming_no_model_reach_a_router_even_one_that_lists_no_model(hosts, clock: Clock) -> None:
    """A request that takes no slot and names no model (/props, CORS preflight, /tools) may go to a
    router itself, which answers it; with two routers that list no model at all, it still finds
    one (it got 503 "no healthy upstream" before), and never a draining or unreachable one."""
    pool = make_pool(clock)
    parents = []
    for url in ("http://10.0.0.1:8080", "http://10.0.0.2:8080"):
        host = hosts(url, models=())
        parent = pool.add(Upstream(host.url, clock=clock))
        observe_router(pool, parent, host.read())
        parents.append(parent)
    assert all(p.role == "router" for p in parents) and len(pool.upstreams) == 2
    first, second = pool.pick_any(), pool.pick_any()
    assert {first.id, second.id} == {p.id for p in parents}  # both routers take turns
    assert pool.pick_any(model="alpha") is None  # a model nobody serves: no router is guessed
    pool.drain(parents[0].id)
    pool.observe(parents[1], FailureSeen("connection refused", unreachable_after=1))
    assert pool.pick_any() is None
    # with models, their children (idle slots) come first, in turn, as before
    pool2, _, parents2 = two_routers(hosts, clock)
    picked = [pool2.pick_any() for _ in range(6)]
    assert len({u.id for u in picked}) == 6 and all(u.role != "router" for u in picked)


# sleeping models (llama-server --sleep-idle-seconds)


def test_a_sleeping_model_is_read_without_waking_it_and_an_awake_copy_goes_first(
    hosts, clock: Clock
) -> None:
    """alpha loaded on both routers, asleep on the first: the reading asks no /slots of the
    sleeping alpha (a /slots read is a task that would wake it), its child keeps alpha's 2
    slots and takes requests (a request wakes it); requests go to the awake copy while it has
    a free slot (2), then to the sleeping one (it wakes for the third); nothing woke meanwhile."""
    pool, (first, second), parents = two_routers(hosts, clock, sleep_idle_seconds=5.0)
    first.load("alpha")
    second.load("alpha")
    for parent, host in zip(parents, (first, second)):
        observe_router(pool, parent, host.read())
    clock.advance(5.0)  # both idle out; the second is woken by its probe below
    first.paths.clear()
    observe_router(pool, parents[0], first.read())
    assert first.paths == ["/props", "/models"]
    assert second.client.get("/slots?model=alpha&autoload=false").response.status is None
    clock.advance(0.5)
    observe_router(pool, parents[1], second.read())
    asleep = pool.upstreams[child_id(first.url, "alpha")]
    awake = pool.upstreams[child_id(second.url, "alpha")]
    assert (asleep.model_state, asleep.slots_idle, asleep.accepts_requests, asleep.loaded) == (
        "sleeping", 2, True, True)
    assert awake.model_state == "loaded" and awake.slots_idle == 2
    leases = [pool.acquire("alpha").result for _ in range(3)]
    assert [lease.upstream for lease in leases] == [awake, awake, asleep]
    for lease in leases:
        lease.release()
    assert first.router.models["alpha"].state.value == "sleeping"


@pytest.mark.parametrize("slots, asleep", [(True, False), (False, True)])
def test_a_health_mode_reading_lets_an_idle_model_sleep(hosts, clock: Clock, slots: bool, asleep: bool) -> None:
    """Read every second for 10 s with --sleep-idle-seconds 5: the /slots reads of the default
    probe are tasks that keep alpha awake; the health-mode reading (/props?model=alpha: its 2
    slots, busy unknown) is none, and alpha sleeps after 5 s (then it is asked nothing)."""
    host = hosts(sleep_idle_seconds=5.0)
    host.load("alpha")
    for _ in range(10):
        clock.advance(1.0)
        d = ensureDeferred(read_router(host.get, slots=slots))
        reading = d.result
    [alpha, _, _] = reading.models
    assert host.router.models["alpha"].state.value == ("sleeping" if asleep else "loaded")
    if asleep:
        assert alpha.state == "sleeping"
        assert host.paths[-2:] == ["/props", "/models"]
        assert "/props?model=alpha&autoload=false" in host.paths
    else:
        assert (alpha.state, alpha.total, alpha.processing) == ("loaded", 2, 0)


def test_a_health_mode_reading_counts_a_loaded_models_slots_from_its_props(hosts, clock: Clock) -> None:
    """Without /slots reads a loaded model is read by /props?model=: its total_slots, busy
    unknown (None: the pool counts only its own leases); a bad answer is a probe error."""
    host = hosts()
    host.load("alpha")
    reading = ensureDeferred(read_router(host.get, slots=False)).result
    assert [(m.id, m.state, m.total, m.processing) for m in reading.models] == [
        ("alpha", "loaded", 2, None), ("beta", "unloaded", 0, 0), ("gamma", "unloaded", 0, 0)]
    pool = make_pool(clock)
    parent = pool.add(Upstream(host.url, clock=clock))
    observe_router(pool, parent, reading)
    alpha = pool.upstreams[child_id(host.url, "alpha")]
    assert (alpha.model_state, alpha.slots_idle) == ("loaded", 2)

    async def bad(path: str) -> tuple[int, bytes]:
        if path.startswith("/props?model="):
            return 200, b'{"total_slots": "many"}'
        return await host.get(path)

    d = ensureDeferred(read_router(bad, slots=False))
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and "no total_slots" in str(failures[0].value)
