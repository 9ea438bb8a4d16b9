"""The request class of every listener: a bounded body held in memory, a checked request target.

Twisted stores a request's whole body before any resource runs, so the
bounds must hold there:

- C{BoundedRequest} keeps at most C{max_body} bytes of body and flags the
  rest (the resource answers 413); on a L{paddler.server.channel.GuardedChannel}
  a body found too large part-way is answered 413 at once;
- the bytes it holds are claimed from the process's
  L{paddler.server.memory.BodyMemory} (C{memory}) and given back when the
  request ends; a body that does not fit is answered 503;
- the body is collected in memory, never in a temporary file (Twisted's
  default above 100 kB, which costs a descriptor and disk writes for a body
  the proxy reads back whole anyway).

Its request target is checked (L{paddler.server.target}) before any resource
sees it; a rejected one is answered here with a JSON error. With an
C{instance_id}, every answer carries C{X-Paddler-Instance}; with a
C{loop_token} (the proxy port), the request gets the balancer's C{Via}
entry, and one that already has it (the balancer is its own upstream) is
answered 508 (L{paddler.server.instance}).
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import implementer

from paddler.config import BalancerConfig
from paddler.errors import (
    LoopDetected,
    PaddlerHTTPError,
    RequestTooLarge,
    body_memory_full,
    body_too_large,
    error_body,
    error_response,
    json_response,
)
from paddler.interfaces import IBoundedRequest, IGuardedChannel, IGuardedSite
from paddler.server.instance import INSTANCE_HEADER, came_through, via_token
from paddler.server.memory import BodyMemory
from paddler.server.target import TargetRejected, check_target

#: The methods paddler answers (the C{Allow} header of a 405 to CONNECT).
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


@implementer(IBoundedRequest)
class BoundedRequest(server.Request):
    """A request that keeps at most C{max_body} bytes of body and refuses targets that are not paths."""

    max_body = BalancerConfig.max_request_body
    memory: BodyMemory | None = None
    instance_id: str | None = None
    loop_token: str | None = None
    #: The setting that sets C{max_body}, named in the 413's message (C{None}: a fixed limit).
    max_body_setting: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.body_too_large = False
        self.client_gone = False
        self.target_error: TargetRejected | None = None
        self._body_received = 0
        self._claimed = 0
        self._chunks: list[bytes] = []

    # -- the body ---------------------------------------------------------

    def too_large(self) -> RequestTooLarge:
        """The error for a body over C{max_body}."""
        return body_too_large(self.max_body, self.max_body_setting)

    def claim_body(self, size: int) -> bool:
        """Claim C{size} bytes of body memory for this request; C{False} when they are not there."""
        if self.memory is None:
            return True
        if not self.memory.claim(size):
            return False
        self._claimed += size
        return True

    def release_body(self) -> None:
        """Give this request's body memory back (once); drop what was collected of the body."""
        if self._claimed and self.memory is not None:
            self.memory.release(self._claimed)
        self._claimed = 0
        self._chunks = []

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.body_too_large = True
        self.content = BytesIO()  # replaced by the whole body in requestReceived

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self.max_body:
            self._refuse(self.too_large())
            return
        missing = self._body_received - self._claimed
        if self.memory is not None and missing > 0 and not self.claim_body(missing):
            self._refuse(body_memory_full())
            return
        self._chunks.append(data)

    def _refuse(self, error: PaddlerHTTPError) -> None:
        """The body cannot be kept: answer at once on a guarded channel, else flag it (413 later)."""
        self.body_too_large = True
        self.release_body()
        if IGuardedChannel.providedBy(self.channel):
            self.channel.refuse(error)

    # -- the request ------------------------------------------------------

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        body = b"".join(self._chunks)
        self._chunks = []
        # Read back from position 0 in one piece, BytesIO hands out this very bytes object: no copy.
        self.content = BytesIO(body)
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
        if self.instance_id is not None:
            self.responseHeaders.setRawHeaders(INSTANCE_HEADER, [self.instance_id.encode("ascii")])
        error = self.target_error
        if error is None and self.loop_token is not None:
            if came_through(self.loop_token, self.requestHeaders.getRawHeaders(b"via")):
                self._answer(
                    LoopDetected(
                        "this request already went through this balancer: one of its upstreams is the "
                        "balancer itself; remove that upstream"
                    )
                )
                return
            self.requestHeaders.addRawHeader(b"via", via_token(self.loop_token))
        if error is None:
            super().process()
            return
        self.site = self.channel.site  # type: ignore[attr-defined]  # a Site's channel
        if error.status == 405:
            self.setHeader(b"allow", ALLOWED_METHODS)
        body = error_body(error.status, error.message, "invalid_request_error")
        self.write(json_response(self, error.status, body))
        self.finish()

    def _answer(self, error: PaddlerHTTPError) -> None:
        self.site = self.channel.site  # type: ignore[attr-defined]
        if IGuardedSite.providedBy(self.site):
            self.site.answered_early(error)
        self.write(error_response(self, error))
        self.finish()

    def finish(self) -> None:
        super().finish()
        self.release_body()

    def connectionLost(self, reason: Failure) -> None:
        self.client_gone = True
        self.release_body()
        super().connectionLost(reason)


def bounded_request_factory(
    max_body: int,
    memory: BodyMemory | None = None,
    instance_id: str | None = None,
    loop_token: str | None = None,
    max_body_setting: str | None = None,
) -> type[BoundedRequest]:
    """
    A L{BoundedRequest} class that keeps at most C{max_body} bytes of body,
    claims them from C{memory}, marks its answers with C{instance_id} and,
    with a C{loop_token}, marks the requests it forwards and refuses those
    that already went through this balancer.
    """
    return type(
        "BoundedRequest",
        (BoundedRequest,),
        {
            "max_body": max_body, "memory": memory, "instance_id": instance_id, "loop_token": loop_token,
            "max_body_setting": max_body_setting,
        },
    )
