"""Turn a CustomResourceDefinition's OpenAPI v3 schema into a strict JSON Schema.

    python crd_to_jsonschema.py keda.sh_scaledobjects.yaml v1alpha1 > scaledobject-v1alpha1.json

The API server prunes fields a CRD does not declare; a validator does not. So
that a misspelt field (``minReplicaCounts``) is an error here, every object
schema that lists ``properties`` and says nothing of other keys gets
``additionalProperties: false``; ``apiVersion`` and ``kind`` are pinned to the
CRD's group/version and kind. The ``x-kubernetes-*`` keys are kept (JSON
Schema validators ignore them); their CEL rules (``x-kubernetes-validations``)
are not evaluated, so check those separately.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_json_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    """The strict JSON Schema of one served version of C{crd}."""
    spec = crd["spec"]
    for served in spec["versions"]:
        if served["name"] == version:
            break
    else:
        raise KeyError(f"{crd['metadata']['name']} has no version {version!r}")
    schema = _strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{spec['group']}/{version}"}
    schema["properties"]["kind"] = {"const": spec["names"]["kind"]}
    schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", [])})
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": f"{spec['names']['kind']} {spec['group']}/{version}",
        **schema,
    }


def render(crd_path: str, version: str) -> str:
    """The JSON text written for C{crd_path}'s C{version} (stable key order)."""
    with open(crd_path, encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    return json.dumps(crd_json_schema(crd, version), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(sys.argv[1], sys.argv[2]))
