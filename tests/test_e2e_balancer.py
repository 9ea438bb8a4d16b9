"""End to end: the balancer and simulated llama.cpp servers as real processes."""

from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import pytest

from .processes import get_json, wait_for

pytestmark = pytest.mark.integration



def post(url: str, path: str, payload: dict, timeout: float = 60.0) -> tuple[int, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def in_parallel(calls):
    results = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except Exception as e:  # reported by the assertions below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, results


def busy(url: str) -> int:
    status, slots = get_json(url + "/slots")
    return sum(s["is_processing"] for s in slots)


def test_load_spreads_by_free_slots_and_every_request_completes(procs):
    """A 4-slot and a 1-slot server: 5 long requests fill 4 + 1 slots, none queue inside a server."""
    _, big = procs.simulator(slots=4, tokens_per_second=20)
    _, small = procs.simulator(slots=1, tokens_per_second=20)
    _, proxy, _ = procs.balancer("--upstream", big, "--upstream", small, "--probe-interval", "0.2")
    wait_for(lambda: get_json(proxy + "/health")[1]["slots_idle"] == 5, what="fleet probed")
    threads, results = in_parallel(
        [lambda: post(proxy, "/completion", {"prompt": "hi", "n_predict": 40}) for _ in range(5)]
    )
    wait_for(lambda: busy(big) == 4 and busy(small) == 1, deadline=10, what="4 + 1 slots busy")
    _, health = get_json(proxy + "/health")
    assert health["slots_idle"] == 0 and health["slots_processing"] == 5
    for t in threads:
        t.join(30)
    assert all(r[0] == 200 and r[1]["tokens_predicted"] == 40 for r in results), results


def test_more_requests_than_slots_wait_in_the_balancer_not_in_a_server(procs):
    """2-slot fleet, 10 concurrent long requests: all complete, never more than 2 in flight per server."""
    sim, url = procs.simulator(slots=2, tokens_per_second=100)
    _, proxy, _ = procs.balancer("--upstream", url, "--probe-interval", "0.2")
    wait_for(lambda: get_json(proxy + "/health")[1]["slots_idle"] == 2, what="fleet probed")
    threads, results = in_parallel(
        [lambda: post(proxy, "/completion", {"prompt": "x", "n_predict": 20}) for _ in range(10)]
    )
    seen_buffered = 0
    while any(t.is_alive() for t in threads):
        metrics = urllib_text(url + "/metrics")
        assert "llamacpp:requests_deferred 0" in metrics, metrics
        assert busy(url) <= 2
        seen_buffered = max(seen_buffered, get_json(proxy + "/health")[1]["requests_buffered"])
        time.sleep(0.02)
    assert all(r[0] == 200 for r in results), results
    assert seen_buffered >= 5


def urllib_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_stream_reaches_the_client_token_by_token(procs):
    """The first SSE event arrives long before the last token is generated."""
    _, url = procs.simulator(slots=1, tokens_per_second=10)
    _, proxy, _ = procs.balancer("--upstream", url, "--probe-interval", "0.2")
    wait_for(lambda: get_json(proxy + "/health")[1]["slots_idle"] == 1, what="fleet probed")
    parts = urlsplit(proxy)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    started = time.monotonic()
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}
    ))
    response = conn.getresponse()
    assert response.status == 200
    first_line = response.readline()
    first_at = time.monotonic() - started
    rest = response.read()
    total = time.monotonic() - started
    conn.close()
    assert first_line.startswith(b"data: ")
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert total >= 0.9  # 10 tokens at 10 tokens/s
    assert first_at < total / 2


def test_client_disconnect_frees_the_upstream_slot(procs):
    _, url = procs.simulator(slots=1, tokens_per_second=10)
    _, proxy, _ = procs.balancer("--upstream", url, "--probe-interval", "0.2")
    wait_for(lambda: get_json(proxy + "/health")[1]["slots_idle"] == 1, what="fleet probed")
    parts = urlsplit(proxy)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/completion", json.dumps({"prompt": "hi", "n_predict": 1000, "stream": True}))
    response = conn.getresponse()
    assert response.readline().startswith(b"data: ")
    assert busy(url) == 1
    conn.sock.close()
    conn.close()
    wait_for(lambda: busy(url) == 0, deadline=5, what="slot freed after disconnect")
    wait_for(lambda: get_json(proxy + "/health")[1]["slots_idle"] == 1, deadline=5, what="balancer slot freed")


def test_killed_upstream_is_skipped_and_requests_go_elsewhere(procs):
    first, url1 = procs.simulator(slots=4, tokens_per_second=200)
    _, url2 = procs.simulator(slots=2, tokens_per_second=200)
    _, proxy, _ = procs.balancer("--upstream", url1, "--upstream", url2, "--probe-interval", "5")
    wait_for(lambda: get_json(proxy + "/health")[1]["slots_idle"] == 6, what="fleet probed")
    first.stop()  # the balancer has not probed since: it still thinks url1 is the best choice
    results = [post(proxy, "/completion", {"prompt": "hi", "n_predict": 3}) for _ in range(4)]
    assert [r[0] for r in results] == [200] * 4
    _, health = get_json(proxy + "/health")
    assert health["upstreams"] == {"healthy": 1, "total": 2}


def test_health_figures_match_the_fleet(procs):
    _, a = procs.simulator(slots=3)
    _, b = procs.simulator(slots=2)
    _, proxy, _ = procs.balancer("--upstream", a, "--upstream", b, "--probe-interval", "0.2")
    status, health = wait_for(
        lambda: (lambda r: r if r[1]["slots_idle"] == 5 else None)(get_json(proxy + "/health")), what="probed"
    )
    assert status == 200
    assert health == {
        "status": "ok", "slots_idle": 5, "slots_processing": 0, "requests_buffered": 0,
        "upstreams": {"healthy": 2, "total": 2},
    }


def test_one_client_address_is_capped_and_another_is_still_served(procs):
    """--max-connections-per-client 3 over real TCP: three idle connections from 127.0.0.2 are kept,
    its fourth is answered 429 and closed, and 127.0.0.1 is served meanwhile."""
    import socket

    _, server = procs.simulator(slots=2, tokens_per_second=200)
    _, proxy, _ = procs.balancer("--upstream", server, "--max-connections-per-client", "3")
    port = int(proxy.rsplit(":", 1)[1])

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))

    held = [connect() for _ in range(3)]
    try:
        extra = connect()
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: paddler\r\n\r\n")
        data = b""
        while chunk := extra.recv(65536):
            data += chunk
        extra.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429 "), data
        assert "--max-connections-per-client" in json.loads(body)["error"]["message"]
        status, health = get_json(proxy + "/health")
        assert status == 200 and health["upstreams"]["healthy"] == 1
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: _served_from_second_address(port), deadline=10, what="127.0.0.2 served again")


def _served_from_second_address(port: int) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: paddler\r\nConnection: close\r\n\r\n")
        return sock.recv(65536).startswith(b"HTTP/1.1 200 ")
