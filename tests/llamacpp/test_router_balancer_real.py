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
