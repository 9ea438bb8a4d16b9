"""SIGTERM and SIGHUP with streams open, on real processes.

SIGTERM: the listener closes, buffered requests get a JSON 503 at once,
running streams finish, and the process exits 0 as soon as they have (or
at --shutdown-timeout, cutting what still runs). SIGHUP with a changed
configuration file applies it (upstreams added and removed, limits) and
drops no stream; a file that no longer parses changes nothing.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any

import pytest

from .harness import (
    Simulated,
    chat,
    free_port,
    get_json,
    log_problems,
    report,
    start_balancer,
    upstreams,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def in_threads(calls: list[Any]) -> tuple[list[threading.Thread], list[Any]]:
    results: list[Any] = [None] * len(calls)

    def run(i: int, fn: Any) -> None:
        results[i] = fn()

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate(calls)]
    for thread in threads:
        thread.start()
    return threads, results


def test_sigterm_cuts_streams_still_running_at_the_shutdown_timeout_and_exits_0(procs):
    sim = Simulated(procs, free_port(), 2, 10.0)
    sim.start()
    sim.wait_up()
    balancer, proxy, _ = start_balancer(
        procs, "--upstream", sim.url, "--probe-interval", "0.25", "--shutdown-timeout", "1",
    )
    wait_for(lambda: get_json(proxy + "/health")[1]["upstreams"]["healthy"] == 1, 20, "probed")
    streams, results = in_threads([lambda: chat(proxy, 100, True) for _ in range(2)])
    wait_for(lambda: sim.busy() == 2, 10, "both streams running")
    signalled = time.monotonic()
    balancer.process.send_signal(signal.SIGTERM)
    code = balancer.process.wait(10)
    exited_after = time.monotonic() - signalled
    for thread in streams:
        thread.join(10)
    assert code == 0 and 0.9 < exited_after < 3.0, exited_after
    assert [r.kind for r in results] == ["broken", "broken"], results  # cut, and the client sees it
    wait_for(lambda: sim.busy() == 0, 5, "the server's slots freed")
    log = balancer.log()
    assert "still running after 1s (--shutdown-timeout); cut 2 of them" in log
    assert log_problems(log) == []
    report("sigterm_cut", streams=2, shutdown_timeout_s=1, exited_in_s=round(exited_after, 2), exit_code=code)


def test_sighup_applies_a_changed_config_without_dropping_a_stream_and_sigterm_drains(procs, tmp_path):
    sims = [Simulated(procs, free_port(), 2, 40.0) for _ in range(2)]
    for sim in sims:
        sim.start()
    for sim in sims:
        sim.wait_up()
    config = tmp_path / "paddler.toml"

    def write(upstream_names: list[int], buffered: int) -> None:
        lines = [f"max_buffered_requests = {buffered}", "probe_interval = 0.25"]
        for i in upstream_names:
            lines += ["[[upstream]]", f'url = "{sims[i].url}"', f'name = "s{i}"']
        config.write_text("\n".join(lines) + "\n")

    write([0], 5)
    balancer, proxy, management = start_balancer(procs, "--config", str(config))
    wait_for(lambda: [u["state"] for u in upstreams(management)] == ["healthy"], 20, "s0 probed")
    streams, results = in_threads([lambda: chat(proxy, 50, True, prompt=f"h{i}") for i in range(2)])
    wait_for(lambda: sims[0].busy() == 2, 10, "two streams on s0")

    write([0, 1], 7)
    balancer.process.send_signal(signal.SIGHUP)
    wait_for(lambda: sorted(u["name"] for u in upstreams(management) if u["state"] == "healthy")
             == ["s0", "s1"], 10, "s1 added")
    assert chat(proxy, 3, False).kind == "completed"  # served by s1 while s0 is full

    write([1], 7)  # s0 leaves while both its streams run: drained, removed once they end
    balancer.process.send_signal(signal.SIGHUP)
    wait_for(lambda: any(u["name"] == "s0" and u["draining"] for u in upstreams(management)), 10, "s0 drains")

    config.write_text("max_buffered_requests = [\n")  # no longer TOML
    balancer.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload: the configuration is not valid" in balancer.log(), 10, "bad file logged")
    for thread in streams:
        thread.join(30)
    assert [r.kind for r in results] == ["completed", "completed"], results
    wait_for(lambda: [u["name"] for u in upstreams(management)] == ["s1"], 10, "s0 removed after its streams")
    assert chat(proxy, 3, True).kind == "completed"
    log = balancer.log()
    assert f"reload: upstream s1 ({sims[1].url}) added" in log
    assert "reload: max_buffered_requests is now 7" in log
    assert f"reload: upstream s0 ({sims[0].url}) removed from the configuration" in log
    assert balancer.process.poll() is None

    # SIGTERM: two streams run on s1 and three requests wait for a slot
    streams, stream_results = in_threads([lambda: chat(proxy, 40, True, prompt=f"s{i}") for i in range(2)])
    wait_for(lambda: sims[1].busy() == 2, 10, "both streams running")
    waiting, waiting_results = in_threads([lambda: chat(proxy, 4, False, prompt=f"b{i}") for i in range(3)])
    wait_for(lambda: get_json(proxy + "/health")[1]["requests_buffered"] == 3, 10, "three buffered")
    signalled = time.monotonic()
    balancer.process.send_signal(signal.SIGTERM)
    for thread in waiting:
        thread.join(10)
    refused_after = time.monotonic() - signalled
    port = int(proxy.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    code = balancer.process.wait(15)
    exited_after = time.monotonic() - signalled
    for thread in streams:
        thread.join(10)
    report("sighup_then_sigterm", reloads=3, streams_through_reloads=2, streams_at_sigterm=2, buffered=3,
           buffered_answered_in_s=round(refused_after, 2), exited_in_s=round(exited_after, 2), exit_code=code)
    assert [r.kind for r in stream_results] == ["completed", "completed"], stream_results
    for result in waiting_results:
        assert result.status == 503 and "shutting down" in result.detail, result
    assert refused_after < 1.5
    assert code == 0 and exited_after < 10  # when the streams ended, not at --shutdown-timeout (30 s)
    log = balancer.log()
    assert "every running request has finished" in log
    assert log_problems(log) == []
