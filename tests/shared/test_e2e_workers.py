"""End to end: ``--workers 2``: two balancer processes accept on one proxy port (SO_REUSEPORT) and
share the fleet through Redis; a worker that dies is started again; SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from ..processes import free_port, get_json, wait_for
from ..test_e2e_balancer import in_parallel, post
from .test_e2e_balancers import SLOTS, SlotWatcher

pytestmark = pytest.mark.integration


def children(pid: int) -> list[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(line) for line in result.stdout.split()]


def two_free_ports() -> int:
    """A port p with p + 1 free too, below the ephemeral range (outbound connections take those)."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", first))
                b.bind(("127.0.0.1", first + 1))
            return first
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


def test_two_workers_share_the_port_and_the_fleet_and_stop_together(procs, redis_server, prefix):
    servers = [procs.simulator(slots=SLOTS, tokens_per_second=50)[1] for _ in range(2)]
    port, management = free_port(), two_free_ports()
    upstreams = [arg for i, s in enumerate(servers) for arg in ("--upstream", f"sim-{i}={s}")]
    balancer = procs.start(
        "balancer", "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--management-listen", f"tcp:{management}:interface=127.0.0.1",
        "--workers", "2", "--state", redis_server.url, "--state-prefix", prefix,
        "--probe-interval", "0.2", "--buffered-request-timeout", "60", *upstreams, name="workers",
    )
    proxy = f"http://127.0.0.1:{port}"
    managers = [f"http://127.0.0.1:{management + i}" for i in range(2)]
    for url in managers:
        wait_for(lambda url=url: get_json(url + "/api/v1/state?history=0")[1]["totals"]["upstreams"]["healthy"] == 2,
                 deadline=30, what=f"{url} sees the fleet")
    with SlotWatcher(servers) as watcher:
        threads, results = in_parallel(
            [lambda i=i: post(proxy, "/completion", {"prompt": f"w{i}", "n_predict": 20}) for i in range(24)]
        )
        for thread in threads:
            thread.join(60)
    assert [r[0] for r in results] == [200] * 24, results
    assert all(peak <= SLOTS for peak in watcher.peak.values()) and max(watcher.deferred.values()) == 0
    served = [get_json(url + "/api/v1/state?history=0")[1]["requests"]["total"] for url in managers]
    assert sum(served) == 24 and all(count > 0 for count in served), served

    [worker] = children(balancer.process.pid)
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: [pid for pid in children(balancer.process.pid) if pid != worker], deadline=20,
             what="worker 1 started again")
    wait_for(lambda: get_json(managers[1] + "/health")[0] == 200, deadline=30, what="the new worker 1 answers")
    status, _ = post(proxy, "/completion", {"prompt": "after", "n_predict": 3})
    assert status == 200

    survivors = children(balancer.process.pid)
    started = time.monotonic()
    assert balancer.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 30
    for pid in survivors:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    assert "Traceback" not in balancer.log()
