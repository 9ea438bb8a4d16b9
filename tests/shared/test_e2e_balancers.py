"""End to end: three balancer processes share one fleet of simulated llama-servers through a
real redis-server. No server above its slots, one FIFO across balancers, a slot freed through
one balancer wakes a request waiting on another, a balancer killed with SIGKILL gives its
slots back, Redis restarted mid-load loses nothing."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest

from ..processes import get_json, wait_for
from ..test_e2e_balancer import in_parallel, post

pytestmark = pytest.mark.integration

SLOTS = 2  # per simulated server; two servers
LEASE_TTL = "2"


class SlotWatcher:
    """Polls each simulator's /slots and /metrics every 20 ms: the most busy slots seen at once, and the
    most requests it ever queued inside itself (``llamacpp:requests_deferred``)."""

    def __init__(self, servers: list[str]) -> None:
        self.servers = servers
        self.peak = {server: 0 for server in servers}
        self.deferred = {server: 0.0 for server in servers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for server in self.servers:
                try:
                    _, slots = get_json(server + "/slots", timeout=2)
                    busy = sum(1 for slot in slots if slot.get("is_processing"))
                    self.peak[server] = max(self.peak[server], busy)
                    deferred = _metrics(server).get("llamacpp:requests_deferred", 0.0)
                    self.deferred[server] = max(self.deferred[server], deferred)
                except (OSError, ValueError):
                    pass
            time.sleep(0.02)

    def __enter__(self) -> SlotWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)


def three_balancers(procs: Any, redis: Any, prefix: str, servers: list[str], *extra: str) -> list[tuple[Any, str, str]]:
    state = ["--state", redis.url, "--state-prefix", prefix, "--state-lease-ttl", LEASE_TTL,
             "--probe-interval", "0.2", "--buffered-request-timeout", "60", *extra]
    upstreams = [arg for i, server in enumerate(servers) for arg in ("--upstream", f"sim-{i}={server}")]
    first = procs.balancer(*state, *upstreams)  # only the first one is configured with the fleet
    others = [procs.balancer(*state) for _ in range(2)]
    balancers = [first, *others]
    for _, proxy, _ in balancers:
        wait_for(
            lambda proxy=proxy: get_json(proxy + "/health")[1]["upstreams"]["healthy"] == len(servers),
            deadline=30, what=f"{proxy} sees the shared fleet",
        )
    return balancers


def completion(proxy: str, tokens: int, tag: str) -> tuple[int, dict]:
    return post(proxy, "/completion", {"prompt": tag, "n_predict": tokens})


def test_three_balancers_never_put_a_server_above_its_slots_and_serve_everyone(procs, redis_server, prefix):
    servers = [procs.simulator(slots=SLOTS, tokens_per_second=50)[1] for _ in range(2)]
    balancers = three_balancers(procs, redis_server, prefix, servers)
    proxies = [proxy for _, proxy, _ in balancers]
    with SlotWatcher(servers) as watcher:
        threads, results = in_parallel(
            [lambda i=i: completion(proxies[i % 3], 25, f"q{i}") for i in range(18)]
        )
        for thread in threads:
            thread.join(90)
    assert [r[0] for r in results] == [200] * 18, results
    assert all(peak <= SLOTS for peak in watcher.peak.values()), watcher.peak
    assert any(peak == SLOTS for peak in watcher.peak.values()), "the load never filled a server"
    assert watcher.deferred == {server: 0.0 for server in servers}, "a server queued requests inside itself"


def test_a_slot_freed_through_one_balancer_wakes_a_request_waiting_on_another(procs, redis_server, prefix):
    servers = [procs.simulator(slots=SLOTS, tokens_per_second=200)[1] for _ in range(2)]
    balancers = three_balancers(procs, redis_server, prefix, servers)
    a, c = balancers[0][1], balancers[2][1]
    ended: list[float] = []

    def long_on_a(i: int) -> tuple[int, dict]:
        result = completion(a, 200 if i else 100, f"long{i}")  # the first one ends first
        ended.append(time.monotonic())
        return result

    threads, results = in_parallel([lambda i=i: long_on_a(i) for i in range(2 * SLOTS)])
    wait_for(lambda: get_json(a + "/health")[1]["slots_idle"] == 0, deadline=10, what="every slot busy")
    started: list[float] = []

    def waiting_on_c() -> tuple[int, dict]:
        import http.client
        import json

        conn = http.client.HTTPConnection("127.0.0.1", int(c.rsplit(":", 1)[1]), timeout=60)
        conn.request("POST", "/completion", json.dumps({"prompt": "waiting", "n_predict": 5, "stream": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        started.append(time.monotonic())
        response.read()
        conn.close()
        return response.status, {}

    waiter_threads, waiter_results = in_parallel([waiting_on_c])
    wait_for(lambda: get_json(c + "/health")[1]["requests_buffered"] == 1, deadline=10, what="buffered on c")
    for thread in [*threads, *waiter_threads]:
        thread.join(60)
    assert waiter_results[0][0] == 200 and [r[0] for r in results] == [200] * (2 * SLOTS)
    handoff = started[0] - min(ended)
    # the waiting request starts (its first token arrives) right after the first slot frees
    assert handoff < 0.5, f"hand-off took {handoff:.3f} s"


def test_a_balancer_killed_mid_load_gives_its_slots_back_and_the_others_go_on(procs, redis_server, prefix):
    servers = [procs.simulator(slots=SLOTS, tokens_per_second=20)[1] for _ in range(2)]
    balancers = three_balancers(procs, redis_server, prefix, servers)
    (victim, victim_proxy, _), (_, b, _), (_, c, _) = balancers
    threads, _ = in_parallel([lambda i=i: _quiet(completion, victim_proxy, 400, f"doomed{i}") for i in range(2)])
    wait_for(lambda: get_json(b + "/health")[1]["slots_idle"] <= 2 * SLOTS - 2, deadline=10, what="doomed running")
    victim.stop(signal.SIGKILL)
    for thread in threads:
        thread.join(10)
    # its two leases expire after the lease ttl; then the survivors fill every slot
    threads, results = in_parallel([lambda i=i: completion((b, c)[i % 2], 10, f"after{i}") for i in range(2 * SLOTS)])
    for thread in threads:
        thread.join(60)
    assert [r[0] for r in results] == [200] * (2 * SLOTS), results
    wait_for(lambda: get_json(b + "/health")[1]["shared_state"]["owners"] == 2, deadline=20, what="2 owners left")


def test_redis_restarted_mid_load_loses_no_request_and_counts_reconcile(procs, own_redis, prefix):
    servers = [procs.simulator(slots=SLOTS, tokens_per_second=40)[1] for _ in range(2)]
    balancers = three_balancers(procs, own_redis, prefix, servers)
    proxies = [proxy for _, proxy, _ in balancers]
    with SlotWatcher(servers):
        threads, results = in_parallel([lambda i=i: completion(proxies[i % 3], 40, f"r{i}") for i in range(9)])
        time.sleep(0.3)
        own_redis.restart()
        for thread in threads:
            thread.join(90)
    assert [r[0] for r in results] == [200] * 9, results
    for proxy in proxies:
        wait_for(lambda proxy=proxy: get_json(proxy + "/health")[1]["shared_state"]["up"], deadline=20,
                 what=f"{proxy} back on the store")
    threads, results = in_parallel([lambda i=i: completion(proxies[i % 3], 5, f"s{i}") for i in range(6)])
    for thread in threads:
        thread.join(60)
    assert [r[0] for r in results] == [200] * 6
    wait_for(lambda: all(get_json(p + "/health")[1]["slots_processing"] == 0 for p in proxies), deadline=20,
             what="every slot free again on every balancer")


def test_redis_frozen_mid_load_strands_no_waiting_request_and_leaves_nothing_behind(procs, own_redis, prefix):
    """
    SIGSTOP on Redis while 12 requests (4 slots) run and wait on three balancers: every balancer
    falls back and its waiters move to its own buffer, so all 12 are answered 200 while Redis is
    still mute (they waited for Redis before). Then Redis answers again: nothing is logged above a
    warning, and the store ends with no lease and no waiter.
    """
    servers = [procs.simulator(slots=SLOTS, tokens_per_second=40)[1] for _ in range(2)]
    balancers = three_balancers(procs, own_redis, prefix, servers)
    proxies = [proxy for _, proxy, _ in balancers]
    threads, results = in_parallel([lambda i=i: completion(proxies[i % 3], 40, f"f{i}") for i in range(12)])
    wait_for(lambda: sum(get_json(p + "/health")[1]["requests_buffered"] for p in proxies) >= 6, deadline=10,
             what="requests waiting on the balancers")
    own_redis.pause()
    try:
        # served while Redis is still mute: the waiting requests must not wait for it
        wait_for(lambda: not any(thread.is_alive() for thread in threads), deadline=40,
                 what="every request answered while Redis is frozen")
    finally:
        own_redis.resume()
    assert [r[0] for r in results] == [200] * 12, results
    for proxy in proxies:
        wait_for(lambda proxy=proxy: get_json(proxy + "/health")[1]["shared_state"]["up"], deadline=20,
                 what=f"{proxy} back on the store")
    wait_for(lambda: own_redis.command("HLEN", f"{prefix}:lease").strip() == b"0"
                     and own_redis.command("HLEN", f"{prefix}:w").strip() == b"0",
             deadline=20, what="no lease and no waiter left in the store")
    for process, _, _ in balancers:
        log = process.log()
        assert "Traceback" not in log and "#critical" not in log and "#error" not in log, log[-3000:]


def _quiet(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except OSError as e:
        return e


def _metrics(server: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(server + "/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0]] = float(value)
    return values
