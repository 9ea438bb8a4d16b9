"""The simulated llama-server's routes and HTTP plumbing: health, loading, read-only
endpoints, API key, disabled endpoints, disconnects and backpressure."""

from __future__ import annotations


from twisted.internet.task import Clock

from paddler.simulator.tokenizer import tokenize
from tests.simulator_support import MakeServer, engine_of, running_job
from tests.simulator_support import clock, server  # noqa: F401 - pytest fixtures


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
