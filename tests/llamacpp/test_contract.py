"""Contract tests: the same facts checked against ``paddler simulate`` and a real llama-server.

Every case runs twice, through the ``server`` fixture: once against a
simulator subprocess and once against the llama-server built from the
llama-cpp-python sdist (marked ``llamacpp``; skipped when it cannot be
built here). What the balancer relies on must hold for both: if a case
passes on the real server and fails on the simulator, the simulator is wrong.

To keep a slot busy for as long as a case needs, a streaming request asks
for nearly the whole slot context with ``ignore_eos`` and the case ends it
by disconnecting. Real slots get ``SLOT_CTX`` tokens of context each: the
tiny model's trained context (2048) caps a slot, so the real server is
started with ``--override-kv llama.context_length=int:SLOT_CTX``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.llamacpp.clients import (
    Background,
    Stream,
    Streams,
    busy_slots,
    drop,
    get,
    get_json,
    metric,
    post,
    send_unread,
    wait_for,
)

#: Context of each slot, on both servers.
SLOT_CTX = 16384
#: Tokens a slot-holding request asks for: seconds of work on either server.
HOLD_TOKENS = 16000
#: The simulator's generation speed (the tiny model does about 1,000-3,000).
SIM_TOKENS_PER_SECOND = 1000

IDLE_SLOT_KEYS = {"id", "n_ctx", "speculative", "is_processing"}
BUSY_SLOT_KEYS = IDLE_SLOT_KEYS | {
    "id_task", "n_prompt_tokens", "n_prompt_tokens_processed", "n_prompt_tokens_cache",
    "params", "next_token",
}
TIMINGS_KEYS = {
    "cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
    "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second",
}
NO_SLOT_BODY = {"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}}
NOT_FOUND_BODY = {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}
PROMPT_TYPE_MESSAGE = (
    '"prompt" elements must be a string, a list of tokens, a JSON object containing '
    "a prompt string, or a list of mixed strings & tokens."
)
CHAT = [{"role": "user", "content": "Say hello."}]


@dataclass
class Server:
    """One server under contract: its URL and what it is."""

    kind: str  # "simulator" or "llama-server"
    url: str
    slots: int


StartServer = Callable[..., Server]


@pytest.fixture(
    params=["simulator", pytest.param("llama-server", marks=pytest.mark.llamacpp)]
)
def server(request: pytest.FixtureRequest) -> StartServer:
    """Factory: ``server(slots=4)`` starts the parametrised kind with ``SLOT_CTX`` per slot.

    The process factory is set up here, before ``open_stream`` (tests list
    ``server`` first), so that streams are closed before servers are stopped:
    a server writing into an unread stream does not stop on SIGTERM.
    """
    kind = request.param
    processes = request.getfixturevalue(
        "start_simulator" if kind == "simulator" else "start_llama_server"
    )

    def start(slots: int = 4) -> Server:
        if kind == "simulator":
            url = processes(slots=slots, n_ctx=SLOT_CTX, tokens_per_second=SIM_TOKENS_PER_SECOND)
        else:
            url = processes(
                slots=slots,
                ctx=slots * SLOT_CTX,
                extra_args=["--override-kv", f"llama.context_length=int:{SLOT_CTX}"],
            )
        return Server(kind, url, slots)

    return start


def hold(open_stream: Streams, server: Server, id_slot: int = -1, read: bool = False) -> Stream:
    """A streaming request that keeps one slot busy until the test closes it."""
    return open_stream(
        server.url,
        "/completion",
        {"prompt": "Keep this slot busy", "n_predict": HOLD_TOKENS, "ignore_eos": True,
         "id_slot": id_slot},
        read=read,
    )


def hold_all(open_stream: Streams, server: Server) -> list[Stream]:
    """Hold every slot; return once ``/slots`` shows them all processing."""
    holders = [hold(open_stream, server, id_slot=i) for i in range(server.slots)]
    for holder in holders:
        holder.wait_first_event()
    wait_for(lambda: len(busy_slots(server.url)) == server.slots, 10, "every slot busy")
    return holders


def json_events(payloads: list[str]) -> list[dict[str, Any]]:
    return [json.loads(p) for p in payloads if p != "[DONE]"]


# /health and /slots


def test_health_is_ok_when_idle_and_when_every_slot_is_busy_with_a_queue(
    server: StartServer, open_stream: Streams
) -> None:
    """/health answers 200 {"status":"ok"} idle, and still 200 when all slots are busy and
    requests queue: it says nothing about capacity."""
    s = server(slots=2)
    reply = get(s.url, "/health")
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    hold_all(open_stream, s)
    queued = hold(open_stream, s)
    wait_for(lambda: metric(s.url, "requests_deferred") == 1, 10, "one request deferred")
    reply = get(s.url, "/health")
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    assert queued.events == []  # still waiting inside the server


def test_slots_lists_minimal_idle_slots_and_full_busy_ones(
    server: StartServer, open_stream: Streams
) -> None:
    """Idle /slots entries have exactly id, n_ctx, speculative, is_processing; a busy one adds
    id_task, prompt counters, params and a next_token array; only the busy slot is processing."""
    s = server(slots=3)
    slots = get_json(s.url, "/slots")
    assert [slot["id"] for slot in slots] == [0, 1, 2]
    for slot in slots:
        assert set(slot) == IDLE_SLOT_KEYS
        assert (slot["n_ctx"], slot["is_processing"], slot["speculative"]) == (SLOT_CTX, False, False)

    hold(open_stream, s, id_slot=1).wait_first_event()
    slots = wait_for(
        lambda: (lambda got: got if got[1]["next_token"][0]["n_decoded"] >= 1 else None)(
            get_json(s.url, "/slots")
        ),
        10,
        "slot 1 generating",
    )
    assert [slot["is_processing"] for slot in slots] == [False, True, False]
    busy = slots[1]
    assert BUSY_SLOT_KEYS <= set(busy)
    assert busy["n_ctx"] == SLOT_CTX and busy["n_prompt_tokens"] > 0
    assert busy["params"]["n_predict"] == HOLD_TOKENS and busy["params"]["ignore_eos"] is True
    assert isinstance(busy["next_token"], list) and len(busy["next_token"]) == 1
    token = busy["next_token"][0]
    assert token["has_next_token"] is True
    assert token["n_remain"] == HOLD_TOKENS - token["n_decoded"]
    assert set(slots[0]) == set(slots[2]) == IDLE_SLOT_KEYS


def test_fail_on_no_slot_answers_503_only_when_every_slot_is_busy(
    server: StartServer, open_stream: Streams
) -> None:
    """/slots?fail_on_no_slot=1 is 200 while a slot is idle and 503 "no slot available" when none is."""
    s = server(slots=2)
    hold(open_stream, s, id_slot=0).wait_first_event()
    wait_for(lambda: busy_slots(s.url) == [0], 10, "slot 0 busy")
    reply = get(s.url, "/slots?fail_on_no_slot=1")
    assert reply.status == 200 and len(reply.json()) == 2
    hold(open_stream, s, id_slot=1).wait_first_event()
    wait_for(lambda: busy_slots(s.url) == [0, 1], 10, "both slots busy")
    reply = get(s.url, "/slots?fail_on_no_slot=1")
    assert (reply.status, reply.json()) == (503, NO_SLOT_BODY)


# queueing inside the server


def test_requests_beyond_the_slots_queue_inside_the_server_and_all_complete(
    server: StartServer, open_stream: Streams
) -> None:
    """With N slots busy, k more requests are deferred (not refused) and all finish with 200
    once slots free up."""
    s = server(slots=2)
    holders = hold_all(open_stream, s)
    extra = [
        Background(lambda i=i: post(s.url, "/completion", {"prompt": f"queued {i}", "n_predict": 8}))
        for i in range(3)
    ]
    wait_for(lambda: metric(s.url, "requests_deferred") == 3, 10, "three requests deferred")
    assert metric(s.url, "requests_processing") == 2
    assert not any(request.done for request in extra)
    for holder in holders:
        holder.close()
    replies = [request.result(30) for request in extra]
    assert [reply.status for reply in replies] == [200, 200, 200]
    assert [reply.json()["tokens_predicted"] for reply in replies] == [8, 8, 8]
    wait_for(lambda: metric(s.url, "requests_deferred") == 0, 10, "queue empty")


# streaming formats


def test_completion_stream_has_token_chunks_then_a_final_stop_chunk_and_no_done(
    server: StartServer, open_stream: Streams
) -> None:
    """/completion SSE: text/event-stream, token chunks with id_slot -1 and stop false, then one
    chunk with stop true, the real id_slot and timings; no [DONE]."""
    s = server(slots=2)
    stream = open_stream(s.url, "/completion", {"prompt": "Once upon a time", "n_predict": 6,
                                               "ignore_eos": True, "id_slot": 1})
    payloads = stream.wait_end(30)
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream"
    assert "[DONE]" not in payloads
    events = json_events(payloads)
    *tokens, final = events
    assert 1 <= len(tokens) <= 6
    for event in tokens:
        assert (event["stop"], event["id_slot"]) == (False, -1)
        assert isinstance(event["content"], str) and event["tokens_predicted"] <= 6
    assert [e["tokens_predicted"] for e in tokens] == sorted(e["tokens_predicted"] for e in tokens)
    assert final["stop"] is True and final["id_slot"] == 1
    assert (final["tokens_predicted"], final["stop_type"], final["truncated"]) == (6, "limit", False)
    assert set(final["timings"]) == TIMINGS_KEYS and final["timings"]["predicted_n"] == 6


@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_completions_stream_ends_with_usage_and_timings_then_done(
    server: StartServer, open_stream: Streams, include_usage: bool
) -> None:
    """/v1/completions SSE: text_completion chunks of one id; the last carries finish_reason,
    usage and timings (with or without include_usage); then data: [DONE]."""
    s = server(slots=2)
    body: dict[str, Any] = {"prompt": "Hello", "max_tokens": 5, "ignore_eos": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    stream = open_stream(s.url, "/v1/completions", body)
    payloads = stream.wait_end(30)
    assert stream.status == 200 and stream.headers["content-type"] == "text/event-stream"
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    events = json_events(payloads)
    assert {e["object"] for e in events} == {"text_completion"}
    assert len({e["id"] for e in events}) == 1
    assert all(len(e["choices"]) == 1 for e in events)
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
    final = events[-1]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 5
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + 5
    assert set(final["timings"]) == TIMINGS_KEYS and final["timings"]["predicted_n"] == 5


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_has_role_content_finish_and_done(
    server: StartServer, open_stream: Streams, include_usage: bool
) -> None:
    """/v1/chat/completions SSE: a role chunk, content deltas, a finish_reason chunk (with the
    timings unless include_usage), with include_usage a choices-[] chunk with usage and
    timings, then data: [DONE]."""
    s = server(slots=2)
    body: dict[str, Any] = {"messages": CHAT, "max_tokens": 4, "ignore_eos": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    stream = open_stream(s.url, "/v1/chat/completions", body)
    payloads = stream.wait_end(30)
    assert stream.status == 200 and stream.headers["content-type"] == "text/event-stream"
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    events = json_events(payloads)
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    if include_usage:
        *rest, finish, usage = events
        assert usage["choices"] == []
        assert usage["usage"]["completion_tokens"] == 4
        assert set(usage["timings"]) == TIMINGS_KEYS
        assert "timings" not in finish
    else:
        *rest, finish = events
        assert set(finish["timings"]) == TIMINGS_KEYS and finish["timings"]["predicted_n"] == 4
    assert "usage" not in finish
    assert finish["choices"] == [{"finish_reason": "length", "index": 0, "delta": {}}]
    for event in rest[1:]:
        assert event["choices"][0]["finish_reason"] is None
        assert set(event["choices"][0]["delta"]) == {"content"}


# errors


BAD_REQUESTS = [
    ("/completion", {"prompt": 123456789012345678901234567890}, PROMPT_TYPE_MESSAGE),
    ("/v1/completions", {"prompt": {"x": 1}}, PROMPT_TYPE_MESSAGE),
    ("/completion", {"prompt": "hi", "n_predict": "ten"},
     "Field 'n_predict': [json.exception.type_error.302] type must be number, but is string"),
    ("/completion", {"n_predict": 3}, "[json.exception.out_of_range.403] key 'prompt' not found"),
    ("/completion", [1, 2], "[json.exception.type_error.304] cannot use at() with array"),
    ("/v1/chat/completions", {"messages": "hi"}, "Expected 'messages' to be an array"),
    ("/v1/chat/completions", {"max_tokens": 2}, "'messages' is required"),
]


def test_bad_requests_answer_400_invalid_request_error(server: StartServer) -> None:
    """Bad fields answer 400 with {"error": {"code": 400, "message": ..., "type":
    "invalid_request_error"}} and the server's own message (one server for all cases)."""
    s = server(slots=1)
    for path, body, message in BAD_REQUESTS:
        reply = post(s.url, path, body)
        assert reply.status == 400, (path, body, reply)
        assert reply.headers["content-type"] == "application/json; charset=utf-8"
        expected = {"error": {"code": 400, "message": message, "type": "invalid_request_error"}}
        assert reply.json() == expected, (path, body)


def test_invalid_json_answers_500_server_error(server: StartServer) -> None:
    """A body that is not JSON at all escapes as 500 server_error with nlohmann's parse error."""
    s = server(slots=1)
    reply = post(s.url, "/completion", b"{not json")
    assert reply.status == 500
    error = reply.json()["error"]
    assert (error["code"], error["type"]) == (500, "server_error")
    assert error["message"].startswith("[json.exception.parse_error.101] parse error at line 1, column ")


def test_unknown_paths_and_wrong_methods_answer_404_not_found_error(server: StartServer) -> None:
    """GET /nonexistent, GET /completion and POST /health answer 404 "File Not Found"."""
    s = server(slots=1)
    for reply in (get(s.url, "/nonexistent"), get(s.url, "/completion"), post(s.url, "/health", {})):
        assert reply.status == 404
        assert reply.json() == NOT_FOUND_BODY


def test_mistyped_fields_that_the_server_ignores(server: StartServer) -> None:
    """id_slot and stop of the wrong type are ignored, not refused (200)."""
    s = server(slots=1)
    for extra in ({"id_slot": "a"}, {"stop": 5}):
        reply = post(s.url, "/completion", {"prompt": "x", "n_predict": 1, **extra})
        assert reply.status == 200, (extra, reply)


# slots and the prompt cache


def test_id_slot_pins_the_request_and_cache_prompt_reuses_the_slot_cache(server: StartServer) -> None:
    """id_slot picks the slot; the same prompt again in that slot evaluates only its last token
    (timings.cache_n = n_prompt - 1); cache_prompt false evaluates all of it again."""
    s = server(slots=4)
    prompt = "Building a website can be done in ten simple steps, said the lazy fox"
    body = {"prompt": prompt, "n_predict": 4, "id_slot": 2}
    first = post(s.url, "/completion", body).json()
    second = post(s.url, "/completion", body).json()
    uncached = post(s.url, "/completion", {**body, "cache_prompt": False}).json()
    elsewhere = post(s.url, "/completion", {**body, "id_slot": 3}).json()
    assert [r["id_slot"] for r in (first, second, uncached, elsewhere)] == [2, 2, 2, 3]
    n_prompt = first["tokens_evaluated"]
    assert first["timings"]["cache_n"] < second["timings"]["cache_n"]
    assert second["timings"]["cache_n"] == n_prompt - 1
    assert second["timings"]["prompt_n"] == 1
    assert uncached["timings"]["cache_n"] == 0 and uncached["timings"]["prompt_n"] == n_prompt
    assert elsewhere["timings"]["cache_n"] < n_prompt - 1  # slot 3 never saw the prompt
    chat = {"messages": CHAT, "max_tokens": 2, "id_slot": 1}
    post(s.url, "/v1/chat/completions", chat)
    again = post(s.url, "/v1/chat/completions", chat).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert again["timings"]["cache_n"] == again["usage"]["prompt_tokens"] - 1


# disconnects


def test_streaming_client_disconnect_frees_the_slot_at_once(
    server: StartServer, open_stream: Streams
) -> None:
    """A streaming client that goes away mid-generation frees its slot long before the
    generation would have ended, and a queued request takes the slot."""
    s = server(slots=1)
    holder = hold(open_stream, s, read=True)
    holder.wait_first_event()
    queued = Background(lambda: post(s.url, "/completion", {"prompt": "next", "n_predict": 4}))
    wait_for(lambda: metric(s.url, "requests_deferred") == 1, 10, "second request deferred")
    remaining = get_json(s.url, "/slots")[0]["next_token"][0]["n_remain"]
    assert remaining > HOLD_TOKENS // 2  # seconds of work left on either server
    holder.close()
    reply = queued.result(3.0)  # the full generation would take several seconds more
    assert reply.status == 200 and reply.json()["id_slot"] == 0
    wait_for(lambda: busy_slots(s.url) == [], 5, "slot idle again")


def test_whole_response_client_disconnect_keeps_the_slot_until_done(server: StartServer) -> None:
    """A non-streaming client that goes away does not cancel its request: the slot stays
    busy and keeps generating after the disconnect (the server only notices a closed
    connection while it streams)."""
    s = server(slots=1)
    conn = send_unread(
        s.url, "/completion", {"prompt": "whole answer", "n_predict": 1500, "ignore_eos": True}
    )

    def decoded() -> int | None:
        slot = get_json(s.url, "/slots")[0]
        return slot["next_token"][0]["n_decoded"] if slot["is_processing"] else None

    at_close = wait_for(decoded, 10, "slot generating")
    drop(conn)

    def still_decoding() -> bool:
        now = decoded()
        assert now is not None, "the slot was freed: the request was cancelled"
        return now > at_close + 50

    wait_for(still_decoding, 10, "generation going on after the disconnect")
    wait_for(lambda: busy_slots(s.url) == [], 30, "slot idle once the generation is done")
