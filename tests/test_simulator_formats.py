"""The simulated llama-server's response bodies: /completion, OpenAI shapes, SSE chunks, /slots."""

from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock

from tests.simulator_support import MakeServer, metric, running_job
from tests.simulator_support import clock, server  # noqa: F401 - pytest fixtures


# generation, non-streaming


def test_completion_response_fields_and_timings(server: MakeServer, clock: Clock) -> None:
    """/completion answers llama-server's fields; timings match the rates and the clock."""
    client = server(tokens_per_second=50, prompt_tokens_per_second=1000)
    exchange = client.post("/completion", {"prompt": "a b c d", "n_predict": 10})
    clock.advance(0.0049 + 0.2)
    assert not exchange.pump().complete
    clock.advance(0.0002)
    response = exchange.pump()
    assert response.complete and response.status == 200
    body = response.json()
    assert set(body) == {
        "index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted",
        "tokens_evaluated", "generation_settings", "prompt", "has_new_line", "truncated",
        "stop_type", "stopping_word", "tokens_cached", "timings",
    }
    assert body["stop"] is True and body["model"] == "simulated.gguf"
    assert body["tokens_predicted"] == 10 and body["tokens_evaluated"] == 5
    assert body["tokens_cached"] == 14 and body["stop_type"] == "limit"
    assert body["prompt"] == "<s> a b c d"
    assert body["generation_settings"]["n_predict"] == 10
    assert len(body["content"].split()) == 10
    assert body["timings"] == {
        "cache_n": 0, "prompt_n": 5, "prompt_ms": 5.0, "prompt_per_token_ms": 1.0,
        "prompt_per_second": 1000.0, "predicted_n": 10, "predicted_ms": 200.0,
        "predicted_per_token_ms": 20.0, "predicted_per_second": 50.0,
    }


def test_response_fields_trim_the_completion(server: MakeServer, clock: Clock) -> None:
    """response_fields keeps only the named fields, with a/b paths as keys."""
    client = server()
    exchange = client.post("/completion", {
        "prompt": "hi", "n_predict": 2,
        "response_fields": ["id_slot", "tokens_predicted", "timings/predicted_n"],
    })
    clock.advance(1)
    body = exchange.pump().json()
    assert set(body) == {"id_slot", "tokens_predicted", "timings/predicted_n"}
    assert body["tokens_predicted"] == body["timings/predicted_n"] == 2


def test_chat_and_openai_completion_bodies(server: MakeServer, clock: Clock) -> None:
    """The OpenAI endpoints return chat.completion / text_completion with usage and timings."""
    client = server()
    chat = client.post("/v1/chat/completions", {
        "model": "anything", "max_tokens": 4,
        "messages": [{"role": "system", "content": "You are helpful."},
                     {"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
    })
    legacy = client.post("/v1/completions", {"prompt": "Hello", "max_tokens": 3})
    short = client.post("/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    clock.advance(5)
    body = chat.pump().json()
    assert body["object"] == "chat.completion" and body["model"] == "simulated.gguf"
    assert body["id"].startswith("chatcmpl-") and body["system_fingerprint"] == body["system_fingerprint"]
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["completion_tokens"] == 4 == body["timings"]["predicted_n"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4
    assert usage["prompt_tokens_details"]["cached_tokens"] == body["timings"]["cache_n"]
    text = legacy.pump().json()
    assert text["object"] == "text_completion"
    assert text["choices"][0]["finish_reason"] == "length" and text["choices"][0]["logprobs"] is None
    assert text["usage"]["prompt_tokens"] == 2
    assert short.pump().json()["choices"][0]["finish_reason"] == "stop"  # natural eos


def test_prompt_over_context_gets_400(server: MakeServer) -> None:
    """A prompt longer than the slot context answers 400 exceed_context_size_error."""
    client = server(n_ctx=4)
    response = client.post("/completion", {"prompt": "one two three four five"}).response
    assert response.status == 400
    assert response.json() == {"error": {
        "code": 400,
        "message": "request (6 tokens) exceeds the available context size (4 tokens), try increasing it",
        "type": "exceed_context_size_error", "n_prompt_tokens": 6, "n_ctx": 4,
    }}


def test_generation_hitting_the_context_is_truncated(server: MakeServer, clock: Clock) -> None:
    """n_predict past n_ctx stops at the context with truncated true and finish 'length'."""
    client = server(n_ctx=16, tokens_per_second=1000)
    exchange = client.post("/completion", {"prompt": "hello", "n_predict": 1000, "ignore_eos": True})
    clock.advance(1)
    body = exchange.pump().json()
    assert (body["tokens_predicted"], body["truncated"], body["stop_type"]) == (14, True, "limit")


# slots, queueing, metrics


def test_oversubscribed_server_shows_busy_slots_and_deferred_requests(server: MakeServer, clock: Clock) -> None:
    """N+3 requests: /slots shows N busy, /metrics 3 deferred, and all finish FIFO. A busy
    slot's n_prompt_tokens is what its KV cache holds now: the prompt plus the tokens
    decoded so far but the last (llama-server's 275 = 10 + 266 - 1 in the reference)."""
    client = server(slots=2, tokens_per_second=10)
    exchanges = [
        client.post("/completion", {"prompt": f"request {i}", "n_predict": 5, "ignore_eos": True})
        for i in range(5)
    ]
    clock.advance(0.25)
    slots = client.get("/slots").response.json()
    assert [slot["is_processing"] for slot in slots] == [True, True]
    busy = slots[0]
    assert busy["id_task"] in (0, 1) and busy["n_prompt_tokens"] == 3 + 2 - 1
    assert busy["n_prompt_tokens_processed"] == 3 and busy["n_prompt_tokens_cache"] == 0
    assert busy["params"]["n_predict"] == 5 and "stop" not in busy["params"]
    assert busy["next_token"] == [
        {"has_next_token": True, "has_new_line": False, "n_remain": 3, "n_decoded": 2}
    ]
    assert metric(client, "requests_processing") == 2
    assert metric(client, "requests_deferred") == 3
    full = client.get("/slots?fail_on_no_slot=1").response
    assert full.status == 503
    assert full.json() == {"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}}
    assert client.get("/health").response.status == 200  # still healthy when busy
    finished: list[int] = []
    for _ in range(40):
        clock.advance(0.05)
        for index, exchange in enumerate(exchanges):
            if index not in finished and exchange.pump().complete:
                finished.append(index)
    assert finished == [0, 1, 2, 3, 4]
    assert all(e.response.status == 200 for e in exchanges)
    assert metric(client, "requests_deferred") == 0
    assert metric(client, "tokens_predicted_total") == 25


# streaming


def test_completion_stream_is_incremental_and_ends_with_a_stop_chunk(server: MakeServer, clock: Clock) -> None:
    """/completion SSE: one write per token as it is generated, id_slot -1, then stop:true, no [DONE]."""
    client = server(slots=2, tokens_per_second=50, prompt_tokens_per_second=1000)
    exchange = client.post("/completion", {"prompt": "Once upon a time", "n_predict": 5, "stream": True})
    response = exchange.response
    assert response.status == 200  # headers are flushed before the first token
    assert response.header("content-type") == "text/event-stream"
    assert response.header("x-accel-buffering") == "no"
    assert response.header("transfer-encoding") == "chunked"
    assert response.chunks == []
    clock.advance(0.005)  # prompt done, no token yet
    assert exchange.pump().chunks == []
    clock.advance(0.02)
    assert len(exchange.pump().chunks) == 1 and not response.complete
    assert running_job(client).n_decoded == 1  # the last token is not generated yet
    for n in range(2, 6):
        clock.advance(0.02)
        exchange.pump()
        assert len(response.chunks) == n + (1 if n == 5 else 0)
    assert response.complete
    for chunk in response.chunks:  # each write is exactly one SSE event
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n\n") == 1
    events = response.sse_json()
    assert "[DONE]" not in response.sse_data()
    assert [e["id_slot"] for e in events[:-1]] == [-1] * 5
    assert [e["tokens_predicted"] for e in events[:-1]] == [1, 2, 3, 4, 5]
    assert all(e["stop"] is False and len(e["tokens"]) == 1 for e in events[:-1])
    final = events[-1]
    # A fresh server starts with its last slot (llama-server's LRU ties go to the highest id).
    assert final["stop"] is True and final["id_slot"] == 1 and final["content"] == ""
    assert final["timings"]["predicted_n"] == 5
    assert final["timings"]["predicted_ms"] == pytest.approx(100.0)


def test_chat_stream_has_role_content_finish_usage_and_done(server: MakeServer, clock: Clock) -> None:
    """Chat SSE: role chunk, content chunks, finish_reason chunk, usage chunk, data: [DONE]."""
    client = server()
    exchange = client.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True},
    })
    clock.advance(5)
    response = exchange.pump()
    assert response.complete
    data = response.sse_data()
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert [list(e["choices"][0]["delta"]) for e in events[1:4]] == [["content"]] * 3
    assert events[4]["choices"] == [{"finish_reason": "length", "index": 0, "delta": {}}]
    usage = events[5]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert usage["timings"]["predicted_n"] == 3


def test_text_completion_stream_puts_usage_and_timings_on_the_finish_chunk(server: MakeServer, clock: Clock) -> None:
    """/v1/completions SSE: text_completion chunks, then one finish chunk with usage and
    timings whether or not include_usage is asked (llama-server's behaviour), then [DONE]."""
    client = server()
    for options in ({}, {"stream_options": {"include_usage": True}}):
        exchange = client.post(
            "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True, **options}
        )
        clock.advance(5)
        data = exchange.pump().sse_data()
        assert data[-1] == "[DONE]"
        events = [json.loads(d) for d in data[:-1]]
        assert [e["object"] for e in events] == ["text_completion"] * 3
        assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, "length"]
        assert events[-1]["usage"]["completion_tokens"] == 2
        assert events[-1]["timings"]["predicted_n"] == 2
        assert len({e["id"] for e in events}) == 1
