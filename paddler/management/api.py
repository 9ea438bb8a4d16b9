"""The fleet management API (Klein), served on the management port.

Routes (JSON in and out, documented in docs/management.md)::

    GET    /health
    GET    /api/v1/upstreams
    GET    /api/v1/upstreams/{id}
    POST   /api/v1/upstreams                      register {url, name, api_key?}
    DELETE /api/v1/upstreams/{id}[?force=true]    drain, then remove when idle
    POST   /api/v1/upstreams/{id}/drain
    POST   /api/v1/upstreams/{id}/undrain
    GET    /api/v1/agents
    POST   /api/v1/agents/{agent_id}/report

``{id}`` is an upstream's id, name or URL. POST and DELETE need
``Authorization: Bearer TOKEN`` when a token is configured.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import MethodNotAllowed, NotFound

from paddler.errors import error_body, json_response
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.registry import AgentRegistry, AgentReport, RegistryConflict
from paddler.fleet.upstream import InvalidUpstreamURL, Upstream, UpstreamState, normalise_url, upstream_id

#: Largest request body the management API reads.
MAX_BODY = 64 * 1024
#: Seconds a registration waits for the new upstream's first probe.
REGISTER_WAIT = 5.0
MAX_NAME = 128
MAX_REPORT_INTERVAL = 300.0
_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    500: "server_error",
}


class APIError(Exception):
    """Answered as C{status} with an OpenAI-shaped error; C{field} names the culprit."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def body(self) -> bytes:
        extra = {"param": self.field} if self.field else {}
        return error_body(self.status, self.message, _ERROR_TYPES.get(self.status, "error"), **extra)


def _bad(field: str, message: str) -> APIError:
    return APIError(400, message, field)


def _string(body: dict[str, Any], field: str, required: bool, max_length: int = 1024) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise _bad(field, f"{field} is required")
        return None
    if not isinstance(value, str):
        raise _bad(field, f"{field} must be a string")
    if not value.strip():
        raise _bad(field, f"{field} must not be empty")
    if len(value) > max_length:
        raise _bad(field, f"{field} must be at most {max_length} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _bad(field, f"{field} must not contain control characters")
    return value


def _url(body: dict[str, Any], field: str) -> str:
    raw = _string(body, field, required=True)
    assert raw is not None
    try:
        return normalise_url(raw)
    except InvalidUpstreamURL as e:
        raise _bad(field, f"{field}: {e}")


def _count(body: dict[str, Any], field: str, required: bool) -> int | None:
    value = body.get(field)
    if value is None:
        if required:
            raise _bad(field, f"{field} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(field, f"{field} must be a whole number, zero or more")
    return value


class ManagementAPI:
    """
    The management app. Dependencies come in C{__init__}; use
    C{ManagementAPI(...).app.resource()} as the management port's default
    resource. C{probes} (a L{paddler.probe.ProbeService}, or C{None}) lets a
    registration wait for the new upstream's first probe.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        pool: UpstreamPool,
        registry: AgentRegistry,
        clock: IReactorTime,
        probes: Any = None,
        token: str | None = None,
        register_wait: float = REGISTER_WAIT,
    ) -> None:
        self.pool = pool
        self.registry = registry
        self.clock = clock
        self.probes = probes
        self._token = token.encode("utf-8") if token else None
        self.register_wait = register_wait

    # -- plumbing ---------------------------------------------------------

    def _json(self, request: Any, status: int, body: Any) -> bytes:
        return json_response(
            request, status, body, {b"content-type": b"application/json", b"cache-control": b"no-store"}
        )

    def _authorize(self, request: Any) -> None:
        if self._token is None:
            return
        # Bytes throughout: the agent sends the token UTF-8 encoded.
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            request.setHeader(b"www-authenticate", b'Bearer realm="paddler"')
            raise APIError(401, "this call needs Authorization: Bearer <management token>", "authorization")
        if not hmac.compare_digest(given.strip(), self._token):
            raise APIError(403, "the management token is not valid", "authorization")

    def _body(self, request: Any) -> dict[str, Any]:
        if getattr(request, "body_too_large", False):  # a BoundedRequest kept none of it
            raise APIError(413, f"the body must be at most {MAX_BODY} bytes")
        raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(raw) > MAX_BODY:
            raise APIError(413, f"the body must be at most {MAX_BODY} bytes")
        if not raw.strip():
            raise APIError(400, "the body must be a JSON object", "body")
        try:
            parsed = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", "body")
        if not isinstance(parsed, dict):
            raise APIError(400, "the body must be a JSON object", "body")
        return parsed

    def _upstream(self, key: str) -> Upstream:
        upstream = self.pool.find(key)
        if upstream is None:
            raise APIError(404, f"no upstream with id, name or url {key!r}", "id")
        return upstream

    def _describe(self, upstream: Upstream) -> dict[str, Any]:
        described = upstream.describe(self.clock.seconds())
        described["removal_pending"] = self.pool.removal_pending(upstream.id)
        return described

    @staticmethod
    def _error(request: Any, error: APIError) -> bytes:
        request.setResponseCode(error.status)
        request.setHeader(b"content-type", b"application/json")
        return error.body()

    @app.handle_errors(APIError)
    def _api_error(self, request: Any, failure: Failure) -> bytes:
        return self._error(request, failure.value)  # type: ignore[arg-type]

    @app.handle_errors(NotFound)
    def _not_found(self, request: Any, failure: Failure) -> bytes:
        return self._error(request, APIError(404, f"no such path: {request.path.decode('latin-1')}"))

    @app.handle_errors(MethodNotAllowed)
    def _not_allowed(self, request: Any, failure: Failure) -> bytes:
        return self._error(request, APIError(
            405, f"{request.method.decode('latin-1')} is not allowed on {request.path.decode('latin-1')}"
        ))

    @app.handle_errors(Exception)
    def _unexpected(self, request: Any, failure: Failure) -> bytes:
        self.log.failure("management request {method} {path} failed", failure,
                         method=request.method, path=request.path)
        return self._error(request, APIError(500, "internal error (logged by the balancer)"))

    # -- routes: reading --------------------------------------------------

    @app.route("/health", methods=["GET"])
    def health(self, request: Any) -> bytes:
        return self._json(
            request, 200,
            {"status": "ok", "upstreams": len(self.pool.upstreams), "agents": len(self.registry.agents)},
        )

    @app.route("/api/v1/upstreams", methods=["GET"])
    def list_upstreams(self, request: Any) -> bytes:
        return self._json(
            request, 200, {"upstreams": [self._describe(u) for u in self.pool.upstreams.values()]}
        )

    @app.route("/api/v1/upstreams/<path:key>", methods=["GET"])
    def get_upstream(self, request: Any, key: str) -> bytes:
        return self._json(request, 200, self._describe(self._upstream(key)))

    @app.route("/api/v1/agents", methods=["GET"])
    def list_agents(self, request: Any) -> bytes:
        now = self.clock.seconds()
        return self._json(
            request, 200, {"agents": [a.describe(now) for a in self.registry.agents.values()]}
        )

    # -- routes: changing -------------------------------------------------

    @app.route("/api/v1/upstreams", methods=["POST"])
    def register(self, request: Any) -> Any:
        self._authorize(request)
        body = self._body(request)
        unknown = sorted(set(body) - {"url", "name", "api_key"})
        if unknown:
            raise _bad(unknown[0], f"unknown field {unknown[0]!r} (allowed: url, name, api_key)")
        url = _url(body, "url")
        name = _string(body, "name", required=True, max_length=MAX_NAME)
        api_key = _string(body, "api_key", required=False)
        assert name is not None
        existing = self.pool.upstreams.get(upstream_id(url))
        if existing is not None:
            if existing.source == "agent":
                raise APIError(409, f"url {url} is reported by an agent", "url")
            if existing.name != name:
                raise APIError(409, f"url {url} is already registered as {existing.name!r}", "url")
            if self.pool.removal_pending(existing.id):
                self.pool.undrain(existing.id)  # registered again: keep it after all
            if "api_key" in body:
                existing.api_key = api_key  # the latest registration's key applies
            return self._json(request, 200, self._describe(existing))
        for other in self.pool.upstreams.values():
            if other.name == name:
                raise APIError(409, f"name {name!r} is already used by the upstream at {other.url}", "name")
        upstream = self.pool.add(Upstream(url, name, api_key, source="api", clock=self.clock))
        self.log.info("registered {name} ({url}) through the management API", name=name, url=url)
        return self._after_first_probe(request, upstream)

    def _after_first_probe(self, request: Any, upstream: Upstream) -> Any:
        """Answer 201 once the first probe is done (or after C{register_wait})."""
        if self.probes is None:
            return self._json(request, 201, self._describe(upstream))
        probed: Deferred[None] = self.probes.probe_now(upstream)
        probed.addTimeout(self.register_wait, self.clock)
        probed.addErrback(lambda f: f.trap(DeferredTimeout))
        probed.addCallback(lambda _: self._json(request, 201, self._describe(upstream)))
        return probed

    @app.route("/api/v1/upstreams/<path:key>", methods=["DELETE"])
    def delete(self, request: Any, key: str) -> bytes:
        self._authorize(request)
        force = self._flag(request, b"force")
        upstream = self._upstream(key)
        if force:
            self.pool.remove(upstream.id)
            return self._json(request, 200, {"removed": True, "upstream": self._describe(upstream)})
        removal = self.pool.remove_when_idle(upstream.id)
        removed = removal is not None and removal.called
        return self._json(
            request, 200 if removed else 202, {"removed": removed, "upstream": self._describe(upstream)}
        )

    @staticmethod
    def _flag(request: Any, name: bytes) -> bool:
        values = request.args.get(name, [])
        if not values:
            return False
        value = values[-1].decode("latin-1").lower()
        if value in ("1", "true", "yes"):
            return True
        if value in ("0", "false", "no"):
            return False
        raise _bad(name.decode(), f"{name.decode()} must be true or false, got {value!r}")

    @app.route("/api/v1/upstreams/<path:key>/drain", methods=["POST"])
    def drain(self, request: Any, key: str) -> bytes:
        self._authorize(request)
        upstream = self._upstream(key)
        self.pool.drain(upstream.id, requested=True)
        return self._json(request, 200, self._describe(upstream))

    @app.route("/api/v1/upstreams/<path:key>/undrain", methods=["POST"])
    def undrain(self, request: Any, key: str) -> bytes:
        self._authorize(request)
        upstream = self._upstream(key)
        self.pool.undrain(upstream.id)
        return self._json(request, 200, self._describe(upstream))

    @app.route("/api/v1/agents/<agent_id>/report", methods=["POST"])
    def report(self, request: Any, agent_id: str) -> bytes:
        self._authorize(request)
        if not _AGENT_ID.fullmatch(agent_id):
            raise _bad("agent_id", "agent_id must be 1-64 letters, digits, '.', '_' or '-'")
        report = self._parse_report(self._body(request))
        try:
            upstream = self.registry.report(agent_id, report)
        except RegistryConflict as e:
            raise APIError(409, e.message, e.field)
        record = self.registry.agents[agent_id]
        return self._json(request, 200, {
            "agent_id": agent_id,
            "upstream_id": upstream.id,
            "draining": upstream.draining,
            "expiry": self.registry.expiry_for(record),
        })

    @staticmethod
    def _parse_report(body: dict[str, Any]) -> AgentReport:
        """Validate a report. Unknown fields are ignored: newer agents may say more."""
        name = _string(body, "name", required=True, max_length=MAX_NAME)
        url = _url(body, "url")
        error = _string(body, "error", required=False, max_length=2000)
        state_name = body.get("state")
        if state_name is None:
            state = UpstreamState.UNREACHABLE if error else UpstreamState.HEALTHY
        else:
            allowed = ("healthy", "loading", "unreachable")
            if state_name not in allowed:
                raise _bad("state", f"state must be one of {', '.join(allowed)}")
            state = UpstreamState(state_name)
            if state is UpstreamState.HEALTHY and error:
                raise _bad("state", "state is healthy but error is set")
        healthy = state is UpstreamState.HEALTHY
        idle = _count(body, "slots_idle", required=healthy)
        processing = _count(body, "slots_processing", required=healthy)
        total = _count(body, "slots_total", required=False)
        idle = idle or 0
        processing = processing or 0
        if total is None:
            total = idle + processing
        elif total != idle + processing:
            raise _bad("slots_total", "slots_total must equal slots_idle + slots_processing")
        models: list[str] = []
        model = _string(body, "model", required=False, max_length=1024)
        if model:
            models.append(model)
        extra = body.get("models")
        if extra is not None:
            if not isinstance(extra, list) or not all(isinstance(m, str) for m in extra):
                raise _bad("models", "models must be a list of strings")
            models.extend(extra)
        interval = body.get("interval")
        if interval is not None:
            if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not (
                0 < interval <= MAX_REPORT_INTERVAL
            ):
                raise _bad(
                    "interval",
                    f"interval must be a positive number of seconds, at most {MAX_REPORT_INTERVAL:g}",
                )
            interval = float(interval)
        assert name is not None
        return AgentReport(
            url=url, name=name, slots_total=total, slots_processing=processing, state=state,
            error=error, models=tuple(models), interval=interval,
        )


def _endpoint_fields(description: str) -> list[str]:
    """Split an endpoint string on unescaped colons, unescaping C{\\:}."""
    fields, current, escaped = [], "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(current)
            current = ""
        else:
            current += char
    fields.append(current)
    return fields


def endpoint_is_local(description: str) -> bool:
    """
    Whether a server endpoint string can only be reached from this host:
    unix sockets, and tcp/tcp6/ssl with a loopback C{interface=}. tcp
    without C{interface=} listens on every interface; other kinds and host
    names other than C{localhost} count as reachable from outside.
    """
    import ipaddress

    fields = _endpoint_fields(description.strip())
    kind = fields[0].lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    interface = None
    for field in fields[1:]:
        if field.startswith("interface="):
            interface = field[len("interface="):]
    if not interface:
        return False
    if interface.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface.strip("[]")).is_loopback
    except ValueError:
        return False
