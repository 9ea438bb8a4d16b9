"""Registration at fleet scale on a real balancer: five hundred agents report, are listed, scraped
and expire; the balancer refuses itself as an upstream. (Two real agent processes register, serve,
drain on SIGTERM and register again in the soak, tests/chaos/test_soak.py.)"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time

import pytest

from ..processes import ROOT
from .harness import (
    call,
    free_port,
    get_json,
    log_problems,
    open_fds,
    report,
    rss_mib,
    scaled,
    start_balancer,
    upstreams,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def test_five_hundred_agents_register_report_and_expire_and_the_balancer_refuses_itself(procs, tmp_path):
    count = 500
    rounds = scaled(2, 20)
    balancer, proxy, management = start_balancer(procs, "--agent-expiry", "1")
    pid = balancer.process.pid
    fds_before, rss_before = open_fds(pid), rss_mib(pid)
    port = int(management.rsplit(":", 1)[1])
    statuses: dict[int, int] = {}
    reregistered = [0]
    lock = threading.Lock()

    def agent_range(first: int, last: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # kept alive, like an agent's
        tokens = {}

        def register(i: int) -> None:
            conn.request("POST", "/api/v1/agents", json.dumps({
                "agent_id": f"agent-{i}", "name": f"gpu-{i}", "url": f"http://10.{i // 250}.{i % 250}.1:8080",
            }), {"Content-Type": "application/json"})
            response = conn.getresponse()
            tokens[i] = json.loads(response.read())["agent_token"]
            with lock:
                statuses[response.status] = statuses.get(response.status, 0) + 1

        for i in range(first, last):  # each agent registers first and gets its token
            register(i)
        for _ in range(rounds):
            for i in range(first, last):
                report_body = {
                    "name": f"gpu-{i}", "url": f"http://10.{i // 250}.{i % 250}.1:8080",
                    "slots_idle": 3, "slots_processing": 1, "model": "m.gguf", "interval": 2,
                }
                conn.request("POST", f"/api/v1/agents/agent-{i}/report", json.dumps(report_body),
                             {"Content-Type": "application/json", "Authorization": f"Bearer {tokens[i]}"})
                response = conn.getresponse()
                response.read()
                if response.status == 401:
                    # its host expired between two reports on a busy machine (and with it the
                    # token): register again and report, as paddler agent does
                    with lock:
                        reregistered[0] += 1
                    register(i)
                    conn.request("POST", f"/api/v1/agents/agent-{i}/report", json.dumps(report_body),
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {tokens[i]}"})
                    response = conn.getresponse()
                    response.read()
                with lock:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=agent_range, args=(i, i + 25)) for i in range(0, count, 25)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    seconds = time.monotonic() - started
    assert statuses == {201: count + reregistered[0], 200: count * rounds}, statuses
    fleet = upstreams(management)
    assert len(fleet) == count and all(u["state"] == "healthy" and u["slots_total"] == 4 for u in fleet)
    _, health = get_json(proxy + "/health")
    assert health["upstreams"] == {"healthy": count, "total": count} and health["slots_idle"] == 3 * count
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse()
    scrape = metrics.read().decode()
    conn.close()
    assert metrics.status == 200 and scrape.count("paddler_upstream_slots_idle{") == count
    assert call(management, "GET", "/api/v1/state").kind == "completed"
    rss_registered = rss_mib(pid)
    expiry_started = time.monotonic()
    wait_for(lambda: upstreams(management) == [], 25, "every silent agent's host removed")
    expiry = time.monotonic() - expiry_started
    report(
        "registration_500", agents=count, reports=count * rounds, seconds=round(seconds, 2),
        reports_per_second=round(count * rounds / seconds), expired_in_seconds=round(expiry, 2),
        registered_again=reregistered[0],
        fds_before=fds_before, rss_before_mib=round(rss_before, 1), rss_with_500_mib=round(rss_registered, 1),
        rss_after_mib=round(rss_mib(pid), 1), metrics_scrape_bytes=len(scrape),
    )
    assert get_json(management + "/api/v1/agents")[1]["agents"] == []
    problems = log_problems(balancer.log())
    assert problems == [], problems[:10]

    # the same balancer refuses itself as an upstream
    for url in (proxy, proxy.replace("127.0.0.1", "localhost"), management):
        answer = call(management, "POST", "/api/v1/upstreams", {"url": url, "name": "me"})
        assert answer.status == 400 and "this balancer itself" in answer.detail, answer
    proxy_port = proxy.rsplit(":", 1)[1]
    for url in (proxy, f"http://127.1:{proxy_port}", f"http://[::ffff:127.0.0.1]:{proxy_port}",
                f"http://2130706433:{proxy_port}"):
        answer = call(management, "POST", "/api/v1/agents", {"agent_id": "a1", "name": "me", "url": url})
        assert answer.status == 400 and answer.body["error"]["param"] == "url", answer
    answer = call(management, "POST", "/api/v1/upstreams", {"url": "http://169.254.169.254", "name": "meta"})
    assert answer.status == 403 and "--allow-upstream-network" in answer.detail, answer
    assert upstreams(management) == []

    port = free_port()
    config = tmp_path / "paddler.toml"
    config.write_text(
        f'listen = "tcp:{port}:interface=127.0.0.1"\n[[upstream]]\nurl = "http://127.0.0.1:{port}"\nname = "me"\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "paddler", "balancer", "--config", str(config)],
        capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )
    assert run.returncode == 2
    assert f"upstream http://127.0.0.1:{port} is this balancer's own --listen address" in run.stderr
    assert "Traceback" not in run.stderr
