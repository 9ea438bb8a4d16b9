"""Slow clients, floods and large bodies against a real balancer: bounded descriptors and memory,
and a clear answer for every client.

- Slowloris: hundreds of connections trickling their headers (and some their
  bodies) while a normal client keeps asking. Each slow connection is
  answered 408 at its deadline, or 503 at the connection cap, and closed;
  the normal client gets 200 or a JSON 503, never a hang; descriptors stay
  under the cap and come back.
- Flood: many more concurrent requests than slots and buffer. Each is
  served or refused 503 with a numeric Retry-After, none hangs, and the
  balancer serves the next request at once.
- Large bodies: concurrent 9 MiB bodies against a frozen upstream take no
  more memory than --max-request-bodies-memory allows; the rest get 503
  before their bodies are read.
"""

from __future__ import annotations

import http.client
import json
import selectors
import signal
import socket
import threading
import time
from typing import Any

import pytest

from paddler.server.channel import MAX_LINGERING_REFUSALS
from paddler.server.listeners import LISTEN_BACKLOG

from .harness import (
    Load,
    Sampler,
    Simulated,
    call,
    free_port,
    get_json,
    held,
    log_problems,
    open_fds,
    report,
    rss_mib,
    scaled,
    start_balancer,
    summary,
    threads_of,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def metric(management: str, name: str, label: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", int(management.rsplit(":", 1)[1]), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'"{label}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Slowloris:
    """C{count} connections that send a request head (or body) one byte every C{pace} seconds, in one thread."""

    def __init__(self, port: int, count: int, pace: float, body: bool = False) -> None:
        self.port = port
        self.count = count
        self.pace = pace
        self.body = body
        self.opened = 0
        self.refused_at_connect = 0
        self.answers: dict[str, int] = {}
        self.lifetimes: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Slowloris:
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "slow connections still open"

    def _run(self) -> None:
        head = b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" if self.body else b""
        trickle = b"x" * 5000 if self.body else b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: y\r\n" * 500
        selector = selectors.DefaultSelector()
        conns: dict[socket.socket, dict[str, Any]] = {}
        for _ in range(self.count):
            sock = socket.socket()
            try:
                sock.connect(("127.0.0.1", self.port))
            except OSError:
                self.refused_at_connect += 1
                sock.close()
                continue
            sock.setblocking(False)
            try:
                sock.send(head)
            except OSError:
                pass
            conns[sock] = {"opened": time.monotonic(), "sent": 0, "got": b""}
            selector.register(sock, selectors.EVENT_READ)
            self.opened += 1
        next_byte = time.monotonic()
        end = time.monotonic() + 60
        while conns and time.monotonic() < end:
            for key, _ in selector.select(timeout=0.05):
                sock = key.fileobj
                state = conns[sock]
                try:
                    chunk = sock.recv(65536)
                except (ConnectionError, OSError):
                    chunk = b""
                if chunk:
                    state["got"] += chunk
                    continue
                self._closed(sock, state, selector, conns)
            if time.monotonic() >= next_byte:
                next_byte += self.pace
                for sock, state in list(conns.items()):
                    if state["sent"] < len(trickle):
                        try:
                            sock.send(trickle[state["sent"]: state["sent"] + 1])
                            state["sent"] += 1
                        except OSError:
                            pass
        for sock, state in list(conns.items()):
            self._closed(sock, state, selector, conns, answer="still open")

    def _closed(self, sock: socket.socket, state: dict[str, Any], selector: Any, conns: dict, answer: str = "") -> None:
        selector.unregister(sock)
        sock.close()
        del conns[sock]
        self.lifetimes.append(time.monotonic() - state["opened"])
        got = state["got"]
        if not answer:
            answer = got.split(b"\r\n", 1)[0].decode("latin-1")[9:12] if got else "closed without answer"
            if got:
                body = got.partition(b"\r\n\r\n")[2]
                json.loads(body)["error"]["message"]  # every answer is a JSON error
        self.answers[answer] = self.answers.get(answer, 0) + 1


CAP = scaled(100, 1000)
BODY = 9 * 1024 * 1024
BUDGET = scaled(32, 64) * 1024 * 1024


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """One server (2 slots) and one balancer with every limit of this module set low."""
    from ..processes import Processes

    procs = Processes(tmp_path_factory.mktemp("slow"))
    try:
        sim = Simulated(procs, free_port(), 2, 400.0)
        sim.start()
        sim.wait_up()
        balancer, proxy, management = start_balancer(
            procs, "--upstream", sim.url, "--probe-interval", "0.5", "--probe-timeout", "0.5",
            "--unhealthy-after", "1000", "--header-timeout", "2", "--min-request-body-rate", "1000",
            "--max-connections", str(CAP), "--max-buffered-requests", "10", "--buffered-request-timeout", "30",
            "--max-request-body", str(BODY + 1024), "--max-request-bodies-memory", str(BUDGET),
            "--upstream-timeout", "2",
        )
        wait_for(lambda: get_json(proxy + "/health")[1]["upstreams"]["healthy"] == 1, 20, "probed")
        yield sim, balancer, proxy, management
        problems = log_problems(balancer.log())
        assert problems == [], problems[:10]
    finally:
        procs.stop_all()


def test_slowloris_is_cut_at_its_deadline_and_capped_while_normal_clients_get_answers(fleet):
    cap = CAP
    slow_heads = scaled(250, 3000)
    slow_bodies = scaled(20, 200)
    sim, balancer, proxy, management = fleet
    pid = balancer.process.pid
    time.sleep(0.3)
    fds_before = open_fds(pid)
    port = int(proxy.rsplit(":", 1)[1])
    held_before = held(pid, {port})

    def normal(rng: Any, base: str) -> Any:
        time.sleep(0.05)
        return call(base, "GET", "/v1/models", timeout=10)

    started = time.monotonic()
    with Sampler(pid, 0.05) as sampled, Load(proxy, 2, mix=normal, timeout=10) as clients:
        bodies = Slowloris(port, slow_bodies, pace=0.4, body=True).start()
        time.sleep(0.3)  # the slow bodies get in before the heads fill the cap
        heads = Slowloris(port, slow_heads, pace=0.4).start()
        heads.join(30)
        bodies.join(30)
        attack_seconds = time.monotonic() - started
    after = call(proxy, "GET", "/v1/models")
    wait_for(lambda: held(pid, {port})["clients"] == 0, 5, "every client connection closed")
    fds_after, held_after = open_fds(pid), held(pid, {port})
    figures = summary(clients.outcomes)
    report(
        "slowloris", cap=cap, slow_head_connections=heads.opened, slow_body_connections=bodies.opened,
        connect_refused=heads.refused_at_connect + bodies.refused_at_connect, head_answers=heads.answers,
        body_answers=bodies.answers, longest_slow_connection_s=round(max(heads.lifetimes + bodies.lifetimes), 2),
        attack_seconds=round(attack_seconds, 1), normal_clients=figures, fds_before=fds_before,
        fds_peak=max(sampled.fds), fds_after=fds_after,
        refused_connection_limit=metric(management, "paddler_requests_refused_total", "connection_limit"),
        timed_out_client_head=metric(management, "paddler_requests_timed_out_total", "client_head"),
        timed_out_client_body=metric(management, "paddler_requests_timed_out_total", "client_body"),
    )
    assert after.kind == "completed"
    # every slow connection was answered (408 at its deadline, 503 at the cap) or cut in a burst
    assert set(heads.answers) <= {"408", "503", "closed without answer"}, heads.answers
    assert heads.answers.get("408", 0) > 0 and heads.answers.get("503", 0) > 0, heads.answers
    assert set(bodies.answers) <= {"408", "503", "closed without answer"}, bodies.answers
    assert bodies.answers.get("408", 0) > 0, bodies.answers
    assert max(heads.lifetimes) < 2 + 2 + 1.5  # --header-timeout, the linger, slack
    assert max(bodies.lifetimes) < 2 + 1 + 2 + 1.5  # grace + 1000 B at 1000 B/s, the linger, slack
    kinds = figures["kinds"]
    assert kinds.get("hung", 0) == 0 and kinds.get("no_answer", 0) == 0 and kinds.get("bad_error", 0) == 0, figures
    assert all(o.status in (200, 503) for o in clients.outcomes), figures
    # the cap, the refusals lingering after their answer, and one accept batch: Twisted accepts a
    # batch (at most the listen backlog) before the refused ones of that batch are closed
    bound = fds_before + cap + MAX_LINGERING_REFUSALS + LISTEN_BACKLOG
    assert max(sampled.fds) <= bound, (fds_before, max(sampled.fds), bound)
    assert held_after["other"] <= held_before["other"], (held_before, held_after)
    assert "the cap (--max-connections)" in balancer.log()


def test_a_flood_is_served_or_refused_with_a_retry_after_and_the_balancer_recovers_at_once(fleet):
    flood = scaled(300, 5000)
    sim, balancer, proxy, management = fleet
    refused_before = metric(management, "paddler_requests_refused_total", "buffer_full")
    started = time.monotonic()
    outcomes: list[Any] = []
    batch = CAP - 10  # under the connection cap: the buffer is what refuses
    for first in range(0, flood, batch):
        outcomes += list(threads_of([
            lambda: call(proxy, "POST", "/completion", {"prompt": "flood", "n_predict": 8}, timeout=60)
            for _ in range(min(batch, flood - first))
        ]))
    seconds = time.monotonic() - started
    recovery_started = time.monotonic()
    after = call(proxy, "POST", "/completion", {"prompt": "after", "n_predict": 2})
    recovery = time.monotonic() - recovery_started
    _, health = get_json(proxy + "/health")
    figures = summary(outcomes)
    retry_after = sorted(int(o.headers["retry-after"]) for o in outcomes if o.status == 503)
    report(
        "flood", requests=flood, seconds=round(seconds, 1), **{k: v for k, v in figures.items() if k != "requests"},
        retry_after_min=retry_after[0] if retry_after else None,
        retry_after_median=retry_after[len(retry_after) // 2] if retry_after else None,
        retry_after_max=retry_after[-1] if retry_after else None, recovery_seconds=round(recovery, 3),
        refused_buffer_full=metric(management, "paddler_requests_refused_total", "buffer_full"),
    )
    kinds = figures["kinds"]
    assert set(kinds) <= {"completed", "json_error"}, (figures, [o.detail for o in outcomes if o.kind == "no_answer"][:5])
    assert all(o.status in (200, 503) for o in outcomes), figures
    assert kinds.get("completed", 0) >= 10 and kinds.get("json_error", 0) > 0, figures
    assert all(1 <= value <= 300 for value in retry_after)
    refused = metric(management, "paddler_requests_refused_total", "buffer_full") - refused_before
    assert refused == kinds["json_error"]
    assert after.kind == "completed" and recovery < 2.0
    assert health["requests_buffered"] == 0


def test_concurrent_large_bodies_take_no_more_memory_than_the_budget(fleet):
    bodies = scaled(12, 50)
    budget = BUDGET
    size = BODY
    sim, balancer, proxy, management = fleet
    pid = balancer.process.pid
    rss_before = rss_mib(pid)
    payload = b'{"x": "' + b"a" * (size - 10) + b'"}'
    sim.signal(signal.SIGSTOP)  # requests hold their bodies while the upstream does not answer
    try:
        with Sampler(pid, 0.05) as sampled:
            outcomes = list(threads_of([
                lambda: call(proxy, "POST", "/v1/anything", payload, timeout=30) for _ in range(bodies)
            ]))
    finally:
        sim.signal(signal.SIGCONT)
    rss_peak = max(sampled.rss)
    figures = summary(outcomes)
    report(
        "large_bodies", bodies=bodies, body_mib=9, budget_mib=budget // (1024 * 1024),
        **{k: v for k, v in figures.items() if k != "requests"}, rss_before_mib=round(rss_before, 1),
        rss_peak_mib=round(rss_peak, 1),
        refused_body_memory=metric(management, "paddler_requests_refused_total", "body_memory"),
    )
    statuses = figures["statuses"]
    fitting = budget // size
    assert statuses.get("503", 0) >= bodies - fitting, figures  # refused before their bodies were read
    assert all(o.kind == "json_error" for o in outcomes), figures
    refused = [o for o in outcomes if o.status == 503]
    assert all("--max-request-bodies-memory" in o.detail for o in refused)
    # each accepted body is held once by the request and once in the upstream connection's buffer
    assert rss_peak - rss_before <= 2.5 * budget / (1024 * 1024) + 40, (rss_before, rss_peak)
    wait_for(lambda: get_json(proxy + "/health")[1]["upstreams"]["healthy"] == 1, 10, "the server back")
