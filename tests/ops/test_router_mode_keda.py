"""The per-model KEDA ScaledObject of docs/router-mode.md passes KEDA's CRD schema and reads the
per-model series the balancer exports."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .metric_names import EXPECTED
from .test_kubernetes import run_check_jsonschema

DOC = Path(__file__).resolve().parents[2] / "docs" / "router-mode.md"


def scaled_object_text() -> str:
    [block] = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    return block


def test_the_per_model_scaled_object_passes_the_keda_crd_schema(tmp_path: Path) -> None:
    """check-jsonschema accepts the documented ScaledObject against the vendored KEDA schema."""
    path = tmp_path / "keda-per-model.yaml"
    path.write_text(scaled_object_text())
    result = run_check_jsonschema(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_per_model_scaled_object_reads_that_models_series() -> None:
    """Its query sums paddler_requests_buffered and paddler_slots for its own model (both
    exported names), and it scales the Deployment of that model from zero."""
    scaled = yaml.safe_load(scaled_object_text())
    [trigger] = scaled["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    assert 'sum(paddler_requests_buffered{model="alpha"})' in query
    assert 'sum(paddler_slots{model="alpha",state="busy"})' in query
    assert {"paddler_requests_buffered", "paddler_slots"} <= set(EXPECTED)
    assert scaled["spec"]["scaleTargetRef"]["name"] == "llamacpp-alpha"
    assert scaled["spec"]["minReplicaCount"] == 0
