"""Routing: the Router the pool drives (paddler.routing.router), on a fake clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from paddler.routing.prefix import BLOCK_CHARS
from paddler.routing.prompt import CHARS_PER_TOKEN
from paddler.routing.router import Router, UpstreamView

SYSTEM = {"role": "system", "content": "You are the river guide. Answer about boats and water. " * 60}


def chat_body(*turns: str, user: str | None = None) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [SYSTEM]
    for index, text in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    body: dict[str, Any] = {"messages": messages}
    if user is not None:
        body["user"] = user
    return body


def views(**idle: int) -> list[UpstreamView]:
    return [UpstreamView(id=name, slots_idle=free, slots_total=4, in_flight=4 - free)
            for name, free in idle.items()]


def timings(cache_n: int, prompt_n: int) -> dict[str, Any]:
    return {"cache_n": cache_n, "prompt_n": prompt_n, "prompt_ms": prompt_n / 2.0,
            "predicted_n": 20, "predicted_ms": 500.0}


def test_a_second_turn_goes_where_the_first_was_served() -> None:
    """Turn 1 goes to the most idle upstream; turn 2 (same history + more) ranks the upstream
    that served turn 1 first although the other has more idle slots."""
    router = Router(Clock())
    first = router.prepare(chat_body("How deep is the river?"), "/v1/chat/completions")
    decision = router.rank(first, views(a=2, b=3))
    assert decision.order[0] == "b"
    sent = router.dispatched(first, "b")
    router.finished(sent, "b", timings(0, first.info.tokens))
    second = router.prepare(chat_body("How deep is the river?", "Ten metres.", "And wide?"),
                            "/v1/chat/completions")
    assert router.rank(second, views(a=4, b=2)).order[0] == "b"
    stats = router.stats("b")
    assert stats["prefix_recorded"] == 1 and stats["speeds_measured"]


def test_speeds_learnt_from_timings_steer_requests_without_a_prefix() -> None:
    """With no shared prefix, the upstream measured faster at prompts ranks first."""
    router = Router(Clock())
    for upstream, ms in (("slow", 1000.0), ("fast", 100.0)):
        request = router.prepare({"prompt": upstream * 300}, "/completion")
        sent = router.dispatched(request, upstream)
        router.finished(sent, upstream, {"prompt_n": 500, "prompt_ms": ms, "predicted_n": 10,
                                         "predicted_ms": 100.0, "cache_n": 0})
    fresh = router.prepare({"prompt": "entirely new text " * 200}, "/completion")
    assert router.rank(fresh, views(slow=4, fast=4)).order == ["fast", "slow"]


def test_a_conversation_stays_on_its_upstream_while_it_has_room() -> None:
    """The user field pins a conversation: it goes back to its upstream while that one has an
    idle slot, is waited for when full but within the bound, and moves when it is gone."""
    router = Router(Clock(), max_wait=2.0)
    body = {"prompt": "short", "user": "alice"}
    request = router.prepare(body, "/v1/completions")
    router.dispatched(request, "a")
    assert router.rank(request, views(a=1, b=4)).order[0] == "a"
    full = router.rank(request, views(a=0, b=4))
    assert full.order[0] == "b" and full.wait_for == "a" and full.wait_up_to == 2.0
    router.forget("a")
    assert router.conversation_upstream(request) is None
    other = router.prepare({"prompt": "short", "user": "bob"}, "/v1/completions")
    assert router.rank(other, views(a=1, b=4)).order[0] == "b"


def test_a_wrong_prediction_shrinks_the_capacity_but_keeps_the_prompt_just_evaluated() -> None:
    """The server says it reused nothing of a prefix the index expected: the miss is counted and
    the upstream's capacity shrinks, but the server has just evaluated the whole prompt, so the
    next request with it is predicted there (and confirmed)."""
    router = Router(Clock())
    request = router.prepare({"prompt": "x" * (BLOCK_CHARS * 100)}, "/completion")
    router.dispatched(request, "a")
    again = router.dispatched(request, "a")
    assert again.predicted_blocks("a") == 100
    router.finished(again, "a", timings(cache_n=0, prompt_n=request.info.tokens))
    assert router.stats("a")["prefix_misses"] == 1
    assert router.stats("a")["prefix_capacity"] < router.index.max_blocks
    assert router.index.match("a", request.blocks) == 100
    confirmed = router.dispatched(request, "a")
    assert confirmed.predicted_blocks("a") == 100
    router.finished(confirmed, "a", timings(cache_n=100 * BLOCK_CHARS // CHARS_PER_TOKEN - 1, prompt_n=1))
    assert router.stats("a")["prefix_hits"] == 1 and router.index.match("a", request.blocks) == 100


def test_a_hot_prefix_cannot_pile_onto_one_upstream() -> None:
    """Everyone shares one long system prompt, cached on a only: a comes first while it has an
    idle slot; once full, the request goes to b (never above a's slots), at most waiting for a
    within the bound."""
    router = Router(Clock(), max_wait=0.5)
    first = router.prepare(chat_body("q0"), "/v1/chat/completions")
    router.finished(router.dispatched(first, "a"), "a", timings(0, first.info.tokens))
    later = router.prepare(chat_body("q1"), "/v1/chat/completions")
    assert router.rank(later, views(a=1, b=4)).order[0] == "a"
    full = router.rank(later, views(a=0, b=4))
    assert full.order == ["b", "a"] and full.best is not None and full.best.id == "b"
    assert full.wait_up_to <= 0.5


def test_requests_without_a_prompt_rank_by_idle_slots() -> None:
    """An embeddings call or an odd body has no prefix: the slots policy's order."""
    router = Router(Clock())
    request = router.prepare({"input": "x"}, "/v1/embeddings")
    assert request.blocks == () and router.rank(request, views(a=1, b=3, c=2)).order == ["b", "c", "a"]


def _two_slot_views(a_idle: int, b_idle: int) -> list[UpstreamView]:
    return [UpstreamView(id="a", slots_idle=a_idle, slots_total=2, in_flight=2 - a_idle),
            UpstreamView(id="b", slots_idle=b_idle, slots_total=2, in_flight=2 - b_idle)]


def test_a_conversation_stays_warm_after_another_takes_its_system_prompt() -> None:
    """Two 2-slot upstreams, two conversations with one short system prompt: conversation 2's
    first turn goes to conversation 1's upstream (it holds the system prompt) and takes the
    prefix from conversation 1's slot there; conversation 1's next turn must still find its
    whole history on that upstream and go back to it, not to the emptier cold one (the index
    took the shared prefix for a load from RAM, dropped conversation 1's entry, and the
    next turn moved: seen on two real llama-servers, docs/routing.md)."""
    clock = Clock()
    router = Router(clock, weigh_output=True)
    system = {"role": "system", "content": "Guide. " * 90}  # ~10 blocks
    first = ["Tell me about the upper river, its boats and its locks. " * 28]  # ~25 blocks
    other = ["Tell me about the lower delta and its birds in winter. " * 70]  # ~60 blocks

    def body(turns: list[str]) -> dict[str, Any]:
        return {"messages": [system, *({"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                       for i, t in enumerate(turns))]}

    one = router.prepare(body(first), "/v1/chat/completions")
    assert router.rank(one, _two_slot_views(2, 2)).order[0] == "a"
    one = router.dispatched(one, "a")
    clock.advance(0.2)
    router.finished(one, "a", timings(0, one.info.tokens))
    two = router.prepare(body(other), "/v1/chat/completions")
    assert router.rank(two, _two_slot_views(2, 2)).order[0] == "a"  # the system prompt is there
    two = router.dispatched(two, "a")  # running: one slot of a is busy
    again = router.prepare(body([*first, "It is long.", "And the locks?"]), "/v1/chat/completions")
    decision = router.rank(again, _two_slot_views(1, 2))
    mine = next(e for e in decision.ranked if e.id == "a")
    assert mine.candidate.cached_tokens >= 30 * BLOCK_CHARS // CHARS_PER_TOKEN
    assert decision.order[0] == "a"


def test_a_new_conversation_goes_where_fewer_conversations_live_per_slot() -> None:
    """Two idle 2-slot upstreams of one kind (generation measured at 210 and 190 tokens/s:
    noise, one speed band); two conversations live on a, one on b. A new conversation nobody
    holds goes to b: with a third on a, two of them would want its two slots at once and one
    would move, re-evaluating its history (the noisier speed decided before). Conversations
    older than RESIDENT_SECONDS no longer count."""
    from paddler.routing.router import RESIDENT_SECONDS

    clock = Clock()
    router = Router(clock, weigh_output=True)

    def serve(upstream: str, text: str, speed: float) -> None:
        request = router.dispatched(router.prepare({"prompt": text}, "/completion"), upstream)
        clock.advance(0.1)
        router.finished(request, upstream, {"cache_n": 0, "prompt_n": 300, "prompt_ms": 100.0,
                                            "predicted_n": 20, "predicted_ms": 20_000.0 / speed})

    serve("a", "first conversation on a " * 50, 210.0)
    serve("b", "only conversation on b " * 50, 190.0)
    serve("a", "second conversation on a " * 50, 210.0)
    new = router.prepare({"prompt": "a new conversation " * 50}, "/completion")
    assert router.rank(new, _two_slot_views(2, 2)).order[0] == "b"
    clock.advance(RESIDENT_SECONDS)
    serve("b", "another on b " * 50, 190.0)  # b: one lately, a: none
    assert router.rank(new, _two_slot_views(2, 2)).order[0] == "a"
