"""The simulated llama-server's request validation: llama-server's exact 400 messages."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from tests.simulator_support import MakeServer, engine_of
from tests.simulator_support import clock, server  # noqa: F401 - pytest fixtures
from paddler.simulator.validation import PROMPT_TYPE_MESSAGE


# errors


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/completion", b"[1, 2]", "[json.exception.type_error.304] cannot use at() with array"),
        ("/completion", {"prompt": 123456789012345678901234567890}, PROMPT_TYPE_MESSAGE),
        ("/completion", {"prompt": "hi", "n_predict": "ten"},
         "Field 'n_predict': [json.exception.type_error.302] type must be number, but is string"),
        ("/completion", {"prompt": "hi", "stream": "yes"},
         "Field 'stream': [json.exception.type_error.302] type must be boolean, but is string"),
        ("/completion", {"n_predict": 3}, "[json.exception.out_of_range.403] key 'prompt' not found"),
        ("/v1/completions", {"prompt": {"x": 1}}, PROMPT_TYPE_MESSAGE),
        ("/v1/chat/completions", {"messages": "hi"}, "Expected 'messages' to be an array"),
        ("/v1/chat/completions", {"max_tokens": 2}, "'messages' is required"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "x"},
         "Field 'max_tokens': [json.exception.type_error.302] type must be number, but is string"),
        ("/tokenize", {"content": 5}, None),
    ],
)
def test_bad_requests_get_400_invalid_request_error(server: MakeServer, path: str, body: Any, message: str | None) -> None:
    """A body that is not an object and bad field types answer 400 invalid_request_error
    with llama-server's messages."""
    client = server()
    response = client.post(path, body).response
    assert response.status == 400
    error = response.json()["error"]
    assert (error["code"], error["type"]) == (400, "invalid_request_error")
    if message is not None:
        assert error["message"] == message
    assert engine_of(client).metrics.requests_total == 0


def test_invalid_json_gets_500_server_error_like_llama_server(server: MakeServer) -> None:
    """llama-server lets the JSON parse error escape: 500 server_error, nlohmann's message."""
    client = server()
    response = client.post("/completion", b"{not json").response
    assert response.status == 500
    error = response.json()["error"]
    assert (error["code"], error["type"]) == (500, "server_error")
    assert error["message"].startswith("[json.exception.parse_error.101] parse error at line 1, column ")
    assert engine_of(client).metrics.requests_total == 0


def test_fields_llama_server_ignores_when_mistyped(server: MakeServer, clock: Clock) -> None:
    """id_slot and stop of the wrong type, and max_tokens on /completion, are ignored (200)."""
    client = server(slots=3)
    exchanges = [
        client.post("/completion", {"prompt": "x", "n_predict": 1, **extra})
        for extra in ({"id_slot": "a"}, {"stop": 5}, {"max_tokens": "x"})
    ]
    clock.advance(1)
    assert [e.pump().status for e in exchanges] == [200, 200, 200]
