"""End to end, real processes on 127.0.0.1: two simulators behind two real agents, one balancer,
and a script playing the attacker; then a fleet where nothing is healthy."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any
from urllib.parse import urlsplit

import pytest

from .processes import free_port, get_json, wait_for
from .test_e2e_balancer import post

pytestmark = pytest.mark.integration


def call(base: str, method: str, path: str, payload: Any = None, token: str | None = None,
         timeout: float = 10.0) -> tuple[int, Any, dict[str, str]]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, None if payload is None else json.dumps(payload), headers)
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else None, dict(response.getheaders())
    finally:
        conn.close()


def test_two_real_agents_an_attacker_a_self_alias_and_the_metadata_address(procs):
    sims = [procs.simulator(slots=2)[1] for _ in range(2)]
    balancer, proxy, management = procs.balancer("--agent-expiry", "3", "--probe-interval", "0.25")
    for i, sim in enumerate(sims):
        procs.start("agent", "--llamacpp", sim, "--balancer", management, "--name", f"gpu-{i + 1}",
                    "--interval", "0.2", name=f"agent-{i}")
    wait_for(lambda: sum(u["state"] == "healthy" for u in get_json(management + "/api/v1/upstreams")[1]["upstreams"]) == 2,
             30, "both agents' hosts healthy")
    fleet = get_json(management + "/api/v1/upstreams")[1]["upstreams"]
    victim = next(u for u in fleet if u["name"] == "gpu-1")
    lie = {"name": "gpu-1", "url": victim["url"], "slots_idle": 50, "slots_processing": 0}
    # the attacker knows the id (it is listed) but has no token, or a forged one
    for token in (None, "forged-token"):
        status, body, _ = call(management, "POST", f"/api/v1/agents/{victim['id']}/report", lie, token)
        assert status == 401 and body["error"]["param"] == "authorization", body
    # nor can it take the id over while the real agent reports
    status, body, _ = call(management, "POST", "/api/v1/agents",
                           {"agent_id": victim["id"], "url": victim["url"], "name": "gpu-1"})
    assert status == 409, body
    assert get_json(management + "/api/v1/upstreams/" + victim["id"])[1]["slots_total"] == 2
    # the proxy port under other spellings, the management port, the metadata address
    port = urlsplit(proxy).port
    for url in (f"http://127.1:{port}", f"http://[::ffff:127.0.0.1]:{port}", f"http://2130706433:{port}",
                f"http://localhost:{urlsplit(management).port}"):
        for path, payload in (("/api/v1/upstreams", {"url": url, "name": "me"}),
                              ("/api/v1/agents", {"agent_id": "me", "url": url, "name": "me"})):
            status, body, _ = call(management, "POST", path, payload)
            assert status == 400 and "this balancer itself" in body["error"]["message"], (url, body)
    for url in ("http://169.254.169.254", "http://[fd00:ec2::254]", "http://[::ffff:169.254.169.254]"):
        status, body, _ = call(management, "POST", "/api/v1/upstreams", {"url": url, "name": "meta"})
        assert status == 403 and "--allow-upstream-network" in body["error"]["message"], body
    assert len(get_json(management + "/api/v1/upstreams")[1]["upstreams"]) == 2
    # requests are spread over both servers (no lie pulled them to one)
    statuses = [post(proxy, "/completion", {"prompt": f"p{i}", "n_predict": 2})[0] for i in range(6)]
    assert statuses == [200] * 6
    served = {u["name"]: u["requests_served"] for u in get_json(management + "/api/v1/upstreams")[1]["upstreams"]}
    assert all(count > 0 for count in served.values()), served
    assert "Traceback" not in balancer.log()


def test_nothing_healthy_answers_503_saying_why_after_the_short_timeout(procs):
    dead = [free_port(), free_port()]  # nothing listens there
    balancer, proxy, management = procs.balancer(
        "--upstream", f"gpu-1=http://127.0.0.1:{dead[0]}", "--upstream", f"gpu-2=http://127.0.0.1:{dead[1]}",
        "--probe-interval", "0.2", "--unhealthy-after", "1",
    )
    wait_for(lambda: all(u["state"] == "unreachable" for u in get_json(management + "/api/v1/upstreams")[1]["upstreams"]),
             20, "both upstreams unreachable")
    started = time.monotonic()
    status, body, headers = call(proxy, "POST", "/completion", {"prompt": "x", "n_predict": 2}, timeout=40)
    waited = time.monotonic() - started
    assert status == 503, body
    message = body["error"]["message"]
    assert message.startswith("no healthy upstream: gpu-1 unreachable: ") and "gpu-2 unreachable: " in message, message
    assert 2.5 <= waited < 10, waited  # --no-upstream-timeout 3 s, not --buffered-request-timeout 30 s
    assert headers.get("Retry-After") == "1"
    status, body, _ = call(proxy, "GET", "/v1/models")
    assert status == 503 and body["error"]["message"].startswith("no healthy upstream: ")
    assert "Traceback" not in balancer.log()
