"""Every error a client can see, with its HTTP status and OpenAI-shaped JSON body, and
the one helper that writes JSON responses.

The proxy port and the management port raise the same classes; Klein apps
answer them through L{paddler.server.router.json_errors}. An error's C{param}
names the request field at fault (management API validation).
"""

from __future__ import annotations

import json
from typing import Any


class PaddlerHTTPError(Exception):
    """A failure answered to the client as C{status} with a JSON error body."""

    status = 500
    error_type = "server_error"

    def __init__(
        self,
        message: str,
        headers: dict[bytes, bytes] | None = None,
        param: str | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra
        if param is not None:
            self.extra["param"] = param

    @property
    def param(self) -> str | None:
        return self.extra.get("param")

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.error_type, **self.extra)


class BadRequest(PaddlerHTTPError):
    status = 400
    error_type = "invalid_request_error"


class Unauthorized(PaddlerHTTPError):
    status = 401
    error_type = "authentication_error"


class Forbidden(PaddlerHTTPError):
    status = 403
    error_type = "permission_error"


class NotFound(PaddlerHTTPError):
    status = 404
    error_type = "not_found_error"


class MethodNotAllowed(PaddlerHTTPError):
    status = 405
    error_type = "invalid_request_error"


class Conflict(PaddlerHTTPError):
    status = 409
    error_type = "conflict_error"


class RequestTimeout(PaddlerHTTPError):
    """A client too slow to send its request (--header-timeout, --min-request-body-rate).
    C{reason} labels it in the timed-out counters."""

    status = 408
    error_type = "timeout_error"
    reason = "client_head"


class BodyTimeout(RequestTimeout):
    reason = "client_body"


class RequestTooLarge(PaddlerHTTPError):
    status = 413
    error_type = "invalid_request_error"


class URITooLong(PaddlerHTTPError):
    status = 414
    error_type = "invalid_request_error"


class HeadersTooLarge(PaddlerHTTPError):
    status = 431
    error_type = "invalid_request_error"


class LoopDetected(PaddlerHTTPError):
    """A request came back to the balancer that forwarded it (it is its own upstream)."""

    status = 508
    error_type = "server_error"


class InternalError(PaddlerHTTPError):
    """A bug in the balancer: logged with its traceback, answered without it."""

    status = 500
    error_type = "server_error"


class UpstreamFailed(PaddlerHTTPError):
    """Every upstream tried failed before answering."""

    status = 502
    error_type = "upstream_error"


class NoUpstreamAvailable(PaddlerHTTPError):
    """Nothing can take the request now. C{reason} labels the refusal in the metrics."""

    status = 503
    error_type = "unavailable_error"
    reason = "no_upstream"


class NoHealthyUpstream(NoUpstreamAvailable):
    """No upstream is healthy, loading or registering: the request waited --no-upstream-timeout at most."""


class BufferingDisabled(NoUpstreamAvailable):
    reason = "buffering_disabled"


class BufferFull(NoUpstreamAvailable):
    reason = "buffer_full"


class ShuttingDown(NoUpstreamAvailable):
    reason = "shutting_down"


class TooManyConnections(NoUpstreamAvailable):
    """A listener has --max-connections open connections: the new one is answered and closed."""

    reason = "connection_limit"


class TooManyClientConnections(PaddlerHTTPError):
    """One client address holds --max-connections-per-client connections: the new one is answered and closed."""

    status = 429
    reason = "client_connection_limit"


class BodyMemoryFull(NoUpstreamAvailable):
    """Taking this body would pass --max-request-bodies-memory."""

    reason = "body_memory"


class UpstreamTimeout(PaddlerHTTPError):
    status = 504
    error_type = "timeout_error"
    reason = "upstream_headers"


class BufferTimeout(UpstreamTimeout):
    """No slot became free before --buffered-request-timeout."""

    reason = "buffer"


def body_too_large(limit: int, setting: str | None = None) -> RequestTooLarge:
    """The one 413 for a request body over C{limit} bytes; C{setting} names the flag that sets the limit."""
    named = f" ({setting})" if setting else ""
    return RequestTooLarge(f"the request body is larger than {limit} bytes{named}")


def body_memory_full() -> BodyMemoryFull:
    """The one 503 for a body that would pass --max-request-bodies-memory."""
    return BodyMemoryFull(
        "the balancer holds as many request bodies as it may (--max-request-bodies-memory); retry shortly",
        headers={b"retry-after": b"1"},
    )


def json_response(
    request: Any, status: int, payload: Any, headers: dict[bytes, bytes] | None = None
) -> bytes:
    """Set C{status} and a JSON content type (then C{headers}) on C{request}; return the body.

    C{payload} is encoded with C{json.dumps} unless it is already C{bytes}.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    return payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")


def error_body(status: int, message: str, error_type: str, **extra: Any) -> bytes:
    """The OpenAI / llama.cpp error shape: C{{"error": {"code", "message", "type"}}}."""
    error: dict[str, Any] = {"code": status, "message": message, "type": error_type}
    error.update(extra)
    return json.dumps({"error": error}).encode("utf-8")


def error_response(request: Any, error: PaddlerHTTPError) -> bytes:
    """Answer C{request} with C{error}: its status, headers and JSON body."""
    return json_response(request, error.status, error.body(), error.headers)


def outcome_of(error: PaddlerHTTPError) -> tuple[str, str] | None:
    """How an error is counted (L{paddler.observability.requests.OUTCOMES}): refused, timed out, or neither."""
    if isinstance(error, (NoUpstreamAvailable, TooManyClientConnections)):
        return ("refused", error.reason)
    if isinstance(error, (UpstreamTimeout, RequestTimeout)):
        return ("timed_out", error.reason)
    return None
