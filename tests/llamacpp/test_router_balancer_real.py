"""End to end: the balancer as a real process in front of two real llama-servers in router mode.

Each server has alpha, beta and gamma (copies of the tiny model) and
``--models-max 2``; the balancer probes them (never loading a model by
probing), routes by model, answers ``/v1/models`` for the fleet and refuses
unknown and missing models.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.llamacpp.clients import Background, get_json, post, wait_for
from tests.processes import Processes

pytestmark = pytest.mark.llamacpp

CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def procs(tmp_path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def states(url: str) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in get_json(url, "/models")["data"]}


def chat(url: str, model: str | None, n: int = 4) -> Any:
    body: dict[str, Any] = {"messages": CHAT, "max_tokens": n}
    if model is not None:
        body["model"] = model
    return post(url, "/v1/chat/completions", body, timeout=60)


def test_two_real_routers_behind_the_balancer(start_llama_router, procs: Processes) -> None:
    """Two real router-mode llama-servers: the balancer sees 6 (router, model) upstreams
    healthy without loading any model; two concurrent clients for alpha and two for beta are
    answered by their models; /v1/models lists alpha, beta, gamma once each with beta and
    alpha loaded somewhere; a request without model is 400, an unknown model 404."""
    first, second = start_llama_router(), start_llama_router()
    _, proxy, _ = procs.balancer("--upstream", first, "--upstream", second, "--probe-interval", "0.2")
    wait_for(lambda: get_json(proxy, "/health")["upstreams"]["healthy"] >= 6, 30, "6 upstreams healthy")
    for url in (first, second):
        assert set(states(url).values()) == {"unloaded"}, "a probe loaded a model"
    calls = [Background(lambda m=m: chat(proxy, m)) for m in ("alpha", "beta", "alpha", "beta")]
    for call in calls:
        reply = call.result(90)
        assert reply.status == 200, reply
    loaded = {name for url in (first, second) for name, state in states(url).items() if state == "loaded"}
    assert {"alpha", "beta"} <= loaded
    assert all(state == "unloaded" for url in (first, second) for name, state in states(url).items()
               if name == "gamma")

    def fleet_states() -> dict[str, str]:
        return {m["id"]: m["status"]["value"] for m in get_json(proxy, "/v1/models")["data"]}

    wait_for(lambda: fleet_states() == {"alpha": "loaded", "beta": "loaded", "gamma": "unloaded"},
             10, "the fleet's /v1/models")
    missing = chat(proxy, None)
    assert missing.status == 400, missing
    unknown = chat(proxy, "nope")
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_placement_on_real_routers_without_autoload(start_llama_router, procs: Processes) -> None:
    """Two real routers with --no-models-autoload and --models-max 1, the balancer with
    --model-placement: two concurrent clients for beta wait while paddler loads beta on one
    router, then both are answered; a request for gamma then loads gamma (on the router with
    room, or evicting beta once idle past the residency); the loads are in the event log."""
    first = start_llama_router(models_max=1, extra_args=["--no-models-autoload"])
    second = start_llama_router(models_max=1, extra_args=["--no-models-autoload"])
    _, proxy, management = procs.balancer(
        "--upstream", first, "--upstream", second, "--probe-interval", "0.2", "--model-placement",
        "--model-min-residency", "0")
    wait_for(lambda: get_json(proxy, "/health")["upstreams"]["total"] >= 8, 30, "8 upstreams known")
    calls = [Background(lambda: chat(proxy, "beta")) for _ in range(2)]
    for call in calls:
        reply = call.result(90)
        assert reply.status == 200, reply
    assert sum(states(url)["beta"] == "loaded" for url in (first, second)) == 1
    reply = chat(proxy, "gamma")
    assert reply.status == 200, reply
    assert sum(states(url)["gamma"] == "loaded" for url in (first, second)) == 1
    def loads() -> list[tuple[str, str]]:
        events = get_json(management, "/api/v1/state")["events"]
        return [(e["model"], e["outcome"]) for e in events if e["kind"] == "model_load"]

    # the request may be served by the probe that saw gamma loaded, just before placement's own check
    wait_for(lambda: loads() == [("beta", "loaded"), ("gamma", "loaded")], 10, "both loads in the event log")
