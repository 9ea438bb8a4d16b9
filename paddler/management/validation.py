"""Checking what management API clients and agents send: bodies, fields, numbers, flags.

Every check raises a L{BadRequest} (or L{RequestTooLarge}) naming the field
at fault in C{param}; nothing is changed before a request has passed them
all. Numbers are bounded: an agent can send nothing that breaks a metric
or a sum.
"""

from __future__ import annotations

import json
import re
from typing import Any

from paddler.errors import BadRequest, RequestTooLarge
from paddler.fleet.registry import AgentReport
from paddler.fleet.upstream import InvalidUpstreamURL, UpstreamState, normalise_url
from paddler.llamacpp.slots import (
    MAX_MODEL_NAME,
    MAX_ROUTER_MODELS,
    MODEL_STATES,
    ModelReading,
    RouterReading,
)

#: Largest request body the management API reads.
MAX_BODY = 64 * 1024
MAX_NAME = 128
#: Most slots one llama.cpp server may report (llama-server's -np is far below).
MAX_SLOTS = 4096
MAX_REPORT_INTERVAL = 300.0
#: Most models a router-mode server may run at once, as an agent reports it (``max_instances``).
MAX_INSTANCES = 1024
#: Most aliases one model of a router may have (the probe keeps as many).
MAX_ALIASES = 16
AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def json_object(request: Any) -> dict[str, Any]:
    """The request's body as a JSON object (at most L{MAX_BODY} bytes)."""
    if getattr(request, "body_too_large", False):  # a BoundedRequest kept none of it
        raise RequestTooLarge(f"the body must be at most {MAX_BODY} bytes")
    raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(raw) > MAX_BODY:
        raise RequestTooLarge(f"the body must be at most {MAX_BODY} bytes")
    if not raw.strip():
        raise BadRequest("the body must be a JSON object", param="body")
    try:
        parsed = json.loads(raw)
    except RecursionError:
        raise BadRequest("the body is nested too deeply", param="body") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}", param="body") from None
    if not isinstance(parsed, dict):
        raise BadRequest("the body must be a JSON object", param="body")
    return parsed


def string_field(body: dict[str, Any], field: str, required: bool, max_length: int = 1024) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise BadRequest(f"{field} is required", param=field)
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string", param=field)
    if not value.strip():
        raise BadRequest(f"{field} must not be empty", param=field)
    if len(value) > max_length:
        raise BadRequest(f"{field} must be at most {max_length} characters", param=field)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise BadRequest(f"{field} must not contain control characters", param=field)
    return value


def url_field(body: dict[str, Any], field: str) -> str:
    raw = string_field(body, field, required=True)
    assert raw is not None
    try:
        return normalise_url(raw)
    except InvalidUpstreamURL as e:
        raise BadRequest(f"{field}: {e}", param=field) from None


def slot_count(body: dict[str, Any], field: str, required: bool) -> int | None:
    value = body.get(field)
    if value is None:
        if required:
            raise BadRequest(f"{field} is required", param=field)
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SLOTS:
        raise BadRequest(f"{field} must be a whole number from 0 to {MAX_SLOTS}", param=field)
    return value


def flag_argument(request: Any, name: bytes) -> bool:
    """A C{?name=true|false} query argument (absent: false)."""
    values = request.args.get(name, [])
    if not values:
        return False
    field = name.decode("latin-1")
    value = values[-1].decode("latin-1").lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise BadRequest(f"{field} must be true or false, got {value[:50]!r}", param=field)


def agent_id(value: str) -> str:
    if not AGENT_ID.fullmatch(value):
        raise BadRequest("agent_id must be 1-64 letters, digits, '.', '_' or '-'", param="agent_id")
    return value


def _model_name(value: Any) -> bool:
    return (
        isinstance(value, str) and 0 < len(value) <= MAX_MODEL_NAME
        and not any(ord(c) < 32 or ord(c) == 127 for c in value)
    )


def _whole(value: Any, low: int, high: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high


def _router_model(index: int, entry: Any) -> ModelReading:
    """One entry of a router report's C{router_models} (see L{agent_report})."""
    where = f"router_models[{index}]"
    if not isinstance(entry, dict):
        raise BadRequest(f"{where} must be an object", param="router_models")
    model_id = entry.get("id")
    if not _model_name(model_id):
        raise BadRequest(f"{where}.id must be 1 to {MAX_MODEL_NAME} printable characters", param="router_models")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or len(aliases) > MAX_ALIASES or not all(_model_name(a) for a in aliases):
        raise BadRequest(
            f"{where}.aliases must be a list of at most {MAX_ALIASES} names of 1 to {MAX_MODEL_NAME} "
            "printable characters", param="router_models",
        )
    state = entry.get("state")
    if state not in MODEL_STATES:
        raise BadRequest(f"{where}.state must be one of {', '.join(MODEL_STATES)}", param="router_models")
    exit_code = entry.get("exit_code", 0)
    if not _whole(exit_code, -(2**31), 2**31 - 1):
        raise BadRequest(f"{where}.exit_code must be a whole number (a process exit code)", param="router_models")
    if exit_code and state != "failed":
        raise BadRequest(f"{where}.exit_code is set but its state is {state}, not failed", param="router_models")
    total = entry.get("slots_total", 0)
    processing = entry.get("slots_processing", 0)
    for field, value in (("slots_total", total), ("slots_processing", processing)):
        if not _whole(value, 0, MAX_SLOTS):
            raise BadRequest(f"{where}.{field} must be a whole number from 0 to {MAX_SLOTS}", param="router_models")
    if processing > total:
        raise BadRequest(f"{where}.slots_processing must be at most its slots_total", param="router_models")
    if state != "loaded" and total:
        raise BadRequest(
            f"{where} is {state}: only a loaded model has slots (slots_total must be 0)", param="router_models"
        )
    return ModelReading(str(model_id), tuple(str(a) for a in aliases), str(state), exit_code, total, processing,
                        raw_slots=[])


def router_reading(body: dict[str, Any]) -> RouterReading:
    """The router-mode part of an agent's report (C{role: router}) as a L{RouterReading}.

    C{max_instances} (0: no limit), C{models_autoload} (default true) and
    C{router_models}: at most L{MAX_ROUTER_MODELS} objects C{{id, aliases,
    state, exit_code, slots_total, slots_processing}}, ids distinct, slots
    for loaded models only, C{exit_code} for failed ones only.
    """
    max_instances = body.get("max_instances", 0)
    if not _whole(max_instances, 0, MAX_INSTANCES):
        raise BadRequest(f"max_instances must be a whole number from 0 to {MAX_INSTANCES}", param="max_instances")
    autoload = body.get("models_autoload", True)
    if not isinstance(autoload, bool):
        raise BadRequest("models_autoload must be true or false", param="models_autoload")
    entries = body.get("router_models")
    if not isinstance(entries, list):
        raise BadRequest("a router's report needs router_models, a list of its models", param="router_models")
    if len(entries) > MAX_ROUTER_MODELS:
        raise BadRequest(f"router_models may list at most {MAX_ROUTER_MODELS} models", param="router_models")
    models = [_router_model(i, entry) for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for model in models:
        if model.id in seen:
            raise BadRequest(f"router_models lists {model.id[:100]!r} twice", param="router_models")
        seen.add(model.id)
    return RouterReading(max_instances, autoload, models)


def agent_report(body: dict[str, Any]) -> AgentReport:
    """Validate an agent's report. Unknown fields are ignored: newer agents may say more.

    A report with C{role: router} is of a router-mode llama-server: it
    carries the server's models (L{router_reading}) instead of slot counts.
    """
    name = string_field(body, "name", required=True, max_length=MAX_NAME)
    url = url_field(body, "url")
    error = string_field(body, "error", required=False, max_length=2000)
    role = body.get("role", "single")
    if role not in ("single", "router"):
        raise BadRequest("role must be single or router", param="role")
    state_name = body.get("state")
    if state_name is None:
        state = UpstreamState.UNREACHABLE if error else UpstreamState.HEALTHY
    else:
        allowed = ("healthy", "loading", "unreachable")
        if state_name not in allowed:
            raise BadRequest(f"state must be one of {', '.join(allowed)}", param="state")
        state = UpstreamState(state_name)
        if state is UpstreamState.HEALTHY and error:
            raise BadRequest("state is healthy but error is set", param="state")
    healthy = state is UpstreamState.HEALTHY
    if role == "router":
        for field in ("slots_idle", "slots_processing", "slots_total", "model", "models"):
            if body.get(field) is not None:
                raise BadRequest(
                    f"a router's report carries no {field}: its models' slots are in router_models",
                    param=field,
                )
        interval = _interval(body)
        assert name is not None
        return AgentReport(
            url=url, name=name, state=state, error=error, interval=interval,
            router=router_reading(body) if healthy else None, role="router",
        )
    idle = slot_count(body, "slots_idle", required=healthy) or 0
    processing = slot_count(body, "slots_processing", required=healthy) or 0
    total = slot_count(body, "slots_total", required=False)
    if total is None:
        total = idle + processing
    elif total != idle + processing:
        raise BadRequest("slots_total must equal slots_idle + slots_processing", param="slots_total")
    if total > MAX_SLOTS:
        raise BadRequest(f"slots_idle + slots_processing must be at most {MAX_SLOTS}", param="slots_total")
    models: list[str] = []
    model = string_field(body, "model", required=False, max_length=1024)
    if model:
        models.append(model)
    extra = body.get("models")
    if extra is not None:
        if (
            not isinstance(extra, list)
            or len(extra) > 64
            or not all(isinstance(m, str) and 0 < len(m) <= 1024 for m in extra)
        ):
            raise BadRequest("models must be a list of at most 64 names", param="models")
        models.extend(extra)
    interval = _interval(body)
    assert name is not None
    return AgentReport(
        url=url, name=name, slots_total=total, slots_processing=processing, state=state,
        error=error, models=tuple(models), interval=interval,
    )


def _interval(body: dict[str, Any]) -> float | None:
    interval = body.get("interval")
    if interval is None:
        return None
    if (
        isinstance(interval, bool)
        or not isinstance(interval, (int, float))
        or not 0 < interval <= MAX_REPORT_INTERVAL  # also refuses NaN and infinities
    ):
        raise BadRequest(
            f"interval must be a positive number of seconds, at most {MAX_REPORT_INTERVAL:g}",
            param="interval",
        )
    return float(interval)
