"""End to end: scale from zero. The balancer starts with no upstream, requests
wait in its buffer, a server is registered at runtime and every one completes."""

from __future__ import annotations

import json
import urllib.request

import pytest

from .processes import get_json, wait_for
from .test_e2e_balancer import in_parallel, post

pytestmark = pytest.mark.integration



def register(management: str, url: str, name: str) -> int:
    request = urllib.request.Request(
        management + "/api/v1/upstreams",
        data=json.dumps({"url": url, "name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def test_requests_wait_with_zero_upstreams_and_complete_once_one_registers(procs):
    _, proxy, management = procs.balancer("--probe-interval", "0.2", "--buffered-request-timeout", "60")
    status, health = get_json(proxy + "/health")
    assert status == 200 and health["upstreams"] == {"healthy": 0, "total": 0}
    threads, results = in_parallel(
        [lambda i=i: post(proxy, "/completion", {"prompt": f"q{i}", "n_predict": 5}) for i in range(6)]
    )
    wait_for(lambda: get_json(proxy + "/health")[1]["requests_buffered"] == 6, deadline=15, what="6 buffered")
    assert all(r is None for r in results)  # nobody was answered 503
    _, server = procs.simulator(slots=2, tokens_per_second=100)
    assert register(management, server, "late-1") in (200, 201)
    for t in threads:
        t.join(30)
    assert [r[0] for r in results] == [200] * 6, results
    assert all(r[1]["tokens_predicted"] == 5 for r in results)
    assert get_json(proxy + "/health")[1]["requests_buffered"] == 0


def test_an_empty_fleet_answers_503_saying_so_when_nothing_joins(procs):
    """No upstream at all: nothing to wait for; the request waits the shorter of
    --buffered-request-timeout and --no-upstream-timeout, then 503 says why (it was a 504 "no slot")."""
    _, proxy, _ = procs.balancer("--buffered-request-timeout", "0.5")
    status, body = post(proxy, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 503
    assert body["error"]["type"] == "unavailable_error"
    assert body["error"]["message"].startswith("no healthy upstream: no upstream is registered")


def test_buffering_disabled_answers_503_at_once(procs):
    _, proxy, _ = procs.balancer("--max-buffered-requests", "0")
    status, body = post(proxy, "/completion", {"prompt": "hi"})
    assert status == 503 and "buffering is disabled" in body["error"]["message"]
    status, health = get_json(proxy + "/health")
    assert status == 503 and health["status"] == "error"
