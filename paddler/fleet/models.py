"""Which model a request is for, and the fleet's list of models.

A fleet is I{multi-model} once one of its upstreams is a router-mode
llama-server (L{paddler.fleet.routers}). Then a request must name a model
the fleet serves (its ``model`` body field, or ``?model=``), after
``--model-alias NAME=TARGET`` and the routers' own ``aliases``: an unknown
model is a 404 in OpenAI's shape (``code: model_not_found``, naming only the
model asked for); no model is a 400, unless ``--default-model`` is set. A
fleet of single-model servers keeps today's behaviour: the model name only
narrows the choice when some upstream serves it, and is otherwise ignored
(as llama-server ignores it).

``/v1/models`` and ``/models`` of a multi-model fleet are answered by the
balancer: the union of every upstream's models, one entry per id, with the
fleet-wide status (``loaded`` on N upstreams, else ``loading``, else
``unloaded``; ``failed`` when every copy failed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from paddler.errors import BadRequest, NotFound
from paddler.fleet.upstream import Upstream

__all__ = [
    "ModelNotFound", "ModelRequired", "fleet_models", "is_multi_model", "parse_model_aliases",
    "resolve_model",
]


class ModelNotFound(NotFound):
    """A request names a model no upstream serves (OpenAI's 404 ``model_not_found``)."""

    error_type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        shown = model if len(model) <= 200 else model[:200] + "..."
        super().__init__(f"The model '{shown}' does not exist", param="model")
        self.extra["code"] = "model_not_found"


class ModelRequired(BadRequest):
    """A request to a multi-model fleet that names no model (and no --default-model)."""

    def __init__(self) -> None:
        super().__init__(
            "this balancer serves several models: name one in the request's \"model\" field "
            "(GET /v1/models lists them)",
            param="model",
        )


def is_multi_model(upstreams: Iterable[Upstream]) -> bool:
    """True when some upstream is a router-mode llama-server."""
    return any(u.role == "router" for u in upstreams)


def parse_model_aliases(entries: Iterable[str]) -> dict[str, str]:
    """``["fast=alpha", "big=gamma"]`` -> C{{"fast": "alpha", "big": "gamma"}}.

    @raise ValueError: an entry is not NAME=TARGET, or a name is given twice.
    """
    aliases: dict[str, str] = {}
    for entry in entries:
        name, sep, target = entry.partition("=")
        name, target = name.strip(), target.strip()
        if not sep or not name or not target:
            raise ValueError(f"expected NAME=TARGET, got {entry!r}")
        if name in aliases:
            raise ValueError(f"alias {name!r} is given twice")
        aliases[name] = target
    return aliases


def _served(upstreams: Iterable[Upstream]) -> set[str]:
    return {name for u in upstreams if u.role != "router" for name in u.models}


def resolve_model(
    upstreams: Iterable[Upstream],
    model: str | None,
    aliases: Mapping[str, str] | None = None,
    default: str | None = None,
) -> str | None:
    """The model a request is for, after aliases and the default.

    @raise ModelNotFound: a multi-model fleet serves no such model.
    @raise ModelRequired: a multi-model fleet, no model and no default.
    """
    pool = list(upstreams)
    if model is None:
        model = default
    if model is not None and aliases:
        model = aliases.get(model, model)
    if not is_multi_model(pool):
        return model
    if model is None:
        raise ModelRequired()
    if model not in _served(pool):
        raise ModelNotFound(model)
    return model


_RANK = {"loaded": 4, "sleeping": 3, "loading": 2, "unloaded": 1, "failed": 0}


def fleet_models(upstreams: Iterable[Upstream], created: int) -> dict[str, Any]:
    """The ``/v1/models`` body of the fleet: one entry per model id, in OpenAI's list shape."""
    entries: dict[str, dict[str, Any]] = {}
    for u in upstreams:
        if u.role == "router" or not u.models:
            continue
        model_id = u.router_model or u.models[0]
        entry = entries.get(model_id)
        if entry is None:
            entry = entries[model_id] = {
                "id": model_id, "object": "model", "created": created, "owned_by": "llamacpp",
                "aliases": [], "status": {"value": "failed", "loaded": 0, "upstreams": []},
            }
        for alias in u.models:
            if alias != model_id and alias not in entry["aliases"]:
                entry["aliases"].append(alias)
        state = u.model_state or ("loaded" if u.state.serving else "unloaded")
        status = entry["status"]
        status["upstreams"].append({"name": u.name, "id": u.id, "state": state})
        if state in ("loaded", "sleeping") and u.state.serving:
            status["loaded"] += 1
        if _RANK[state] > _RANK[status["value"]]:
            status["value"] = state
    return {"object": "list", "data": sorted(entries.values(), key=lambda e: e["id"])}
