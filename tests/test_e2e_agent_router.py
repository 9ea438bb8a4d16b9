"""End to end, real processes: two ``paddler agent``s beside two router-mode simulators
(``paddler simulate --models a,b --models-max 1``) and one balancer. The agents' reports make
the per-(router, model) upstreams, requests are routed by model, and killing an agent makes
its router and its models' upstreams expire while the other host keeps serving."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from paddler.fleet.routers import child_id
from paddler.fleet.upstream import upstream_id

from .processes import Processes, get_json, wait_for
from .test_e2e_fleet import agent, call

pytestmark = pytest.mark.integration


def upstreams(management: str) -> dict[str, dict[str, Any]]:
    status, body = get_json(management + "/api/v1/upstreams")
    assert status == 200, body
    return {u["id"]: u for u in body["upstreams"]}


def chat(proxy: str, model: str) -> tuple[int, Any]:
    return call("POST", proxy + "/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, timeout=20)


def test_two_agents_of_router_mode_servers_route_by_model_and_expire_with_their_agent(procs: Processes) -> None:
    _, proxy, management = procs.balancer("--agent-expiry", "1")
    servers = [procs.simulator(2, 200.0, "--models", "a,b", "--models-max", "1",
                               "--model-load-seconds", "0.2")[1] for _ in range(2)]
    runners = [agent(procs, server, management, f"gpu-{i + 1}") for i, server in enumerate(servers)]
    wanted = {upstream_id(s) for s in servers} | {child_id(s, m) for s in servers for m in ("a", "b")}
    wait_for(lambda: wanted <= set(upstreams(management)), deadline=15, what="routers and their models")
    fleet = upstreams(management)
    for server in servers:
        router = fleet[upstream_id(server)]
        assert (router["source"], router["role"]) == ("agent", "router")
        assert fleet[child_id(server, "a")]["parent_id"] == router["id"]
    for model in ("a", "b", "a", "b"):
        status, body = chat(proxy, model)
        assert status == 200, body
    status, body = chat(proxy, "nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, listed = get_json(proxy + "/v1/models")
    assert status == 200 and sorted(m["id"] for m in listed["data"]) == ["a", "b"]
    runners[1].stop(signal.SIGKILL)
    gone = {upstream_id(servers[1])} | {child_id(servers[1], m) for m in ("a", "b")}
    wait_for(lambda: not gone & set(upstreams(management)), deadline=10, what="the silent agent's expiry")
    assert {upstream_id(servers[0]), child_id(servers[0], "a"), child_id(servers[0], "b")} <= set(
        upstreams(management))
    for model in ("a", "b"):
        status, body = chat(proxy, model)
        assert status == 200, body
