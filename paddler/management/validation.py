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

#: Largest request body the management API reads.
MAX_BODY = 64 * 1024
MAX_NAME = 128
#: Most slots one llama.cpp server may report (llama-server's -np is far below).
MAX_SLOTS = 4096
MAX_REPORT_INTERVAL = 300.0
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


def agent_report(body: dict[str, Any]) -> AgentReport:
    """Validate an agent's report. Unknown fields are ignored: newer agents may say more."""
    name = string_field(body, "name", required=True, max_length=MAX_NAME)
    url = url_field(body, "url")
    error = string_field(body, "error", required=False, max_length=2000)
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
    interval = body.get("interval")
    if interval is not None:
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not 0 < interval <= MAX_REPORT_INTERVAL  # also refuses NaN and infinities
        ):
            raise BadRequest(
                f"interval must be a positive number of seconds, at most {MAX_REPORT_INTERVAL:g}",
                param="interval",
            )
        interval = float(interval)
    assert name is not None
    return AgentReport(
        url=url, name=name, slots_total=total, slots_processing=processing, state=state,
        error=error, models=tuple(models), interval=interval,
    )
