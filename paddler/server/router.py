"""The management port's root: routes each path prefix to the app that owns it, and the
one JSON error handling every Klein app shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import werkzeug.exceptions
from klein import Klein
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource

from paddler.errors import (
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PaddlerHTTPError,
    error_response,
)

_log = Logger()


class PrefixRouter(Resource):
    """
    Sends a request to the first resource whose prefix its path starts with
    (C{/dashboard}, C{/api/v1/state}, ...), else to C{default}. The chosen
    resource sees the whole path, as if it were the root: Klein apps can be
    composed without knowing where they are mounted.
    """

    def __init__(self, routes: Sequence[tuple[bytes, IResource]], default: IResource) -> None:
        super().__init__()
        self._routes = list(routes)
        self._default = default

    def getChildWithDefault(self, path: bytes, request: Any) -> IResource:
        if not _utf8(request):
            return BadURLResource()  # Klein would answer an HTML 400 and log a traceback
        full = request.path
        target = self._default
        for prefix, resource in self._routes:
            if full == prefix or full.startswith(prefix.rstrip(b"/") + b"/"):
                target = resource
                break
        request.postpath.insert(0, request.prepath.pop())
        return target

    def render(self, request: Any) -> Any:
        return self._default.render(request)


def _utf8(request: Any) -> bool:
    """Whether the host name and every (percent-decoded) path segment is UTF-8, as Klein needs."""
    try:
        request.getRequestHostname().decode("utf-8")
        for segment in (*request.prepath, *request.postpath):
            segment.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class BadURLResource(Resource):
    """A JSON 400 for a path or host name that is not UTF-8."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return error_response(request, BadRequest("the path and the Host header must be UTF-8 (percent-encoded)"))


class NotFoundResource(Resource):
    """A JSON 404 for every path."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return error_response(request, NotFound(f"no such path: {_shown_path(request)}"))


def json_errors(app: Klein, what: str) -> None:
    """
    Answer every error of the Klein C{app} as JSON: a L{PaddlerHTTPError} as
    itself, an unknown path as 404, a wrong method as 405 (with C{Allow}),
    anything else as a 500 whose traceback is logged, never sent. C{what}
    names the app in that log line.
    """

    def paddler_error(*args: Any) -> bytes:
        request, failure = args[-2:]
        return error_response(request, failure.value)

    def not_found(*args: Any) -> bytes:
        request = args[-2]
        return error_response(request, NotFound(f"no such path: {_shown_path(request)}"))

    def not_allowed(*args: Any) -> bytes:
        request, failure = args[-2:]
        allowed = getattr(failure.value, "valid_methods", None) or []
        error = MethodNotAllowed(
            f"{request.method.decode('latin-1')} is not allowed on {_shown_path(request)}",
            headers={b"allow": ", ".join(allowed).encode("ascii")} if allowed else None,
        )
        return error_response(request, error)

    def unexpected(*args: Any) -> bytes:
        request, failure = args[-2:]
        _log.failure(
            "{what}: {method} {path} failed", failure, what=what, method=request.method, path=request.path
        )
        return error_response(request, InternalError("internal error (logged by the balancer)"))

    # Klein passes the app's instance first when the app is a class attribute: *args takes both shapes.
    handlers: list[tuple[type[Exception], Any]] = [
        (PaddlerHTTPError, paddler_error),
        (werkzeug.exceptions.NotFound, not_found),
        (werkzeug.exceptions.MethodNotAllowed, not_allowed),
        (Exception, unexpected),
    ]
    for exception, handler in handlers:
        app.handle_errors(exception)(handler)


def _shown_path(request: Any) -> str:
    return request.path.decode("latin-1")[:200]
