"""A controllable stand-in for llama-server, for proxy and probe tests.

Slot-taking requests are held open until the test writes to them or finishes
them, so streaming and disconnects can be observed step by step.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web import server
from twisted.web.resource import Resource


class HeldRequest:
    """A request the fake upstream is holding open."""

    def __init__(self, request: server.Request, body: bytes) -> None:
        self.request = request
        self.body = body
        self.json = json.loads(body) if body else None
        self.gone = False
        self.gone_deferred: Deferred[None] = Deferred()
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, result: Any) -> None:
        self.gone = not self.request.finished
        self.gone_deferred.callback(None)

    def start_stream(self) -> None:
        self.request.setHeader(b"content-type", b"text/event-stream")
        self.request.write(b"")

    def send(self, data: bytes) -> None:
        self.request.write(data)

    def finish(self, data: bytes = b"") -> None:
        if data:
            self.request.write(data)
        self.request.finish()

    def reset(self) -> None:
        """Drop the connection without finishing the answer (a crash, a reset)."""
        self.request.channel.transport.abortConnection()


class FakeLlama(Resource):
    """llama-server as far as the balancer looks: /health, /slots, /props, completions."""

    isLeaf = True

    def __init__(self, name: str = "fake", slots: int = 4, model: str = "fake.gguf", hold: bool = False) -> None:
        super().__init__()
        self.name = name
        self.slots = slots
        self.busy = 0
        self.model = model
        self.hold = hold
        self.slots_status = 200
        self.answer_status = 200
        #: like llama-server --api-key: every path but /health answers 401 without it
        self.api_key: str | None = None
        self.held: list[HeldRequest] = []
        self.waiting: list[Deferred[HeldRequest]] = []
        self.seen: list[tuple[bytes, bytes, dict[bytes, list[bytes]], bytes]] = []

    def next_held(self) -> Deferred[HeldRequest]:
        """Fires with the next request that arrives (or one already held and unclaimed)."""
        d: Deferred[HeldRequest] = Deferred()
        self.waiting.append(d)
        self._hand_out()
        return d

    def _hand_out(self) -> None:
        unclaimed = [h for h in self.held if not getattr(h, "claimed", False)]
        while self.waiting and unclaimed:
            held = unclaimed.pop(0)
            held.claimed = True  # type: ignore[attr-defined]
            self.waiting.pop(0).callback(held)

    def _key_given(self, request: server.Request) -> bool:
        given = request.getHeader(b"authorization") or request.getHeader(b"x-api-key") or b""
        return given.removeprefix(b"Bearer ") == (self.api_key or "").encode()

    def render(self, request: server.Request) -> Any:
        request.content.seek(0)
        body = request.content.read()
        self.seen.append((request.method, request.uri, dict(request.requestHeaders.getAllRawHeaders()), body))
        path = request.path
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        if path == b"/health":
            return b'{"status":"ok"}'
        if self.api_key is not None and not self._key_given(request):
            request.setResponseCode(401)
            return b'{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}'
        if path == b"/slots":
            request.setResponseCode(self.slots_status)
            if self.slots_status == 501:
                return b'{"error":{"code":501,"message":"This server does not support slots endpoint.","type":"not_supported_error"}}'
            if self.slots_status == 503:
                return b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
            return json.dumps(
                [{"id": i, "n_ctx": 512, "is_processing": i < self.busy} for i in range(self.slots)]
            ).encode()
        if path == b"/props":
            return json.dumps({"total_slots": self.slots, "model_alias": self.model, "model_path": self.model}).encode()
        if path == b"/metrics":
            return f"llamacpp:requests_processing {self.busy}\n".encode()
        if path == b"/v1/models":
            return json.dumps({"data": [{"id": self.model}]}).encode()
        if self.answer_status != 200:
            request.setResponseCode(self.answer_status)
            return b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
        if self.hold:
            self.held.append(HeldRequest(request, body))
            self._hand_out()
            return server.NOT_DONE_YET
        return json.dumps({"content": "ok", "upstream": self.name, "path": path.decode()}).encode()
