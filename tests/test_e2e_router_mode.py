"""End to end: a balancer in front of router-mode llama-servers (simulated, real processes on 127.0.0.1).

Two router-mode simulators (alpha, beta, gamma; --models-max 2), and a mixed
fleet of one router-mode and one single-model simulator: requests are routed
by model, unknown and missing models get clear errors, ``/v1/models`` is the
fleet's, and the OpenAI SDK lists it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.llamacpp.clients import Background, get, get_json, post, wait_for

from .processes import Processes

pytestmark = pytest.mark.integration

CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def procs(tmp_path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def router_sim(procs: Processes, *extra: str) -> str:
    _, url = procs.simulator(
        2, 400.0, "--models", "alpha,beta,gamma", "--models-max", "2", "--model-load-seconds", "0.2", *extra
    )
    return url


def chat(url: str, model: str | None, n: int = 4, **extra: Any) -> Any:
    body: dict[str, Any] = {"messages": CHAT, "max_tokens": n, **extra}
    if model is not None:
        body["model"] = model
    return post(url, "/v1/chat/completions", body)


def model_states(upstream: str) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in get_json(upstream, "/models")["data"]}


@pytest.mark.parametrize("policy", ["cache-aware", "slots", "cost"])
def test_two_router_mode_upstreams_route_by_model(procs: Processes, policy: str) -> None:
    """Two router-mode simulators behind one balancer (every policy, the default cache-aware
    too): the balancer finds them healthy (no longer "unreachable"), two concurrent clients per model for two models are all
    answered by their model, a request without model is 400, an unknown model 404
    model_not_found, and a probe never loads a model (gamma stays unloaded everywhere)."""
    first, second = router_sim(procs), router_sim(procs)
    _, proxy, management = procs.balancer(
        "--upstream", first, "--upstream", second, "--probe-interval", "0.2", "--policy", policy)
    wait_for(lambda: get_json(proxy, "/health")["upstreams"]["healthy"] >= 6, 20,
             "6 model upstreams healthy")
    assert set(model_states(first).values()) == {"unloaded"}
    assert set(model_states(second).values()) == {"unloaded"}
    calls = [Background(lambda m=m: chat(proxy, m)) for m in ("alpha", "beta", "alpha", "beta")]
    for call, model in zip(calls, ("alpha", "beta", "alpha", "beta")):
        reply = call.result(30)
        assert reply.status == 200, reply
        assert reply.json()["model"] == model
    missing = chat(proxy, None)
    assert missing.status == 400, missing
    assert missing.json()["error"]["param"] == "model"
    unknown = chat(proxy, "nope")
    assert unknown.status == 404, unknown
    error = unknown.json()["error"]
    assert (error["code"], error["type"]) == ("model_not_found", "invalid_request_error")
    assert "alpha" not in error["message"]
    assert "gamma" in model_states(first) and model_states(first)["gamma"] == "unloaded"
    assert model_states(second)["gamma"] == "unloaded"


def test_fleet_models_list_is_the_union_and_the_openai_sdk_reads_it(procs: Processes) -> None:
    """A mixed fleet (one router-mode simulator with alpha, beta, gamma; one single-model
    simulator serving delta): /v1/models lists alpha, beta, gamma, delta once each with a
    fleet-wide status; client.models.list() of the openai SDK reads it; requests for delta
    go to the single-model server and requests for beta to the router."""
    openai = pytest.importorskip("openai")
    router = router_sim(procs)
    _, single = procs.simulator(2, 400.0, "--model", "delta")
    _, proxy, _ = procs.balancer("--upstream", router, "--upstream", single, "--probe-interval", "0.2")
    wait_for(lambda: get_json(proxy, "/health")["upstreams"]["healthy"] >= 4, 20, "4 upstreams healthy")
    body = get_json(proxy, "/v1/models")
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["alpha", "beta", "delta", "gamma"]
    statuses = {m["id"]: m["status"]["value"] for m in body["data"]}
    assert statuses == {"alpha": "unloaded", "beta": "unloaded", "delta": "loaded", "gamma": "unloaded"}
    assert chat(proxy, "beta").json()["model"] == "beta"
    wait_for(lambda: {m["id"]: m["status"]["value"] for m in get_json(proxy, "/models")["data"]}["beta"]
             == "loaded", 10, "the fleet sees beta loaded")
    for _ in range(2):
        reply = chat(proxy, "delta")
        assert reply.status == 200 and reply.json()["model"] == "delta"
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0)
    listed = client.models.list()
    assert sorted(m.id for m in listed.data) == ["alpha", "beta", "delta", "gamma"]
    loaded = [m for m in body["data"] if m["id"] == "delta"][0]["status"]["loaded"]
    assert loaded == 1


def test_model_alias_and_default_model(procs: Processes) -> None:
    """--model-alias fast=beta: a request for "fast" is served by beta (the body upstream says
    beta); --default-model alpha: a request without model goes to alpha."""
    router = router_sim(procs)
    _, proxy, _ = procs.balancer(
        "--upstream", router, "--probe-interval", "0.2", "--model-alias", "fast=beta",
        "--default-model", "alpha")
    wait_for(lambda: get_json(proxy, "/health")["upstreams"]["healthy"] >= 3, 20, "3 upstreams healthy")
    assert chat(proxy, "fast").json()["model"] == "beta"
    assert chat(proxy, None).json()["model"] == "alpha"


def test_slots_and_props_with_a_model_query_reach_that_model(procs: Processes) -> None:
    """GET /props?model=gamma through the balancer is gamma's own /props (it has total_slots)."""
    router = router_sim(procs)
    _, proxy, _ = procs.balancer("--upstream", router, "--probe-interval", "0.2")
    wait_for(lambda: get_json(proxy, "/health")["upstreams"]["healthy"] >= 3, 20, "3 upstreams healthy")
    reply = get(proxy, "/props?model=gamma")
    assert reply.status == 200, reply
    assert json.loads(reply.body)["total_slots"] == 2
    assert get(proxy, "/props?model=nope").status == 404


def test_placement_loads_a_waiting_model_on_one_router(procs: Processes) -> None:
    """--model-placement with two routers that do not autoload: two concurrent clients for
    beta wait while paddler loads beta on one router (POST /models/load), then both are served
    there; the event log says "loaded beta on ..." and paddler_model_loads_total counts it."""
    first = router_sim(procs, "--no-models-autoload")
    second = router_sim(procs, "--no-models-autoload")
    _, proxy, management = procs.balancer(
        "--upstream", first, "--upstream", second, "--probe-interval", "0.2", "--model-placement")
    wait_for(lambda: get_json(proxy, "/health")["upstreams"]["total"] >= 8, 20, "8 upstreams known")
    calls = [Background(lambda: chat(proxy, "beta")) for _ in range(2)]
    for call in calls:
        reply = call.result(30)
        assert reply.status == 200, reply
        assert reply.json()["model"] == "beta"
    where = [url for url in (first, second) if model_states(url)["beta"] == "loaded"]
    assert len(where) == 1
    def loads() -> list[dict[str, Any]]:
        return [e for e in get_json(management, "/api/v1/state")["events"] if e["kind"] == "model_load"]

    # the requests may be served by the probe that saw beta loaded, just before placement's own check
    [load] = wait_for(loads, 10, "the load in the event log")
    assert load["outcome"] == "loaded" and load["text"].startswith("loaded beta on ")
    metrics = get(management, "/metrics").body.decode()
    assert 'paddler_model_loads_total{model="beta"' in metrics


def test_management_api_lists_loads_and_unloads_models(procs: Processes) -> None:
    """GET /api/v1/models is the fleet's model list; POST /api/v1/upstreams/{router}/models/load
    loads a model on that router (and the answer's upstream shows it), unload unloads it;
    a second load is 409 with the router's reason, an unknown model 404, a single-model
    upstream 400; pin and unpin mark a model on a router (by the router or the model upstream)."""
    router = router_sim(procs)
    _, single = procs.simulator(2, 400.0, "--model", "delta")
    _, proxy, management = procs.balancer(
        "--upstream", f"gpu-1={router}", "--upstream", f"solo={single}", "--probe-interval", "0.2")
    wait_for(lambda: get_json(proxy, "/health")["upstreams"]["healthy"] >= 4, 20, "4 upstreams healthy")
    assert [m["id"] for m in get_json(management, "/api/v1/models")["data"]] == ["alpha", "beta", "delta", "gamma"]
    reply = post(management, "/api/v1/upstreams/gpu-1/models/load", {"model": "gamma"})
    assert reply.status == 200, reply
    assert reply.json()["success"] is True and reply.json()["upstream"]["role"] == "router"
    wait_for(lambda: model_states(router)["gamma"] == "loaded", 10, "gamma loaded")
    again = post(management, "/api/v1/upstreams/gpu-1/models/load", {"model": "gamma"})
    assert again.status == 409 and "already running" in again.json()["error"]["message"]
    assert post(management, "/api/v1/upstreams/gpu-1/models/load", {"model": "nope"}).status == 404
    assert post(management, "/api/v1/upstreams/solo/models/load", {"model": "delta"}).status == 400
    assert post(management, "/api/v1/upstreams/gpu-1/models/load", {"modle": "gamma"}).status == 400
    reply = post(management, "/api/v1/upstreams/gpu-1/models/unload", {"model": "gamma"})
    assert reply.status == 200, reply
    assert model_states(router)["gamma"] == "unloaded"
    pinned = post(management, "/api/v1/upstreams/gpu-1/models/pin", {"model": "alpha"})
    assert pinned.status == 200 and pinned.json()["pinned"] is True and pinned.json()["name"] == "gpu-1/alpha"
    unpinned = post(management, "/api/v1/upstreams/gpu-1%2Falpha/models/unpin", {"model": "alpha"})
    assert unpinned.status == 200 and unpinned.json()["pinned"] is False


def test_a_model_that_fails_to_load_on_one_router_is_served_by_the_other(procs: Processes) -> None:
    """beta fails to load on the first router (exit code 3) and loads on the second: every
    request for beta is answered 200 (a "failed to load" answer is retried on the other copy),
    and the first router's beta is then failed and takes no request."""
    broken = router_sim(procs, "--models-fail-load", "beta=3", "--slots", "4")
    good = router_sim(procs)
    _, proxy, management = procs.balancer(
        "--upstream", f"broken={broken}", "--upstream", f"good={good}", "--probe-interval", "0.2")
    wait_for(lambda: get_json(proxy, "/health")["upstreams"]["healthy"] >= 6, 20, "6 upstreams healthy")
    # gamma loaded on the broken router: its unloaded models count 4 slots, the good one's 1,
    # so the first request for beta goes to the broken router
    assert post(broken, "/models/load", {"model": "gamma"}).status == 200
    wait_for(lambda: get_json(proxy, "/health")["models"]["gamma"]["slots_idle"] == 4, 10, "gamma seen loaded")
    for _ in range(4):
        reply = chat(proxy, "beta")
        assert reply.status == 200, reply
    def beta_states() -> tuple[str, str]:
        upstreams = {u["name"]: u for u in get_json(management, "/api/v1/upstreams")["upstreams"]}
        return upstreams["good/beta"]["model_state"], upstreams["broken/beta"]["model_state"]

    wait_for(lambda: beta_states() == ("loaded", "failed"), 10, "beta loaded on good, failed on broken")
    [entry] = [m for m in get_json(broken, "/models")["data"] if m["id"] == "beta"]
    assert entry["status"]["exit_code"] == 3


def test_a_router_killed_mid_load_the_request_is_served_by_the_other_and_it_comes_back(
    procs: Processes,
) -> None:
    """beta takes 2 s to load; the first router (chosen: its models count more slots) is killed
    (SIGKILL) while it loads beta for a request: that request, which reached it, is a 502 (a
    request is never sent twice); the next one is served by the second router; the first,
    started again on its port, is a router again with its models unloaded."""
    import signal
    from urllib.parse import urlsplit

    first_process, first = procs.simulator(
        4, 400.0, "--models", "alpha,beta,gamma", "--models-max", "2", "--model-load-seconds", "2")
    _, second = procs.simulator(
        2, 400.0, "--models", "alpha,beta,gamma", "--models-max", "2", "--model-load-seconds", "2")
    _, proxy, management = procs.balancer(
        "--upstream", f"first={first}", "--upstream", f"second={second}", "--probe-interval", "0.2")
    wait_for(lambda: get_json(proxy, "/health")["upstreams"]["healthy"] >= 6, 20, "6 upstreams healthy")
    assert post(first, "/models/load", {"model": "gamma"}).status == 200
    wait_for(lambda: get_json(proxy, "/health")["models"]["gamma"]["slots_idle"] == 4, 10, "gamma seen loaded")
    waiting = Background(lambda: chat(proxy, "beta"))
    wait_for(lambda: model_states(first)["beta"] == "loading", 10, "beta loading on the first router")
    first_process.stop(signal.SIGKILL)
    # the request reached the killed router (it may have run there): 502, never sent twice
    reply = waiting.result(30)
    assert reply.status == 502, reply
    reply = chat(proxy, "beta")
    assert reply.status == 200, reply
    assert model_states(second)["beta"] == "loaded"
    port = urlsplit(first).port
    procs.start("simulate", "--listen", f"tcp:{port}:interface=127.0.0.1", "--slots", "4",
                "--models", "alpha,beta,gamma", "--models-max", "2", name="simulate")

    def first_back() -> bool:
        upstreams = {u["name"]: u for u in get_json(management, "/api/v1/upstreams")["upstreams"]}
        return (upstreams["first"]["state"] == "healthy" and upstreams["first"]["role"] == "router"
                and upstreams["first/beta"]["model_state"] == "unloaded")

    wait_for(first_back, 20, "the first router back, beta unloaded there")


def test_router_management_of_models_the_fleet_does_not_list_goes_to_a_router(procs: Processes) -> None:
    """Two router-mode simulators: ``POST /models/load`` and ``/models/unload`` naming a model no router
    lists get the router's own answer (llama.cpp's router decides: a download, a file not rescanned
    yet), not the balancer's OpenAI-style 404; ``GET /models?reload=1`` is the router's own answer
    too (it rescans its models), while a plain ``/models`` stays the fleet's."""
    first, second = router_sim(procs), router_sim(procs)
    _, proxy, _ = procs.balancer("--upstream", first, "--upstream", second, "--probe-interval", "0.2")
    wait_for(lambda: get_json(proxy, "/health")["upstreams"]["healthy"] >= 6, 20, "6 model upstreams healthy")
    for path in ("/models/load", "/models/unload"):
        direct = post(first, path, {"model": "nope"})
        through = post(proxy, path, {"model": "nope"})
        assert (through.status, through.body) == (direct.status, direct.body), (path, through)
    # a chat for an unknown model is still the balancer's 404 model_not_found
    unknown = chat(proxy, "nope")
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "model_not_found"
    reloaded = get_json(proxy, "/models?reload=1")
    assert reloaded == get_json(first, "/models?reload=1") or reloaded == get_json(second, "/models?reload=1")
    fleet = get_json(proxy, "/models")
    assert {m["id"] for m in fleet["data"]} == {"alpha", "beta", "gamma"}


@pytest.mark.parametrize("events", [True, False])
def test_a_load_made_on_the_router_is_noticed_from_its_event_stream(procs: Processes, events: bool) -> None:
    """A router without autoload, read only every 20 s (--probe-interval 20): a request for
    beta waits in the buffer; beta is then loaded on the router directly (an operator).
    Following /models/sse the balancer reads the router as the load ends and the request is
    answered within seconds; with --no-router-events it waits for the next probe (the check
    that the test can fail: the answer is not there after those seconds)."""
    router = router_sim(procs, "--no-models-autoload")
    flags = [] if events else ["--no-router-events"]
    _, proxy, _ = procs.balancer("--upstream", router, "--probe-interval", "20",
                                 "--buffered-request-timeout", "60", *flags)
    wait_for(lambda: get(proxy, "/health").json()["upstreams"]["total"] >= 4, 30, "the router's models")
    call = Background(lambda: chat(proxy, "beta"))
    wait_for(lambda: get(proxy, "/health").json()["requests_buffered"] >= 1, 10, "the request buffered")
    assert post(router, "/models/load", {"model": "beta"}).status == 200
    if events:
        reply = call.result(8)
        assert reply.status == 200 and reply.json()["model"] == "beta", reply
    else:
        with pytest.raises(AssertionError, match="not finished"):
            call.result(8)
        reply = call.result(40)
        assert reply.status == 200
