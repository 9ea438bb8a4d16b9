"""The documentation: the Sphinx site builds without a warning, and the pages that restate the code
(metrics, state machines) agree with it; the changelog's fragments build; the license is there."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from paddler.agent.service import AGENT_TRANSITIONS
from paddler.fleet.router_events import STREAM_TRANSITIONS
from paddler.fleet.upstream import TRANSITIONS, SlotsSeen, Upstream
from paddler.fleet.placement import ModelPlacement
from paddler.observability.prometheus import Histogram, PrometheusMetrics
from paddler.observability.requests import OUTCOMES, RequestStats
from paddler.observability.statsd import StatsDService, graphite_name
from paddler.routing.policies import CostChooser
from paddler.sharedstate.fleet import SharedFleet

from .helpers import make_pool

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Seconds the whole site may take to build here (it takes about 5 on 2 shared cores).
BUILD_DEADLINE = 120


def test_the_docs_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    """sphinx-build -W -n (furo, MyST) builds every page of docs/: no broken reference, no page
    outside the table of contents, no Markdown MyST cannot read."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=BUILD_DEADLINE, cwd=ROOT,
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    pages = {p.stem for p in (tmp_path / "html").glob("*.html")}
    sources = {p.stem for p in DOCS.glob("*.md")}
    assert sources <= pages, sources - pages
    assert "configuration" in pages and "furo" in (tmp_path / "html" / "index.html").read_text()
    print(f"docs built in {took:.1f} s")  # noqa: T201 - shown with -s, for the record


# -- the metrics reference ----------------------------------------------------


def _metrics_page() -> str:
    return (DOCS / "metrics.md").read_text()


def _a_busy_fleet() -> tuple[Any, RequestStats, Clock]:
    """A pool under the cost policy with two upstreams, and requests of every kind recorded."""
    clock = Clock()
    clock.advance(100.0)
    pool = make_pool(clock, chooser=CostChooser(clock))
    stats = RequestStats(clock)
    for url, name in (("http://10.0.0.1:8080", "gpu-1.example.com"), ("http://10.0.0.2:8080", "gpu 2")):
        upstream = pool.add(Upstream(url, name, clock=clock))
        pool.observe(upstream, SlotsSeen(4, 0, upstream.probe_mark()))
    upstream = next(iter(pool.upstreams.values()))
    for status in (200, 302, 404, 502):
        stats.record(status, 1.0, 0.1, upstream)
    for kind, reasons in OUTCOMES.items():
        for reason in reasons:
            stats.record({"refused": 503, "timed_out": 504, "cancelled": 0}[kind], 0.5, None, None, "",
                         (kind, reason))
    return pool, stats, clock


def shared_state_families() -> set[str]:
    """The families a balancer with --state adds (SharedFleet.metrics, read without a store)."""
    reading = SimpleNamespace(up=True, snapshot=None)
    return {family.name for family in SharedFleet.metrics(reading)}  # type: ignore[arg-type]


def exported_prometheus_names() -> set[str]:
    """Every family a balancer exports, as a PromQL selector names it (counters with _total),
    with --state's families too."""
    pool, stats, _ = _a_busy_fleet()
    metrics = PrometheusMetrics(pool, stats)
    metrics.collector.extra.append(lambda: SharedFleet.metrics(SimpleNamespace(up=True, snapshot=None)))
    placement = SimpleNamespace(loads_total={}, load_seconds=Histogram("paddler_model_load_seconds", "", (1.0,)))
    metrics.collector.extra.append(lambda: ModelPlacement.metrics(placement))  # type: ignore[arg-type]
    from paddler.fleet.registry import AgentRegistry

    registry = AgentRegistry(pool, Clock())
    registry.contradicted["gpu-1"] = 2
    metrics.collector.extra.append(registry.metrics)
    text = metrics.render().decode()
    metrics.close()
    names = set(re.findall(r"^# TYPE (\S+) \S+$", text, re.M))
    assert {f.name for f in text_string_to_metric_families(text)}, "nothing exported"
    return names


def test_metrics_page_lists_every_exported_prometheus_family() -> None:
    """Every Prometheus family a balancer exports (cost policy, requests of every outcome,
    --state) is named in docs/metrics.md, with its exact name."""
    page = _metrics_page()
    names = exported_prometheus_names()
    assert shared_state_families() <= names and "paddler_upstream_prefix_hits_total" in names
    missing = sorted(name for name in names if f"`{name}`" not in page)
    assert missing == []


def test_metrics_page_names_no_prometheus_family_that_is_not_exported() -> None:
    """Every paddler_ name the page gives is exported (or is a histogram's series): the reference
    has no stale name."""
    exported = exported_prometheus_names()
    named = set(re.findall(r"\bpaddler_[a-z_]+", _metrics_page()))
    derived = {n for n in named if re.sub(r"_(bucket|sum|count)$", "", n) in exported}
    assert sorted(named - exported - derived) == []


def statsd_names() -> set[str]:
    """Every StatsD name one report sends for a busy fleet, with NAME for an upstream's name."""
    pool, stats, clock = _a_busy_fleet()
    sent: list[str] = []

    class Client:
        prefix = "paddler"

        def gauge(self, name: str, value: float) -> None:
            sent.append(name)

        def increment(self, name: str, count: int = 1) -> None:
            sent.append(name)

        def timing(self, name: str, milliseconds: float) -> None:
            sent.append(name)

        def flush(self) -> int:
            return 0

    service = StatsDService(Client(), pool, stats, clock)  # type: ignore[arg-type]
    upstream = next(iter(pool.upstreams.values()))
    for status, outcome in ((200, None), (302, None), (404, None), (502, None), (0, None)):
        service.record({"status": status, "duration": 1.0, "ttfb": 0.1, "upstream": upstream.name,
                        "path": "/completion", "outcome": outcome})
    for kind, reasons in OUTCOMES.items():
        for reason in reasons:
            service.record({"status": 503, "duration": 0.1, "ttfb": None, "upstream": None,
                            "path": "/completion", "outcome": (kind, reason)})
    service.report()
    pool.remove(upstream.id)  # a removed upstream's gauges are zeroed once
    service.report()
    names = {u.name for u in pool.upstreams.values()} | {upstream.name}
    # a router-mode upstream with one model: the per-model gauges
    router = pool.add(Upstream("http://10.0.0.7:8080", "router", clock=clock))
    router.role = "router"
    child = Upstream("http://10.0.0.7:8080", "router/m", source="router", clock=clock)
    child.id, child.parent_id, child.router_model, child.model_state = "c", router.id, "m", "loaded"
    pool.add(child)
    pool.observe(child, SlotsSeen(2, 0, child.probe_mark(), models=("m",)))
    service.report()
    names |= {"router", "router/m"}
    components = "|".join(re.escape(graphite_name(n)) for n in names)
    renamed = {re.sub(rf"^upstream\.({components})\.", "upstream.NAME.", name) for name in sent}
    return {re.sub(r"^model\.m\.", "model.MODEL.", name) for name in renamed}


def test_metrics_page_lists_every_statsd_name_the_balancer_sends() -> None:
    """Every StatsD gauge, counter and timer a report sends (a busy fleet under the cost policy,
    requests of every status class and outcome, an upstream removed) is named in the page."""
    page = _metrics_page()
    names = statsd_names()
    assert "upstream.NAME.prefix_hits" in names and "requests.refused.buffer_full" in names
    missing = sorted(name for name in names if f"`PREFIX.{name}`" not in page)
    assert missing == []


def test_metrics_page_names_no_statsd_name_that_is_not_sent() -> None:
    """Every PREFIX.name the page lists is one the balancer sends."""
    listed = set(re.findall(r"`PREFIX\.([A-Za-z0-9_.]+)`", _metrics_page()))
    assert sorted(listed - statsd_names()) == []


# -- the state machines ---------------------------------------------------------


def documented_tables() -> dict[str, dict[tuple[str, str], str]]:
    """The transition tables of docs/states.md, by the code name in the comment above each."""
    tables: dict[str, dict[tuple[str, str], str]] = {}
    lines = (DOCS / "states.md").read_text().splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"<!-- transitions: (\S+) -->", line)
        if not match:
            continue
        header = [c.strip().strip("`") for c in lines[index + 1].strip("|").split("|")][1:]
        table: dict[tuple[str, str], str] = {}
        for row in lines[index + 3:]:
            if not row.startswith("|"):
                break
            cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
            for event, target in zip(header, cells[1:]):
                if target != "—":
                    table[cells[0], event] = target
        tables[match.group(1)] = table
    return tables


@pytest.mark.parametrize(
    "name, transitions",
    [("paddler.fleet.upstream.TRANSITIONS", TRANSITIONS),
     ("paddler.agent.service.AGENT_TRANSITIONS", AGENT_TRANSITIONS),
     ("paddler.fleet.router_events.STREAM_TRANSITIONS", STREAM_TRANSITIONS)],
)
def test_state_machine_tables_in_the_docs_are_the_code_s(name: str, transitions: dict[Any, Any]) -> None:
    """docs/states.md has the upstream and agent transition tables exactly as the code has them:
    every allowed (state, event) pair with its target, and no other."""
    in_code = {(state.value, event.value): target.value for (state, event), target in transitions.items()}
    assert documented_tables()[name] == in_code


# -- changelog and license ----------------------------------------------------------


def test_towncrier_builds_a_draft_changelog_from_the_fragments() -> None:
    """`towncrier build --draft` renders every fragment in newsfragments/ into a changelog section
    (and writes nothing); fragments are named ISSUE.TYPE[.N].md with a known type."""
    fragments = sorted(p for p in (ROOT / "newsfragments").iterdir() if p.name != "README.md")
    assert fragments
    for fragment in fragments:
        assert re.fullmatch(r"(\d+|\+[\w-]+)\.(feature|bugfix|removal|doc|misc)(\.\d+)?\.md", fragment.name)
    before = (ROOT / "CHANGELOG.md").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "towncrier", "build", "--draft"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for fragment in fragments:
        assert fragment.read_text().split()[1] in result.stdout, fragment.name
    assert "## paddler " in result.stdout and "### Features" in result.stdout
    assert (ROOT / "CHANGELOG.md").read_text() == before


def test_license_is_the_apache_2_text_setup_cfg_declares() -> None:
    """LICENSE holds the Apache License 2.0 (its full text), as setup.cfg's license says, and is
    shipped (license_files)."""
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10_000
    cfg = (ROOT / "setup.cfg").read_text()
    assert re.search(r"^license = Apache-2\.0$", cfg, re.M)
    assert re.search(r"^license_files = LICENSE$", cfg, re.M)
