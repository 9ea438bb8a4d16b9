"""End to end, real processes: a dynamic fleet. Runtime registration, agents appearing and
expiring, draining under a long stream, an agent's SIGTERM drain, a balancer restart."""

from __future__ import annotations

import http.client
import json
import signal
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import pytest

from paddler.fleet.upstream import upstream_id

from .processes import PaddlerProcess, Processes, free_port, get_json, wait_for

pytestmark = pytest.mark.integration



def call(method: str, url: str, payload: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def upstream(management: str, key: str) -> dict[str, Any] | None:
    status, body = get_json(f"{management}/api/v1/upstreams/{key}")
    return body if status == 200 else None


def complete(proxy: str, n_predict: int = 3) -> dict[str, Any]:
    status, body = call("POST", proxy + "/completion", {"prompt": "hello", "n_predict": n_predict}, timeout=20)
    assert status == 200, body
    return body


class Stream:
    """A streamed /completion read event by event (http.client, with a socket timeout)."""

    def __init__(self, proxy: str, n_predict: int) -> None:
        parts = urlsplit(proxy)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
        self.conn.request("POST", "/completion",
                          body=json.dumps({"prompt": "tell me", "n_predict": n_predict, "stream": True}),
                          headers={"Content-Type": "application/json"})
        self.response = self.conn.getresponse()
        assert self.response.status == 200

    def next_event(self) -> dict[str, Any] | None:
        while True:
            line = self.response.readline()
            if not line:
                return None
            if line.startswith(b"data: "):
                return json.loads(line[6:])

    def rest(self) -> list[dict[str, Any]]:
        events = []
        while (event := self.next_event()) is not None:
            events.append(event)
        self.conn.close()
        return events


def agent(procs: Processes, server: str, management: str, name: str, *extra: str) -> PaddlerProcess:
    return procs.start(
        "agent", "--llamacpp", server, "--balancer", management, "--name", name,
        "--interval", "0.2", "--timeout", "1", "--max-backoff", "0.4", *extra, name="agent",
    )


def test_a_server_registered_at_runtime_is_probed_then_takes_traffic(procs):
    """POST /api/v1/upstreams answers after the first probe (healthy) and requests go there."""
    _, proxy, management = procs.balancer("--probe-interval", "0.2")
    _, server = procs.simulator(slots=2, tokens_per_second=200)
    status, body = call("POST", management + "/api/v1/upstreams", {"url": server, "name": "late-1"})
    assert status == 201 and body["state"] == "healthy" and body["slots_total"] == 2
    assert complete(proxy)["tokens_predicted"] == 3
    assert upstream(management, "late-1")["requests_served"] == 1
    status, again = call("POST", management + "/api/v1/upstreams", {"url": server, "name": "late-1"})
    assert status == 200 and again["id"] == body["id"]
    status, health = get_json(management + "/health")
    assert health == {"status": "ok", "upstreams": 1, "agents": 0}


def test_an_agent_makes_its_server_appear_and_killing_it_makes_it_expire(procs):
    """An agent beside a simulated server registers it; after SIGKILL it expires (--agent-expiry 1)."""
    _, proxy, management = procs.balancer("--agent-expiry", "1")
    _, server = procs.simulator(slots=3, tokens_per_second=200)
    status_port = free_port()
    runner = agent(procs, server, management, "gpu-1", "--status-listen",
                   f"tcp:{status_port}:interface=127.0.0.1")
    uid = upstream_id(server)
    found = wait_for(lambda: upstream(management, uid), deadline=15, what="the agent's upstream")
    assert found["source"] == "agent" and found["name"] == "gpu-1" and found["slots_total"] == 3
    wait_for(lambda: upstream(management, uid)["state"] == "healthy", deadline=5, what="healthy")
    assert complete(proxy)["tokens_predicted"] == 3
    assert get_json(management + "/health")[1] == {"status": "ok", "upstreams": 1, "agents": 1}
    _, status = get_json(f"http://127.0.0.1:{status_port}/health")
    assert status["status"] == "ok" and status["balancer"]["state"] == "reporting"
    runner.stop(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: upstream(management, uid) is None, deadline=10, what="expiry")
    assert time.monotonic() - killed >= 0.7  # not before the expiry (1 s, minus the last report's age)
    assert get_json(management + "/health")[1] == {"status": "ok", "upstreams": 0, "agents": 0}


def test_draining_lets_a_long_stream_finish_and_sends_new_requests_elsewhere(procs):
    """DELETE on a host running a stream: the stream completes, new requests go to the other host,
    and the drained host leaves the fleet once the stream is over."""
    _, proxy, management = procs.balancer("--probe-interval", "0.2")
    _, slow = procs.simulator(slots=2, tokens_per_second=25)
    _, other = procs.simulator(slots=2, tokens_per_second=200)
    assert call("POST", management + "/api/v1/upstreams", {"url": slow, "name": "slow"})[0] == 201
    stream = Stream(proxy, n_predict=50)  # about 2 s
    first = stream.next_event()
    assert first is not None and not first["stop"]
    assert call("POST", management + "/api/v1/upstreams", {"url": other, "name": "other"})[0] == 201
    status, body = call("DELETE", management + "/api/v1/upstreams/slow")
    assert status == 202 and body["removed"] is False and body["upstream"]["draining"] is True
    for _ in range(3):
        complete(proxy)
    assert upstream(management, "other")["requests_served"] == 3
    assert upstream(management, "slow")["requests_in_flight"] == 1
    events = [first, *stream.rest()]
    assert events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 50
    assert sum(1 for e in events if not e["stop"]) == 50  # every token arrived
    wait_for(lambda: upstream(management, "slow") is None, deadline=5, what="removal after the stream")


def test_agent_sigterm_drains_its_host_and_waits_for_the_stream(procs):
    """SIGTERM on the agent: its host drains, the agent waits for the running stream, then exits,
    and the host is removed: a scale-down loses no request."""
    _, proxy, management = procs.balancer("--agent-expiry", "5")
    _, server = procs.simulator(slots=2, tokens_per_second=25)
    runner = agent(procs, server, management, "gpu-1", "--drain-timeout", "20")
    uid = upstream_id(server)
    wait_for(lambda: (upstream(management, uid) or {}).get("state") == "healthy", deadline=15,
             what="the agent's upstream healthy")
    stream = Stream(proxy, n_predict=50)
    first = stream.next_event()
    assert first is not None
    runner.process.send_signal(signal.SIGTERM)
    wait_for(lambda: upstream(management, uid)["draining"], deadline=5, what="draining")
    middle = [stream.next_event() for _ in range(25)]  # about 1 s after SIGTERM
    assert runner.process.poll() is None, "the agent exited while its host still streamed"
    events = [first, *middle, *stream.rest()]
    assert events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 50
    assert runner.process.wait(timeout=10) in (0, -signal.SIGTERM)
    assert upstream(management, uid) is None
    assert "drained and removed" in runner.log()


def test_a_balancer_restart_does_not_crash_the_agent(procs):
    """The balancer goes away and comes back on the same ports: the agent logs the outage once,
    keeps running and registers its server again."""
    port, management_port = free_port(), free_port()
    args = ("balancer", "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--management-listen", f"tcp:{management_port}:interface=127.0.0.1")
    management = f"http://127.0.0.1:{management_port}"
    first = procs.start(*args, name="balancer")
    procs.wait_healthy(first, management + "/health")
    _, server = procs.simulator(slots=2, tokens_per_second=200)
    runner = agent(procs, server, management, "gpu-1")
    uid = upstream_id(server)
    wait_for(lambda: upstream(management, uid), deadline=15, what="registration")
    first.stop()
    wait_for(lambda: "unreachable" in runner.log(), deadline=10, what="the agent noticing")
    assert runner.process.poll() is None
    second = procs.start(*args, name="balancer")
    procs.wait_healthy(second, management + "/health")
    wait_for(lambda: upstream(management, uid), deadline=10, what="registration after restart")
    wait_for(lambda: "reporting again" in runner.log(), deadline=5, what="the recovery log line")
    assert runner.process.poll() is None
    assert runner.log().count("retrying with backoff") == 1  # one event per state change
    assert complete(f"http://127.0.0.1:{port}")["tokens_predicted"] == 3
