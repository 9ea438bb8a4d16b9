"""The management port's root: routes each path prefix to the app that owns it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.web.resource import IResource, Resource

from paddler.errors import error_body, json_response


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


class NotFoundResource(Resource):
    """A JSON 404 for every path."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        message = f"no such path: {request.path.decode('latin-1')}"
        return json_response(request, 404, error_body(404, message, "not_found_error"))
