"""End to end: two balancer processes sharing a real redis-server (--state), each with
--model-placement, in front of two router-mode simulators that do not autoload (alpha, beta,
gamma; --models-max 2). Requests for models loaded nowhere arrive at both balancers at once:
each model is loaded exactly once, nothing is evicted, every request is answered by its model."""

from __future__ import annotations

from typing import Any

import pytest

from tests.llamacpp.clients import Background, get_json, post, wait_for

pytestmark = pytest.mark.integration

CHAT = [{"role": "user", "content": "Say hello."}]


def chat(url: str, model: str) -> Any:
    return post(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "model": model})


def model_states(upstream: str) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in get_json(upstream, "/models")["data"]}


def test_two_balancers_load_each_waiting_model_once(procs, redis_server, prefix) -> None:
    """Two clients per model (beta, gamma) at each of two balancers, at once, nothing loaded:
    one load of beta and one of gamma in the whole fleet (both balancers' event logs and the
    routers' /models agree), no eviction, all eight requests 200 from their model."""
    routers = [procs.simulator(2, 400.0, "--models", "alpha,beta,gamma", "--models-max", "2",
                               "--model-load-seconds", "1.5", "--no-models-autoload")[1] for _ in range(2)]
    state = ["--state", redis_server.url, "--state-prefix", prefix, "--probe-interval", "0.2",
             "--buffered-request-timeout", "60", "--model-placement"]
    upstreams = [arg for i, url in enumerate(routers) for arg in ("--upstream", f"gpu-{i + 1}={url}")]
    balancers = [procs.balancer(*state, *upstreams), procs.balancer(*state, *upstreams)]
    for _, proxy, _ in balancers:
        wait_for(lambda proxy=proxy: get_json(proxy, "/health")["upstreams"]["total"] >= 8, 30,
                 f"{proxy} knows both routers and their models")
    calls = [(model, Background(lambda proxy=proxy, model=model: chat(proxy, model)))
             for model in ("beta", "gamma") for _, proxy, _ in balancers for _ in range(2)]
    for model, call in calls:
        reply = call.result(60)
        assert reply.status == 200, reply
        assert reply.json()["model"] == model
    states = [model_states(url) for url in routers]
    for model in ("beta", "gamma"):
        assert sum(1 for s in states if s[model] == "loaded") == 1, states

    def loads() -> list[dict[str, Any]]:
        return [e for _, _, management in balancers
                for e in get_json(management, "/api/v1/state")["events"] if e["kind"] == "model_load"]

    wait_for(lambda: len(loads()) >= 2, 10, "the loads in the event logs")
    made = loads()
    assert sorted(e["model"] for e in made) == ["beta", "gamma"], made
    assert all(e["outcome"] == "loaded" and not e.get("evicted") for e in made), made
