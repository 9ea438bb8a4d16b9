"""contrib/grafana/paddler.json: a well-formed dashboard whose every metric exists in a live /metrics.

Every PromQL expression (panel targets and the ``upstream`` variable's
query) is parsed by ``promtool`` (as a recording rule) and the metric names
in it are looked up in a running balancer's ``/metrics``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, LiveBalancer
from .metric_names import EXPECTED, HISTOGRAMS, exposed_names

DASHBOARD = ROOT / "contrib" / "grafana" / "paddler.json"
GRID_WIDTH = 24
#: Grafana's variables, replaced by something PromQL parses before promtool sees the expression.
VARIABLES = {"$__rate_interval": "1m", "$upstream": ".*"}
#: PromQL words that look like metric names but are not.
KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "Inf", "NaN", "atan2",
}
_LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)$")


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or durations)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":
            continue  # the exponent of 1e3
        if text[match.end():].lstrip().startswith("(") or match.group() in KEYWORDS:
            continue
        names.add(match.group())
    return names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets, then the query variables' metric selectors."""
    found = [target["expr"] for panel in panels(board) for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = _LABEL_VALUES.match(variable["definition"])
            assert match, variable["definition"]
            found.append(match.group(1))
    return found


def test_metric_names_finds_selectors_and_skips_functions_labels_and_durations() -> None:
    """The extractor the live check relies on, on expressions shaped like the dashboard's."""
    assert metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(a_seconds_bucket{upstream=~"$upstream"}[$__rate_interval])))'
    ) == {"a_seconds_bucket"}
    assert metric_names("max(b) / clamp_min(max(c_capacity), 1)") == {"b", "c_capacity"}
    assert metric_names('sum(rate(d_total{x="by (y)"}[5m])) by (reason) + on(job) group_left e offset 1m') == {"d_total", "e"}
    assert metric_names("f > bool 1e3 and g") == {"f", "g"}


def test_the_dashboard_is_well_formed_grafana_json() -> None:
    """A uid and title, unique panel ids, panels inside the 24-column grid, every target with a unique refId and the datasource variable."""
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    all_panels = panels(board)
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in all_panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= GRID_WIDTH and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("description"), f"{panel['title']} says nothing of what it shows"
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(target["datasource"]["uid"] == "${datasource}" for target in panel["targets"])


def test_panels_do_not_overlap() -> None:
    """No two panels share a grid cell (Grafana would push one down and the layout would shift)."""
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard()):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def substitute(expression: str) -> str:
    for variable, value in VARIABLES.items():
        expression = expression.replace(variable, value)
    assert "$" not in expression, f"an unknown Grafana variable in {expression}"
    return expression


def test_promtool_parses_every_expression(prometheus_dir: Path, tmp_path: Path) -> None:
    """Each expression (Grafana variables filled in) is valid PromQL: promtool accepts them all as recording rules."""
    rules = {
        "groups": [
            {
                "name": "paddler-dashboard",
                "rules": [{"record": f"dashboard:expression_{i}", "expr": substitute(e)} for i, e in enumerate(expressions(dashboard()))],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [str(prometheus_dir / "promtool"), "check", "rules", str(path)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    path.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [{"record": "x:y", "expr": "sum(rate(a[1m])"}]}]}))
    assert subprocess.run(
        [str(prometheus_dir / "promtool"), "check", "rules", str(path)], capture_output=True, timeout=60
    ).returncode != 0


def test_the_dashboard_shows_every_exported_family() -> None:
    """Every documented metric family is on the dashboard (histograms through their buckets)."""
    used = set().union(*map(metric_names, expressions(dashboard())))
    wanted = {name + "_bucket" if name in HISTOGRAMS else name for name in EXPECTED}
    assert sorted(wanted - used) == []
    assert all(name.startswith("paddler_") for name in used), used


@pytest.mark.integration
def test_every_metric_the_dashboard_queries_is_in_a_live_balancers_metrics(live_balancer: LiveBalancer) -> None:
    """Each metric name in each PromQL expression appears in /metrics of a balancer that has served requests."""
    exposed = exposed_names(live_balancer.metrics())
    missing = {
        name: expression
        for expression in expressions(dashboard())
        for name in metric_names(expression)
        if name not in exposed
    }
    assert sorted(missing) == []
