"""The simulated router-mode llama-server (``paddler simulate --models ...``): the same
endpoints, answers and errors as llama-server in router mode, on a fake clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from paddler.simulator.engine import SimulatorConfig
from paddler.simulator.router import RouterConfig, parse_failing, parse_models
from paddler.simulator.service import RouterSite, router_site
from paddler.simulator.testing import MemoryHTTPClient

MakeRouter = Callable[..., MemoryHTTPClient]
CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def router(clock: Clock) -> Iterator[MakeRouter]:
    """Build simulated routers on the fake clock; afterwards stop them, close every
    connection and check that nothing is left scheduled."""
    clients: list[MemoryHTTPClient] = []

    def make(models: tuple[str, ...] = ("alpha", "beta", "gamma"), slots: int = 2,
             api_key: str | None = None, **settings: Any) -> MemoryHTTPClient:
        settings.setdefault("load_seconds", 0.5)
        site = router_site(
            clock, RouterConfig(models=models, **settings),
            SimulatorConfig(slots=slots, n_ctx=1024, tokens_per_second=10.0, api_key=api_key),
        )
        client = MemoryHTTPClient(site)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
        site = client.site
        assert isinstance(site, RouterSite)
        site.router.stop()
    assert clock.getDelayedCalls() == []


def statuses(client: MemoryHTTPClient) -> dict[str, str]:
    body = client.get("/models").response.json()
    return {entry["id"]: entry["status"]["value"] for entry in body["data"]}


def error(exchange: Any) -> tuple[int, str, str]:
    response = exchange.response
    body = response.json()["error"]
    assert body["code"] == response.status
    return response.status, body["type"], body["message"]


def load(client: MemoryHTTPClient, clock: Clock, name: str) -> None:
    response = client.post("/models/load", {"model": name}).response
    assert (response.status, response.json()) == (200, {"success": True})
    clock.advance(0.5)
    assert statuses(client)[name] == "loaded"


def chat(client: MemoryHTTPClient, model: str | None, n: int = 2, **extra: Any) -> Any:
    body: dict[str, Any] = {"messages": CHAT, "max_tokens": n, **extra}
    if model is not None:
        body["model"] = model
    return client.post("/v1/chat/completions", body)


# read-only endpoints


def test_health_props_and_models_of_an_idle_router(router: MakeRouter) -> None:
    """/health is 200 with no model loaded; /props says role router, max_instances and
    models_autoload and has no total_slots; /models and /v1/models list every model unloaded."""
    client = router(models_max=2)
    for path in ("/health", "/v1/health"):
        response = client.get(path).response
        assert (response.status, response.json()) == (200, {"status": "ok"})
    props = client.get("/props").response.json()
    assert props["role"] == "router"
    assert (props["max_instances"], props["models_autoload"]) == (2, True)
    assert "total_slots" not in props
    assert props["default_generation_settings"] == {"params": None, "n_ctx": 0}
    for path in ("/models", "/v1/models"):
        body = client.get(path).response.json()
        assert body["object"] == "list"
        assert [(m["id"], m["object"], m["owned_by"], m["status"]["value"], m["aliases"])
                for m in body["data"]] == [
            ("alpha", "model", "llamacpp", "unloaded", []),
            ("beta", "model", "llamacpp", "unloaded", []),
            ("gamma", "model", "llamacpp", "unloaded", []),
        ]
    assert router(autoload=False).get("/props").response.json()["models_autoload"] is False


def test_slots_need_a_model_and_a_probe_with_autoload_false_loads_nothing(
    router: MakeRouter, clock: Clock
) -> None:
    """/slots without model is 400 "model name is missing"; with autoload=false on an
    unloaded model 400 "model is not loaded" and the model stays unloaded; an unknown
    model is 400 "not found"; a loaded model answers its own slots."""
    client = router()
    assert error(client.get("/slots")) == (
        400, "invalid_request_error", "model name is missing from the request")
    assert error(client.get("/slots?model=alpha&autoload=false")) == (
        400, "invalid_request_error", "model is not loaded")
    assert error(client.get("/slots?model=nope&autoload=false")) == (
        400, "invalid_request_error", "model 'nope' not found")
    clock.advance(5)
    assert set(statuses(client).values()) == {"unloaded"}
    load(client, clock, "alpha")
    response = client.get("/slots?model=alpha&autoload=false").response
    assert response.status == 200
    assert response.json() == [
        {"id": i, "n_ctx": 1024, "speculative": False, "is_processing": False} for i in range(2)]
    props = client.get("/props?model=alpha&autoload=false").response.json()
    assert (props["total_slots"], props["model_alias"]) == (2, "alpha")


def test_a_get_with_autoload_loads_the_model_then_answers(router: MakeRouter, clock: Clock) -> None:
    """GET /slots?model=beta (autoload on) waits for beta's load, then answers its slots."""
    client = router()
    exchange = client.get("/slots?model=beta")
    assert exchange.response.status is None
    assert statuses(client)["beta"] == "loading"
    clock.advance(0.5)
    exchange.pump()
    assert exchange.response.status == 200
    assert len(exchange.response.json()) == 2
    assert statuses(client)["beta"] == "loaded"


# load and unload


def test_load_and_unload_answers_and_errors(router: MakeRouter, clock: Clock) -> None:
    """/models/load: 200 success then loading -> loaded; again 400 "already running";
    unknown 404 "File Not Found". /models/unload: 200 then unloaded; again 400
    "model is not running"; unknown 400 "model is not found"."""
    client = router()
    response = client.post("/models/load", {"model": "alpha"}).response
    assert (response.status, response.json()) == (200, {"success": True})
    assert statuses(client)["alpha"] == "loading"
    assert error(client.post("/models/load", {"model": "alpha"})) == (
        400, "invalid_request_error", "model is already running")
    clock.advance(0.5)
    assert statuses(client)["alpha"] == "loaded"
    assert error(client.post("/models/load", {"model": "nope"})) == (
        404, "not_found_error", "File Not Found")
    response = client.post("/models/unload", {"model": "alpha"}).response
    assert (response.status, response.json()) == (200, {"success": True})
    assert statuses(client)["alpha"] == "unloaded"
    assert error(client.post("/models/unload", {"model": "alpha"})) == (
        400, "invalid_request_error", "model is not running")
    assert error(client.post("/models/unload", {"model": "nope"})) == (
        400, "invalid_request_error", "model is not found")


def test_a_failed_load_shows_exit_code_and_fails_the_waiting_requests(
    router: MakeRouter, clock: Clock
) -> None:
    """A model set to fail goes loading -> unloaded with failed and exit_code; the two
    requests that waited for it get 500 "failed to load"; the other model still works."""
    client = router(failing={"beta": 3})
    waiting = [chat(client, "beta"), chat(client, "beta")]
    served = chat(client, "alpha")
    clock.advance(0.5)
    for exchange in waiting:
        exchange.pump()
        assert error(exchange) == (500, "server_error", "model name=beta failed to load")
    [beta] = [m for m in client.get("/models").response.json()["data"] if m["id"] == "beta"]
    assert beta["status"]["value"] == "unloaded"
    assert (beta["status"]["failed"], beta["status"]["exit_code"]) == (True, 3)
    clock.advance(1)
    served.pump()
    assert served.response.status == 200
    assert served.response.json()["model"] == "alpha"


# routing by model


def test_posts_go_to_the_named_models_own_slots(router: MakeRouter, clock: Clock) -> None:
    """Two clients per model, two models at once: each request runs in its model's slots
    (its /slots shows both busy), answers with its model's name, and the other model's
    slots are untouched until its own requests come."""
    client = router(slots=2)
    load(client, clock, "alpha")
    load(client, clock, "beta")
    alphas = [chat(client, "alpha", n=20), chat(client, "alpha", n=20)]
    betas = [chat(client, "beta", n=5), chat(client, "beta", n=5)]
    clock.advance(0.3)
    for name in ("alpha", "beta"):
        slots = client.get(f"/slots?model={name}&autoload=false").response.json()
        assert [s["is_processing"] for s in slots] == [True, True]
    clock.advance(0.5)
    for exchange in betas:
        exchange.pump()
        assert exchange.response.json()["model"] == "beta"
    assert all(exchange.response.status is None for exchange in alphas)
    slots = client.get("/slots?model=beta&autoload=false").response.json()
    assert [s["is_processing"] for s in slots] == [False, False]
    clock.advance(2)
    for exchange in alphas:
        exchange.pump()
        assert exchange.response.status == 200
        assert exchange.response.json()["model"] == "alpha"


def test_model_errors_of_post_requests(router: MakeRouter, clock: Clock) -> None:
    """No model: 400 "missing"; unknown model: 400 "model 'nope' not found"; without
    autoload an unloaded model: 400 "model is not loaded"."""
    client = router(autoload=False)
    assert error(chat(client, None)) == (
        400, "invalid_request_error", "model name is missing from the request")
    assert error(chat(client, "nope")) == (400, "invalid_request_error", "model 'nope' not found")
    assert error(chat(client, "alpha")) == (400, "invalid_request_error", "model is not loaded")
    assert error(client.post("/completion", {"prompt": "hi", "model": 7})) == (
        400, "invalid_request_error", "model name is missing from the request")
    assert statuses(client)["alpha"] == "unloaded"


def test_autoload_off_server_still_loads_with_autoload_true_in_the_query(
    router: MakeRouter, clock: Clock
) -> None:
    """?autoload=true overrides --no-models-autoload for one request."""
    client = router(autoload=False)
    exchange = client.get("/slots?model=gamma&autoload=true")
    clock.advance(0.5)
    exchange.pump()
    assert exchange.response.status == 200
    assert statuses(client)["gamma"] == "loaded"


# LRU eviction and the load queue


def test_a_third_model_evicts_the_least_recently_used_past_models_max(
    router: MakeRouter, clock: Clock
) -> None:
    """With models_max 2, alpha then beta loaded and beta used by a POST, a request for
    gamma unloads alpha (least recently used), loads gamma and is answered."""
    client = router(models_max=2)
    load(client, clock, "alpha")
    load(client, clock, "beta")
    clock.advance(1)
    used = chat(client, "alpha", n=1)
    clock.advance(1)
    used.pump()
    assert used.response.status == 200
    clock.advance(1)
    beta = chat(client, "beta", n=1)
    clock.advance(1)
    beta.pump()
    exchange = chat(client, "gamma", n=1)
    assert statuses(client) == {"alpha": "unloaded", "beta": "loaded", "gamma": "loading"}
    clock.advance(0.5)
    clock.advance(1)
    exchange.pump()
    assert exchange.response.status == 200
    assert statuses(client) == {"alpha": "unloaded", "beta": "loaded", "gamma": "loaded"}


def test_a_busy_model_is_not_evicted_the_request_waits_for_it_to_go_idle(
    router: MakeRouter, clock: Clock
) -> None:
    """models_max 1, alpha serving a request: a request for beta waits (alpha is not
    evicted mid-request); when alpha's request ends alpha goes and beta loads and answers."""
    client = router(models_max=1)
    load(client, clock, "alpha")
    busy = chat(client, "alpha", n=10)
    waiting = chat(client, "beta", n=1)
    clock.advance(0.5)
    assert statuses(client) == {"alpha": "loaded", "beta": "unloaded", "gamma": "unloaded"}
    clock.advance(0.6)
    busy.pump()
    assert busy.response.status == 200
    assert statuses(client)["beta"] == "loading"
    clock.advance(0.5)
    clock.advance(0.5)
    waiting.pump()
    assert waiting.response.status == 200
    assert statuses(client) == {"alpha": "unloaded", "beta": "loaded", "gamma": "unloaded"}


def test_a_client_that_leaves_the_queue_costs_no_eviction(router: MakeRouter, clock: Clock) -> None:
    """A request for beta queued behind busy alpha (models_max 1) that goes away is out of
    the queue: alpha stays loaded after its own request ends."""
    client = router(models_max=1)
    load(client, clock, "alpha")
    busy = chat(client, "alpha", n=5)
    waiting = chat(client, "beta", n=1)
    waiting.close()
    clock.advance(1)
    busy.pump()
    assert busy.response.status == 200
    clock.advance(2)
    assert statuses(client) == {"alpha": "loaded", "beta": "unloaded", "gamma": "unloaded"}


def test_two_requests_for_a_missing_model_share_one_load(router: MakeRouter, clock: Clock) -> None:
    """Two concurrent clients for gamma: one load, one eviction (of idle beta, not of alpha
    which serves a request), both answered."""
    client = router(models_max=2)
    load(client, clock, "alpha")
    load(client, clock, "beta")
    busy = chat(client, "alpha", n=20)
    waiters = [chat(client, "gamma", n=1), chat(client, "gamma", n=1)]
    clock.advance(0.5)
    clock.advance(1)
    for exchange in waiters:
        exchange.pump()
        assert exchange.response.status == 200
    site = client.site
    assert isinstance(site, RouterSite)
    assert site.router.models["gamma"].loads == 1
    assert statuses(client) == {"alpha": "loaded", "beta": "unloaded", "gamma": "loaded"}
    clock.advance(2)
    busy.pump()
    assert busy.response.status == 200


def test_unloading_a_model_cancels_its_running_request(router: MakeRouter, clock: Clock) -> None:
    """/models/unload of a model serving a stream ends that stream (its child is gone)."""
    client = router()
    load(client, clock, "alpha")
    stream = chat(client, "alpha", n=50, stream=True)
    clock.advance(0.5)
    assert client.post("/models/unload", {"model": "alpha"}).response.status == 200
    assert stream.transport.disconnecting


# SSE


def test_models_sse_streams_status_events(router: MakeRouter, clock: Clock) -> None:
    """GET /models/sse: a load gives model_status loading then status_change loaded; an
    unload status_change unloaded with exit_code 0; a failed load exit_code N."""
    client = router(failing={"gamma": 2})
    events = client.get("/models/sse")
    assert events.response.status == 200
    assert events.response.header("content-type") == "text/event-stream"
    load(client, clock, "alpha")
    client.post("/models/unload", {"model": "alpha"})
    client.post("/models/load", {"model": "gamma"})
    clock.advance(0.5)
    events.pump()
    seen = [(e["model"], e["event"], e["data"]["status"], e["data"].get("exit_code"))
            for e in events.response.sse_json()]
    assert seen == [
        ("alpha", "model_status", "loading", None),
        ("alpha", "status_change", "loaded", None),
        ("alpha", "status_change", "unloaded", 0),
        ("gamma", "model_status", "loading", None),
        ("gamma", "status_change", "unloaded", 2),
    ]


def test_api_key_guards_everything_but_health(router: MakeRouter) -> None:
    """With an API key, /models and /slots are 401 without it, /health is not."""
    client = router(api_key="k")
    assert client.get("/health").response.status == 200
    assert client.get("/models").response.status == 401
    ok = client.get("/models", headers={"Authorization": "Bearer k"}).response
    assert ok.status == 200


def test_option_parsers_refuse_bad_lists() -> None:
    """--models and --models-fail-load say what is wrong with a bad value."""
    assert parse_models("alpha, beta") == ("alpha", "beta")
    assert parse_failing("beta=1,gamma=137") == {"beta": 1, "gamma": 137}
    for bad in ("alpha,,beta", "alpha,alpha"):
        with pytest.raises(ValueError):
            parse_models(bad)
    for bad in ("beta", "beta=0", "=1", "beta=x"):
        with pytest.raises(ValueError):
            parse_failing(bad)


def test_stopping_answers_waiting_requests_and_ends_sse_streams(router: MakeRouter, clock: Clock) -> None:
    """A router that stops answers the requests waiting for a load 503 and ends /models/sse."""
    client = router(models_max=1)
    load(client, clock, "alpha")
    busy = chat(client, "alpha", n=50)
    waiting = chat(client, "beta")  # queued: alpha is busy
    events = client.get("/models/sse")
    site = client.site
    assert isinstance(site, RouterSite)
    site.router.stop()
    waiting.pump()
    assert error(waiting) == (503, "unavailable_error", "Server is shutting down")
    events.pump()
    assert events.response.complete
    assert busy.transport.disconnecting  # its model was unloaded: the connection is dropped


# sleeping (--sleep-idle-seconds)


def test_an_idle_model_sleeps_and_props_metrics_and_models_neither_wake_it(
    router: MakeRouter, clock: Clock
) -> None:
    """With sleep_idle_seconds 5, alpha loaded and idle for 5 s is ``sleeping`` in /models; it
    keeps its place (beta, loaded next, is the second of models_max 2); /props?model=alpha
    says is_sleeping true, and /props, /metrics and /models asked every second for 10 s
    neither wake it nor (once awake) keep it awake."""
    client = router(models_max=2, sleep_idle_seconds=5.0)
    load(client, clock, "alpha")
    clock.advance(4.9)
    assert statuses(client)["alpha"] == "loaded"
    clock.advance(0.1)
    assert statuses(client)["alpha"] == "sleeping"
    props = client.get("/props?model=alpha").response
    assert props.status == 200 and props.json()["is_sleeping"] is True
    for _ in range(10):
        clock.advance(1.0)
        assert client.get("/metrics?model=alpha").response.status == 200
        assert client.get("/props?model=alpha").response.status == 200
    assert statuses(client)["alpha"] == "sleeping"
    load(client, clock, "beta")
    assert statuses(client) == {"alpha": "sleeping", "beta": "loaded", "gamma": "unloaded"}
    site = client.site
    assert isinstance(site, RouterSite)
    assert site.router.models["alpha"].sleeps == 1 and site.router.models["alpha"].wakes == 0


def test_a_request_wakes_a_sleeping_model_in_its_load_time(router: MakeRouter, clock: Clock) -> None:
    """A chat for sleeping alpha waits the load time (0.5 s), with /models saying sleeping
    (never loading) meanwhile, then is answered by alpha; alpha is loaded again and sleeps
    again 5 s after its last task."""
    client = router(sleep_idle_seconds=5.0)
    load(client, clock, "alpha")
    clock.advance(5.0)
    exchange = chat(client, "alpha")
    assert exchange.response.status is None
    clock.advance(0.4)
    assert statuses(client)["alpha"] == "sleeping"
    clock.advance(0.1)
    assert statuses(client)["alpha"] == "loaded"
    clock.advance(2.0)
    exchange.pump()
    assert exchange.response.status == 200 and exchange.response.json()["model"] == "alpha"
    clock.advance(5.0)
    assert statuses(client)["alpha"] == "sleeping"


def test_a_slots_probe_wakes_a_sleeping_model_and_keeps_it_awake(router: MakeRouter, clock: Clock) -> None:
    """GET /slots?model=alpha&autoload=false is a task (as in llama.cpp): on a sleeping model it
    wakes it (answered after the load time); asked every 2 s it never lets alpha sleep."""
    client = router(sleep_idle_seconds=5.0)
    load(client, clock, "alpha")
    clock.advance(5.0)
    probe = client.get("/slots?model=alpha&autoload=false")
    assert probe.response.status is None
    clock.advance(0.5)
    probe.pump()
    assert probe.response.status == 200 and len(probe.response.json()) == 2
    for _ in range(10):
        clock.advance(2.0)
        assert client.get("/slots?model=alpha&autoload=false").response.status == 200
        assert statuses(client)["alpha"] == "loaded"


def test_a_sleeping_model_can_be_evicted_or_unloaded_and_a_busy_one_never_sleeps(
    router: MakeRouter, clock: Clock
) -> None:
    """A sleeping model is evicted like a loaded one (LRU past models_max) and unloaded by
    /models/unload; a model serving a request longer than the idle time does not sleep while
    it serves (its timer starts again when the request ends). SSE: status_change sleeping,
    then loaded (with no info) on a wake-up."""
    client = router(models_max=1, sleep_idle_seconds=1.0)
    events = client.get("/models/sse")
    load(client, clock, "alpha")
    clock.advance(1.0)
    assert statuses(client)["alpha"] == "sleeping"
    load(client, clock, "beta")  # evicts the sleeping alpha
    assert statuses(client) == {"alpha": "unloaded", "beta": "loaded", "gamma": "unloaded"}
    long = chat(client, "beta", n=30)  # 3 s at 10 tokens/s
    clock.advance(2.5)
    assert statuses(client)["beta"] == "loaded"
    clock.advance(1.0)
    long.pump()
    assert long.response.status == 200
    clock.advance(1.0)
    assert statuses(client)["beta"] == "sleeping"
    woke = chat(client, "beta")
    clock.advance(0.5)
    clock.advance(1.0)
    woke.pump()
    assert woke.response.status == 200
    assert client.post("/models/unload", {"model": "beta"}).response.status == 200
    assert statuses(client)["beta"] == "unloaded"
    events.pump()
    seen = [(e["model"], e["data"]["status"], "info" in e["data"]) for e in events.response.sse_json()
            if e["event"] == "status_change"]
    assert seen == [
        ("alpha", "loaded", True), ("alpha", "sleeping", False), ("alpha", "unloaded", False),
        ("beta", "loaded", True), ("beta", "sleeping", False), ("beta", "loaded", False),
        ("beta", "unloaded", False),
    ]
