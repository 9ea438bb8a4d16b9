"""Endpoints paddler does not know pass through untouched (issue #24): method, path, query,
headers and body go to an upstream; its status, headers and body come back as they are."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.web.resource import Resource

from .proxy_harness import make_harness

#: every test here runs with each request parser of the proxy port (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("both_parsers")


class Echo(Resource):
    """Answers every request with 299, an odd header and what it received."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.seen: list[tuple[bytes, bytes]] = []

    def render(self, request: Any) -> bytes:
        request.content.seek(0)
        body = request.content.read()
        self.seen.append((request.method, request.uri))
        request.setResponseCode(299, b"Odd")
        request.setHeader(b"x-upstream", self.name)
        request.setHeader(b"access-control-allow-origin", request.getHeader(b"origin") or b"*")
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({
            "method": request.method.decode(), "uri": request.uri.decode(), "body": body.decode(),
            "x-test": (request.getHeader(b"x-test") or b"").decode(),
        }).encode()


PATHS = [
    (b"GET", "/tools"),
    (b"POST", "/tools"),
    (b"POST", "/mcp?session=1"),
    (b"POST", "/apply-template"),
    (b"POST", "/detokenize"),
    (b"POST", "/tokenize"),
    (b"POST", "/v1/messages/count_tokens"),
    (b"OPTIONS", "/completions"),
    (b"DELETE", "/models/x"),
    (b"GET", "/cors-proxy?url=http%3A%2F%2Fexample.com"),
]


@pytest.mark.parametrize("method, path", PATHS)
def test_an_unknown_endpoint_passes_through_untouched(request, method: bytes, path: str) -> None:
    h = make_harness(request)
    echoes = [Echo("a"), Echo("b")]
    for echo in echoes:
        h.add_resource(echo, echo.name)
    body = b'{"free": "form"}' if method == b"POST" else None
    for _ in echoes:  # twice: both upstreams serve such paths
        response = h.result(h.client.request(
            method.decode(), h.url + path, data=body,
            headers={b"X-Test": [b"kept"], b"Origin": [b"http://localhost"]},
        ))
        assert response.code == 299 and response.phrase == b"Odd"
        assert response.headers.getRawHeaders(b"access-control-allow-origin") == [b"http://localhost"]
        answer = h.json(response)
        assert (answer["method"], answer["uri"], answer["x-test"]) == (method.decode(), path, "kept")
        assert answer["body"] == (body or b"").decode()
    assert sorted(len(e.seen) for e in echoes) == [1, 1]
