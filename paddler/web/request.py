"""The request class of every listener: a bounded body, a checked request target.

Twisted stores a request's whole body before any resource runs, so the
bound must hold there: C{BoundedRequest} keeps at most C{max_body} bytes
and flags the rest (the resource answers 413). Its request target is checked
(L{paddler.web.target}) before any resource sees it; a rejected one is
answered here with a JSON error.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.python.failure import Failure
from twisted.web import server

from paddler.errors import error_body, json_response
from paddler.web.target import TargetRejected, check_target

#: The methods paddler answers (the C{Allow} header of a 405 to CONNECT).
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


class BoundedRequest(server.Request):
    """A request that keeps at most C{max_body} bytes of body and refuses targets that are not paths."""

    max_body = 10 * 1024 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.body_too_large = False
        self.client_gone = False
        self.target_error: TargetRejected | None = None
        self._body_received = 0

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        try:
            target = check_target(command, path, self.requestHeaders.getRawHeaders(b"host"), version)
        except TargetRejected as e:
            self.target_error = e
            path = b"/"  # nothing of the rejected target reaches a resource
        else:
            path = target.uri
            if target.host is not None:
                self.requestHeaders.setRawHeaders(b"host", [target.host])
        super().requestReceived(command, path, version)

    def process(self) -> None:
        error = self.target_error
        if error is None:
            super().process()
            return
        self.site = self.channel.site  # type: ignore[attr-defined]  # a Site's channel
        if error.status == 405:
            self.setHeader(b"allow", ALLOWED_METHODS)
        body = error_body(error.status, error.message, "invalid_request_error")
        self.write(json_response(self, error.status, body))
        self.finish()

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_received += len(data)
        if self._body_received > self.max_body:
            if not self.body_too_large:
                self.body_too_large = True
                self.content = BytesIO()
            return
        super().handleContentChunk(data)

    def connectionLost(self, reason: Failure) -> None:
        self.client_gone = True
        super().connectionLost(reason)


def bounded_request_factory(max_body: int) -> type[BoundedRequest]:
    """A L{BoundedRequest} class that keeps at most C{max_body} bytes of body."""
    return type("BoundedRequest", (BoundedRequest,), {"max_body": max_body})
