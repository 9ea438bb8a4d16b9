"""Prometheus: a live balancer's /metrics passes promtool, and a real Prometheus scrapes and queries it.

promtool and prometheus come from Debian's ``prometheus`` package
(``tests/ops/install-prometheus``); the test Prometheus listens on a free
loopback port, scrapes every second and is stopped at the end.
"""

from __future__ import annotations

import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..processes import Processes, free_port, get_json, wait_for
from .conftest import ROOT, Daemon, LiveBalancer, post
from .metric_names import COUNTERS, EXPECTED, HISTOGRAMS, exposed_names, families

KEDA_SCALED_OBJECT = ROOT / "contrib" / "kubernetes" / "keda-scaledobject.yaml"
SCRAPE_INTERVAL = "1s"
#: Requests sent to each balancer at once; each balancer has one 1-slot upstream.
BURST = 3
#: Tokens per request at 20 tokens/s: each request holds its slot for 2 s.
N_PREDICT = 40


@pytest.mark.integration
def test_promtool_check_metrics_accepts_a_live_balancers_metrics(
    live_balancer: LiveBalancer, prometheus_dir: Path
) -> None:
    """`promtool check metrics` finds no problem (no `_total` gauge, no bad names) in /metrics after real traffic."""
    result = subprocess.run(
        [str(prometheus_dir / "promtool"), "check", "metrics"],
        input=live_balancer.metrics(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_promtool_does_reject_a_gauge_named_like_a_counter(prometheus_dir: Path) -> None:
    """The check can fail: a gauge ending in _total is reported."""
    bad = "# HELP x_slots_total Slots.\n# TYPE x_slots_total gauge\nx_slots_total 4\n"
    result = subprocess.run(
        [str(prometheus_dir / "promtool"), "check", "metrics"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "_total" in result.stdout + result.stderr


@pytest.mark.integration
def test_every_documented_metric_is_exported_and_nothing_else_is_created(live_balancer: LiveBalancer) -> None:
    """Each final name is a family in /metrics with the right type; no `_created` series; counters carry their label."""
    text = live_balancer.metrics()
    exported = families(text)
    missing = sorted(name for name in EXPECTED if name not in exported)
    assert missing == [], f"not exported: {missing}"
    for name in COUNTERS:
        assert exported[name] == "counter", name
    for name in HISTOGRAMS:
        assert exported[name] == "histogram", name
    assert not [name for name in exposed_names(text) if name.endswith("_created")]
    samples = [line for line in text.splitlines() if line.startswith("paddler_requests_total{")]
    assert samples and all('status_class="' in line for line in samples)


def test_exposed_names_reads_families_histogram_parts_and_samples() -> None:
    """The helper the name checks rely on: histogram parts are added, comments are not samples."""
    text = (
        "# HELP a_seconds A.\n# TYPE a_seconds histogram\n"
        'a_seconds_bucket{le="1.0"} 1.0\n# TYPE b gauge\nb 2\nc_total{x="y"} 3\n'
    )
    assert exposed_names(text) == {"a_seconds", "a_seconds_bucket", "a_seconds_sum", "a_seconds_count", "b", "c_total"}
    assert families(text) == {"a_seconds": "histogram", "b": "gauge"}


# -- a real Prometheus -------------------------------------------------------------


class PrometheusAPI:
    """The HTTP query API of a test Prometheus."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expression: str) -> list[dict[str, Any]]:
        """``/api/v1/query``: the result vector (empty when no series matches)."""
        status, body = get_json(self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expression}))
        assert status == 200 and body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return body["data"]["result"]

    def scalar(self, expression: str) -> float | None:
        """The value of a one-element result vector, or None when it is empty."""
        result = self.query(expression)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


def start_prometheus(
    daemons: Callable[..., Daemon], prometheus_dir: Path, tmp_path: Path, targets: list[str]
) -> PrometheusAPI:
    port = free_port()
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": "paddler",
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": "900ms",
                "static_configs": [{"targets": targets}],
            }
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    daemon = daemons(
        [
            str(prometheus_dir / "prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        "prometheus",
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert daemon.running(), "prometheus exited:\n" + daemon.log()
        with urllib.request.urlopen(url + "/-/ready", timeout=2) as response:
            return response.status == 200

    wait_for(ready, deadline=30, what="prometheus ready")
    return PrometheusAPI(url)


@pytest.mark.integration
def test_a_real_prometheus_scrapes_two_balancers_and_answers_the_keda_query(
    procs: Processes, daemons: Callable[..., Daemon], prometheus_dir: Path, tmp_path: Path
) -> None:
    """Two balancers, each with one 1-slot upstream and three requests at once (one served, two buffered):
    Prometheus sees the buffered gauge, the KEDA query's peak demand, a 2xx request rate, and the totals the balancers report."""
    balancers = []
    for _ in range(2):
        _, upstream = procs.simulator(1, 20.0)
        _, proxy, management = procs.balancer("--upstream", upstream, "--probe-interval", "0.2")
        wait_for(lambda: get_json(proxy + "/health")[1]["slots_idle"] == 1, what="upstream probed")
        balancers.append((proxy, management))
    prometheus = start_prometheus(
        daemons, prometheus_dir, tmp_path, [urllib.parse.urlsplit(m).netloc for _, m in balancers]
    )
    wait_for(lambda: prometheus.scalar('sum(up{job="paddler"})') == 2, deadline=20, what="both targets up")

    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda p=proxy, i=i: statuses.append(
            post(p + "/completion", {"prompt": f"q{i}", "n_predict": N_PREDICT}, timeout=60)))
        for proxy, _ in balancers
        for i in range(BURST)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [200] * (2 * BURST)

    (scaled,) = yaml.safe_load_all(KEDA_SCALED_OBJECT.read_text())
    keda_query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    # Each balancer held BURST requests (1 in flight + 2 buffered) for the first 2 s:
    # at least one 1 s scrape in that window sees >= 2 * (BURST - 1) outstanding.
    peak = wait_for(
        lambda: (prometheus.scalar(f"max_over_time(({keda_query})[1m:1s])") or 0) >= 2 * (BURST - 1)
        and prometheus.scalar(f"max_over_time(({keda_query})[1m:1s])"),
        deadline=15,
        what="the KEDA query's peak seen by Prometheus",
    )
    assert peak <= 2 * BURST
    assert (prometheus.scalar("max_over_time(sum(paddler_requests_buffered)[1m:1s])") or 0) >= 2
    wait_for(
        lambda: (prometheus.scalar('sum(rate(paddler_requests_total{status_class="2xx"}[10s]))') or 0) > 0,
        deadline=15,
        what="a 2xx request rate",
    )

    def totals_agree() -> bool:
        served = sum(get_json(m + "/api/v1/state?history=0")[1]["requests"]["by_status"].get("2xx", 0)
                     for _, m in balancers)
        scraped = prometheus.scalar('sum(paddler_requests_total{status_class="2xx"})')
        buffered = prometheus.scalar("sum(paddler_requests_buffered)")
        return served == 2 * BURST and scraped == served and buffered == 0

    wait_for(totals_agree, deadline=15, what="Prometheus's totals equal to the balancers' own")
    assert prometheus.scalar(keda_query) == 0
