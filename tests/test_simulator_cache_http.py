"""The simulated llama-server's prompt cache seen over HTTP: timings, usage, /slots, /metrics."""

from __future__ import annotations

from twisted.internet.task import Clock

from tests.simulator_support import MakeServer, metric
from tests.simulator_support import clock, server  # noqa: F401 - pytest fixtures


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


def test_an_idle_slot_that_ran_a_task_shows_the_tokens_it_holds(server: MakeServer, clock: Clock) -> None:
    """After a task, /slots shows the idle slot in full like llama-server: its last id_task,
    n_prompt_tokens = the tokens its KV cache holds (prompt + generated - 1), zero prompt
    counters, the task's params and a finished next_token; unused slots stay minimal."""
    client = server(slots=2)
    done = client.post("/completion", {"prompt": "one two three", "n_predict": 5})
    clock.advance(1)
    body = done.pump().json()
    assert body["tokens_cached"] == body["tokens_evaluated"] + 5 - 1
    slots = client.get("/slots").response.json()
    used = slots[body["id_slot"]]
    assert list(used) == [
        "id", "n_ctx", "speculative", "is_processing", "id_task", "n_prompt_tokens",
        "n_prompt_tokens_processed", "n_prompt_tokens_cache", "params", "next_token",
    ]
    assert used["is_processing"] is False and used["n_prompt_tokens"] == body["tokens_cached"]
    assert (used["n_prompt_tokens_processed"], used["n_prompt_tokens_cache"]) == (0, 0)
    assert used["next_token"] == [
        {"has_next_token": False, "has_new_line": False, "n_remain": -1, "n_decoded": 0}
    ]
    assert used["params"]["n_predict"] == 5
    assert set(slots[1 - body["id_slot"]]) == {"id", "n_ctx", "speculative", "is_processing"}


def test_a_second_chat_turn_reuses_the_first_turns_prompt(server: MakeServer, clock: Clock) -> None:
    """Chat messages are templated in order, so turn 2 (turn 1 + the reply + a new question)
    starts with turn 1's prompt: cache_n covers it, and usage reports the same figure as
    prompt_tokens_details.cached_tokens."""
    client = server(slots=2)
    system = {"role": "system", "content": "You answer questions about rivers. " * 40}
    turn1 = [system, {"role": "user", "content": "How long is the Danube?"}]
    first = client.post("/v1/chat/completions", {"messages": turn1, "max_tokens": 8})
    clock.advance(1)
    reply = first.pump().json()
    turn2 = turn1 + [reply["choices"][0]["message"], {"role": "user", "content": "And the Rhine?"}]
    second = client.post("/v1/chat/completions", {"messages": turn2, "max_tokens": 8})
    clock.advance(1)
    answer = second.pump().json()
    n_turn1 = reply["usage"]["prompt_tokens"]
    cached = answer["timings"]["cache_n"]
    assert reply["timings"]["cache_n"] == 0
    assert n_turn1 - 1 <= cached < answer["usage"]["prompt_tokens"]
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    assert answer["timings"]["prompt_n"] == answer["usage"]["prompt_tokens"] - cached


def test_metrics_count_evaluated_and_cached_prompt_tokens_apart(server: MakeServer, clock: Clock) -> None:
    """llamacpp:prompt_tokens_total counts evaluated tokens only; the reused ones are in
    llamacpp:prompt_tokens_cached_total."""
    client = server(slots=1)
    body = {"prompt": "the same words again and again " * 20, "n_predict": 1}
    results = []
    for _ in range(3):
        exchange = client.post("/completion", body)
        clock.advance(1)
        results.append(exchange.pump().json()["timings"])
    assert metric(client, "prompt_tokens_total") == sum(t["prompt_n"] for t in results)
    assert metric(client, "prompt_tokens_cached_total") == sum(t["cache_n"] for t in results)
    assert [t["prompt_n"] for t in results[1:]] == [1, 1]
