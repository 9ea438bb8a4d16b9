"""The simulated llama-server over HTTP: a real Site driven in memory with a fake clock."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from paddler.simulator.engine import SimulatorConfig, tokenize
from paddler.simulator.service import SimulatorSite, simulator_site
from paddler.simulator.testing import MemoryHTTPClient
from paddler.simulator.validation import PROMPT_TYPE_MESSAGE

MakeServer = Callable[..., MemoryHTTPClient]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> Iterator[MakeServer]:
    """Build simulated servers on the fake clock; afterwards close every
    connection and check that nothing is left scheduled."""
    clients: list[MemoryHTTPClient] = []

    def make(**config: Any) -> MemoryHTTPClient:
        client = MemoryHTTPClient(simulator_site(clock, SimulatorConfig(**config)))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    assert clock.getDelayedCalls() == []


def engine_of(client: MemoryHTTPClient):  # type: ignore[no-untyped-def]
    site = client.site
    assert isinstance(site, SimulatorSite)
    return site.engine


def running_job(client: MemoryHTTPClient):  # type: ignore[no-untyped-def]
    """The one job running on the server (a fresh server, like llama-server, starts with its last slot)."""
    [job] = [slot.job for slot in engine_of(client).slots if slot.job is not None]
    return job


def metric(client: MemoryHTTPClient, name: str) -> float:
    text = client.get("/metrics").response.body.decode()
    for line in text.splitlines():
        if line.startswith("llamacpp:" + name + " "):
            return float(line.split(" ")[1])
    raise AssertionError(f"no metric {name}")


# health, loading, read-only endpoints


def test_health_answers_ok_on_both_paths(server: MakeServer) -> None:
    """GET /health and /v1/health answer 200 {"status":"ok"} with llama.cpp's headers."""
    client = server()
    for path in ("/health", "/v1/health"):
        response = client.get(path).response
        assert response.status == 200
        assert response.body == b'{"status":"ok"}'
        assert response.header("content-type") == "application/json; charset=utf-8"
        assert response.header("server") == "llama.cpp"


def test_loading_phase_answers_503_everywhere_then_200(server: MakeServer, clock: Clock) -> None:
    """During load_seconds every endpoint answers the exact 503 'Loading model' body."""
    client = server(load_seconds=2.0)
    loading = b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}'
    probes = [
        client.get("/health"), client.get("/v1/health"), client.get("/slots"),
        client.get("/props"), client.get("/v1/models"), client.get("/metrics"),
        client.post("/completion", {"prompt": "hi", "n_predict": 2}),
        client.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ]
    for exchange in probes:
        assert (exchange.response.status, exchange.response.body) == (503, loading)
    clock.advance(1.999)
    assert client.get("/health").response.status == 503
    clock.advance(0.001)
    response = client.get("/health").response
    assert (response.status, response.json()) == (200, {"status": "ok"})
    assert client.get("/slots").response.status == 200


def test_idle_slots_are_minimal_objects(server: MakeServer) -> None:
    """Idle /slots entries carry only id, n_ctx, speculative and is_processing."""
    client = server(slots=3, n_ctx=512)
    response = client.get("/slots").response
    assert response.status == 200
    assert response.json() == [
        {"id": i, "n_ctx": 512, "speculative": False, "is_processing": False} for i in range(3)
    ]
    assert client.get("/slots?fail_on_no_slot=1").response.status == 200


def test_props_describe_the_server(server: MakeServer) -> None:
    """/props reports slots, context, model and endpoint switches like the new build."""
    client = server(slots=3, n_ctx=1024, model="tiny.gguf", metrics_endpoint=False)
    props = client.get("/props").response.json()
    assert props["total_slots"] == 3
    assert props["default_generation_settings"]["n_ctx"] == 1024
    assert props["default_generation_settings"]["params"]["n_predict"] == -1
    assert props["model_alias"] == props["model_path"] == "tiny.gguf"
    assert props["is_sleeping"] is False
    assert props["endpoint_slots"] is True and props["endpoint_metrics"] is False
    assert "<|im_start|>" in props["chat_template"]
    assert props["build_info"].startswith("b")


def test_models_list_both_ollama_and_openai_shapes(server: MakeServer) -> None:
    """/v1/models and /models return "models" and "data" lists naming the model."""
    client = server(model="tiny.gguf", n_ctx=512)
    for path in ("/v1/models", "/models"):
        body = client.get(path).response.json()
        assert body["object"] == "list"
        assert [m["model"] for m in body["models"]] == ["tiny.gguf"]
        assert [(d["id"], d["owned_by"], d["meta"]["n_ctx"]) for d in body["data"]] == [
            ("tiny.gguf", "llamacpp", 512)
        ]


def test_tokenize_matches_the_prompt_token_count(server: MakeServer) -> None:
    """/tokenize returns the tokens a prompt costs (no BOS unless add_special)."""
    client = server()
    body = client.post("/tokenize", {"content": "Hello world"}).response.json()
    assert body == {"tokens": tokenize("Hello world", add_bos=False)}
    pieces = client.post("/tokenize", {"content": "Hello world", "with_pieces": True, "add_special": True})
    assert [p["piece"] for p in pieces.response.json()["tokens"]] == ["<s>", "Hello", " world"]


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


def test_metrics_are_prometheus_text_with_llamacpp_names(server: MakeServer, clock: Clock) -> None:
    """/metrics is text/plain Prometheus with llama-server's counter and gauge names."""
    client = server(prompt_tokens_per_second=100)
    exchange = client.post("/completion", {"prompt": "a b c", "n_predict": 3})
    clock.advance(5)
    exchange.pump()
    response = client.get("/metrics").response
    assert response.header("content-type") == "text/plain; version=0.0.4"
    text = response.body.decode()
    assert "# TYPE llamacpp:prompt_tokens_total counter" in text
    assert "# TYPE llamacpp:requests_deferred gauge" in text
    assert metric(client, "prompt_tokens_total") == 4
    assert metric(client, "prompt_seconds_total") == pytest.approx(0.04)
    assert metric(client, "prompt_tokens_seconds") == pytest.approx(100)
    assert metric(client, "tokens_predicted_total") == 3
    assert metric(client, "predicted_tokens_seconds") == pytest.approx(50)
    assert metric(client, "n_tokens_max") == 7


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


def test_disconnect_frees_the_slot_for_the_queued_request(server: MakeServer, clock: Clock) -> None:
    """A streaming client that goes away frees its slot at once; the queued request takes it."""
    client = server(slots=1, tokens_per_second=10)
    engine = engine_of(client)
    streaming = client.post("/completion", {"prompt": "long", "n_predict": 100, "stream": True})
    waiting = client.post("/completion", {"prompt": "short", "n_predict": 2})
    clock.advance(0.35)
    streaming.pump()
    assert len(streaming.response.chunks) == 3
    first_task = engine.slots[0].job.id_task
    assert engine.requests_deferred == 1
    streaming.close()
    assert engine.requests_deferred == 0
    assert engine.slots[0].job is not None and engine.slots[0].job.id_task != first_task
    assert engine.metrics.requests_cancelled_total == 1
    clock.advance(1)
    assert waiting.pump().complete and waiting.response.json()["tokens_predicted"] == 2
    assert streaming.writes() == 0  # nothing more was written to the gone client
    assert engine.metrics.tokens_predicted_total == 3 + 2


def test_disconnect_while_waiting_for_a_whole_response_keeps_the_slot_until_done(server: MakeServer, clock: Clock) -> None:
    """A non-streaming client that goes away does not cancel its job: as in llama-server,
    the slot stays busy until the generation ends, and nothing is written to the gone client."""
    client = server(slots=1, tokens_per_second=50)
    engine = engine_of(client)
    exchange = client.post("/completion", {"prompt": "x", "n_predict": 50})
    clock.advance(0.1)
    assert engine.requests_processing == 1
    exchange.close()
    assert engine.requests_processing == 1
    assert engine.metrics.requests_cancelled_total == 0
    clock.advance(1)
    assert engine.requests_processing == 0
    assert engine.metrics.tokens_predicted_total == 50
    assert exchange.writes() == 0


def test_paused_transport_pauses_token_generation(server: MakeServer, clock: Clock) -> None:
    """While the transport is paused no token is generated or buffered; resuming continues."""
    client = server(tokens_per_second=10)
    exchange = client.post("/completion", {"prompt": "x", "n_predict": 5, "stream": True})
    clock.advance(0.15)
    exchange.pump()
    assert len(exchange.response.chunks) == 1
    producer = exchange.transport.producer
    assert producer is not None
    producer.pauseProducing()
    clock.advance(10)
    assert exchange.writes() == 0
    assert running_job(client).n_decoded == 1
    producer.resumeProducing()
    clock.advance(1)
    assert exchange.pump().complete and len(exchange.response.sse_json()) == 6


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


def test_unknown_path_and_wrong_method_get_404(server: MakeServer) -> None:
    """Unknown paths (and GET on POST-only routes) answer llama-server's 404 body."""
    client = server()
    for exchange in (client.get("/nonexistent"), client.get("/completion")):
        assert exchange.response.status == 404
        assert exchange.response.body == (
            b'{"error":{"message":"File Not Found","type":"not_found_error","code":404}}'
        )


def test_api_key_protects_everything_but_health(server: MakeServer, clock: Clock) -> None:
    """With an API key, all but /health answer 401 without it, and work with Bearer or X-Api-Key."""
    client = server(api_key="secret")
    unauthorized = b'{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}'
    for exchange in (
        client.get("/slots"), client.get("/props"), client.get("/v1/models"), client.get("/metrics"),
        client.get("/nonexistent"), client.post("/completion", {"prompt": "hi"}),
        client.get("/slots", {"Authorization": "Bearer wrong"}),
    ):
        assert (exchange.response.status, exchange.response.body) == (401, unauthorized)
    assert client.get("/health").response.status == 200
    assert client.get("/v1/health").response.status == 200
    assert client.get("/slots", {"Authorization": "Bearer secret"}).response.status == 200
    assert client.get("/props", {"X-Api-Key": "secret"}).response.status == 200
    exchange = client.post("/completion", {"prompt": "hi", "n_predict": 1}, {"Authorization": "Bearer secret"})
    clock.advance(1)
    assert exchange.pump().status == 200


def test_disabled_slots_and_metrics_answer_501(server: MakeServer) -> None:
    """--no-slots-endpoint and --no-metrics give llama-server's 501 not_supported_error bodies."""
    client = server(slots_endpoint=False, metrics_endpoint=False)
    slots = client.get("/slots").response
    assert slots.status == 501
    assert slots.json() == {"error": {
        "code": 501,
        "message": "This server does not support slots endpoint. Start it with `--slots`",
        "type": "not_supported_error",
    }}
    metrics = client.get("/metrics").response
    assert metrics.status == 501
    assert metrics.json()["error"]["type"] == "not_supported_error"
    assert "metrics endpoint" in metrics.json()["error"]["message"]


def test_id_slot_and_cache_prompt_over_http(server: MakeServer, clock: Clock) -> None:
    """id_slot pins the request; the same prompt again on that slot shows cache_n > 0."""
    client = server(slots=4)
    body = {"prompt": "Building a website can be done in 10 simple steps:", "n_predict": 4, "id_slot": 2}
    first = client.post("/completion", body)
    clock.advance(1)
    second = client.post("/completion", body)
    clock.advance(1)
    ignored = client.post("/completion", {**body, "id_slot": 99})
    clock.advance(1)
    a, b = first.pump().json(), second.pump().json()
    assert a["id_slot"] == b["id_slot"] == 2
    assert a["timings"]["cache_n"] == 0 and b["timings"]["cache_n"] == a["tokens_evaluated"] - 1
    assert b["timings"]["prompt_ms"] < a["timings"]["prompt_ms"]
    assert ignored.pump().status == 200 and ignored.response.json()["id_slot"] in range(4)
