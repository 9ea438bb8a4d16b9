"""End to end: ``--workers 2`` reload together. The file changes, one SIGHUP (to worker 1, then to
worker 0) and each worker's own management port shows the new policy and buffer size."""

from __future__ import annotations

import os
import signal

import pytest

from ..processes import free_port, get_json, wait_for
from .test_e2e_workers import children, two_free_ports

pytestmark = pytest.mark.integration


def settings_of(url: str) -> tuple[str, int, float]:
    state = get_json(url + "/api/v1/state?history=0")[1]
    return state["policy"], state["buffer"]["capacity"], state["buffer"]["timeout"]


def test_sighup_on_any_worker_reloads_every_worker(procs, redis_server, prefix, tmp_path):
    _, server = procs.simulator(slots=2)
    config = tmp_path / "paddler.toml"
    config.write_text('policy = "slots"\nmax_buffered_requests = 5\n')
    port, management = free_port(), two_free_ports()
    balancer = procs.start(
        "balancer", "--config", str(config), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--management-listen", f"tcp:{management}:interface=127.0.0.1",
        "--workers", "2", "--state", redis_server.url, "--state-prefix", prefix,
        "--upstream", f"sim={server}", name="workers-reload",
    )
    managers = [f"http://127.0.0.1:{management + i}" for i in range(2)]
    for url in managers:
        wait_for(lambda url=url: get_json(url + "/health")[0] == 200, deadline=30, what=f"{url} answers")
    assert [settings_of(url)[:2] for url in managers] == [("slots", 5), ("slots", 5)]
    [worker] = children(balancer.process.pid)

    config.write_text('policy = "round-robin"\nmax_buffered_requests = 7\nbuffered_request_timeout = 12\n')
    os.kill(worker, signal.SIGHUP)  # worker 1 only: it passes it to worker 0, which reloads both
    wait_for(lambda: [settings_of(url) for url in managers] == [("round-robin", 7, 12.0)] * 2,
             deadline=20, what="both workers reloaded after SIGHUP on worker 1")

    config.write_text('policy = "slots"\nmax_buffered_requests = 9\n')
    balancer.process.send_signal(signal.SIGHUP)  # worker 0
    wait_for(lambda: [settings_of(url) for url in managers] == [("slots", 9, 30.0)] * 2,
             deadline=20, what="both workers reloaded after SIGHUP on worker 0")
    assert children(balancer.process.pid) == [worker]  # no worker died of a signal on the way
    assert balancer.stop(signal.SIGTERM, timeout=30) == 0
    log = balancer.log()
    assert "Traceback" not in log
    assert log.count("reload: max_buffered_requests is now 7") == 2, log
    assert log.count("reload: max_buffered_requests is now 9") == 2, log
