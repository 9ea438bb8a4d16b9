"""Routing: what llama.cpp will evaluate for a request, in a stable form (paddler.routing.prompt)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from paddler.routing.prompt import (
    CHARS_PER_TOKEN,
    MAX_PROMPT_CHARS,
    MEDIA_TOKENS,
    NO_PROMPT,
    prompt_info,
)

SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 20}


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": list(messages), **extra}


def test_a_completion_string_is_its_own_stable_form_with_a_chars_per_token_estimate() -> None:
    """/completion with a string prompt: the text itself, tokens = ceil(chars / 4)."""
    info = prompt_info({"prompt": "x" * 401}, "/completion")
    assert (info.text, info.kind, info.tokens) == ("x" * 401, "completion", -(-401 // CHARS_PER_TOKEN))
    assert info.has_prefix and not info.truncated
    for path in ("/completions", "/v1/completions", "/v1/completions?x=1", "/completion/"):
        assert prompt_info({"prompt": "abc"}, path).text == "abc"


def test_token_lists_and_mixed_lists_encode_in_order_and_count_one_per_token() -> None:
    """A token list counts one per id; a mixed list keeps its order; neither looks like the
    text of its digits."""
    tokens = prompt_info({"prompt": [1, 15043, 3186]}, "/completion")
    assert tokens.tokens == 3 and tokens.text != "1150433186" and "15043" in tokens.text
    mixed = prompt_info({"prompt": ["Hello", 3186, " there"]}, "/completion")
    assert mixed.text.startswith("Hello") and mixed.text.endswith(" there")
    assert mixed.text.index("3186") < mixed.text.index(" there")
    longer = prompt_info({"prompt": ["Hello", 3186, " there", 7]}, "/completion")
    assert longer.text.startswith(mixed.text)


def test_several_prompts_share_the_first_ones_prefix() -> None:
    """A list of prompts (one task each) starts with the first prompt's form."""
    several = prompt_info({"prompt": ["first prompt", "second"]}, "/completion")
    assert several.text.startswith("first prompt") and "second" in several.text
    nested = prompt_info({"prompt": [[1, 2], [3]]}, "/completion")
    assert nested.tokens == 3


def test_a_multimodal_prompt_object_adds_media_markers() -> None:
    """{"prompt_string", "multimodal_data"}: the string, then a marker per item, which costs
    MEDIA_TOKENS each and differs with the data."""
    a = prompt_info({"prompt": {"prompt_string": "see <__media__>", "multimodal_data": ["AAAA"]}}, "/completion")
    b = prompt_info({"prompt": {"prompt_string": "see <__media__>", "multimodal_data": ["BBBB"]}}, "/completion")
    assert a.text.startswith("see <__media__>") and a.text != b.text
    assert a.tokens == -(-len("see <__media__>") // CHARS_PER_TOKEN) + MEDIA_TOKENS


def test_chat_turns_extend_the_previous_turns_form() -> None:
    """Messages are encoded in order with their roles: turn 2 (turn 1 + reply + question)
    starts with turn 1's whole form, and another system prompt shares nothing of it."""
    turn1 = chat(SYSTEM, {"role": "user", "content": "Hi"})
    turn2 = chat(SYSTEM, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More"})
    one, two = prompt_info(turn1, "/v1/chat/completions"), prompt_info(turn2, "/v1/chat/completions")
    assert one.kind == "chat" and two.text.startswith(one.text) and two.tokens > one.tokens
    other = prompt_info(chat({"role": "system", "content": "Other."}, {"role": "user", "content": "Hi"}),
                        "/chat/completions")
    assert not other.text.startswith(one.text[:20])
    swapped = prompt_info(chat({"role": "user", "content": SYSTEM["content"]}), "/v1/chat/completions")
    assert not swapped.text.startswith(one.text[: len(one.text) // 2])  # the role counts


def test_content_parts_tools_and_images_are_part_of_the_form() -> None:
    """Text parts in order; images by a hash of their data; tools before the messages;
    tool calls in assistant messages."""
    def image(data: str) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}

    parts = [{"type": "text", "text": "look at"}, image("AAAA"), {"type": "text", "text": "please"}]
    a = prompt_info(chat({"role": "user", "content": parts}), "/v1/chat/completions")
    b = prompt_info(chat({"role": "user", "content": [parts[0], image("BBBB"), parts[2]]}), "/v1/chat/completions")
    assert "look at" in a.text and a.text.index("look at") < a.text.index("please")
    assert a.text != b.text and a.tokens == b.tokens and a.tokens >= MEDIA_TOKENS
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    with_tools = prompt_info(chat({"role": "user", "content": "x"}, tools=tools), "/v1/chat/completions")
    assert with_tools.text.index("weather") < with_tools.text.index("x")
    same_tools = prompt_info(chat({"role": "user", "content": "x"},
                                  tools=json.loads(json.dumps(tools))), "/v1/chat/completions")
    assert same_tools.text == with_tools.text
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "function": {"name": "weather", "arguments": "{}"}}]}
    assert "c1" in prompt_info(chat(call), "/v1/chat/completions").text


def test_infill_puts_extra_context_then_prefix_suffix_and_prompt() -> None:
    """/infill: input_extra chunks, then input_prefix, input_suffix and prompt, in that order."""
    body = {"input_extra": [{"filename": "a.py", "text": "import os"}], "input_prefix": "def f(",
            "input_suffix": "    return x", "prompt": "x"}
    info = prompt_info(body, "/infill")
    text = info.text
    assert info.kind == "infill"
    assert text.index("a.py") < text.index("import os") < text.index("def f(") < text.index("    return x")
    assert prompt_info({"input_prefix": "def f(", "input_suffix": "z"}, "/infill").text.startswith(
        prompt_info({"input_prefix": "def f(", "input_suffix": "y"}, "/infill").text[:7]
    )


def test_conversation_key_from_the_session_header_or_the_user_field() -> None:
    """X-Session-ID (any case, dict or twisted Headers) wins over the OpenAI user field."""
    body = {"prompt": "x", "user": "alice"}
    assert prompt_info(body, "/completion").conversation == "user:alice"
    assert prompt_info(body, "/completion", {"X-Session-ID": " s1 "}).conversation == "session:s1"
    assert prompt_info(body, "/completion", {b"x-session-id": b"s2"}).conversation == "session:s2"
    assert prompt_info(body, "/completion", Headers({b"X-Session-Id": [b"s3"]})).conversation == "session:s3"
    assert prompt_info({"prompt": "x", "user": 5}, "/completion").conversation is None
    assert len(prompt_info({"prompt": "x", "user": "u" * 10_000}, "/completion").conversation or "") < 300


def test_paths_without_a_prompt_and_odd_shapes_give_no_prefix() -> None:
    """Embeddings, unknown paths, non-object bodies and wrongly typed fields: no prefix, no raise."""
    odd: list[tuple[Any, str]] = [
        ({"input": "x"}, "/v1/embeddings"), ({"prompt": "x"}, "/health"), ([1, 2], "/completion"),
        ("text", "/completion"), (None, "/completion"), ({"prompt": {"x": 1}}, "/completion"),
        ({"prompt": 3.5}, "/completion"), ({"prompt": [1.5, None]}, "/completion"),
        ({"messages": "hi"}, "/v1/chat/completions"), ({"messages": [1, "x", None]}, "/v1/chat/completions"),
        ({}, "/infill"), ({"prompt": [True, False]}, "/completion"),
    ]
    for body, path in odd:
        assert prompt_info(body, path) == NO_PROMPT, (body, path)


def test_huge_prompts_are_cut_at_the_budget_but_counted_whole() -> None:
    """A 1 MB prompt keeps only MAX_PROMPT_CHARS of text but estimates all its tokens; a
    million-token list is bounded too."""
    info = prompt_info({"prompt": "y" * 1_000_000}, "/completion")
    assert len(info.text) == MAX_PROMPT_CHARS and info.truncated
    assert info.tokens == 1_000_000 // CHARS_PER_TOKEN
    many = prompt_info({"prompt": list(range(1_000_000))}, "/completion")
    assert len(many.text) <= MAX_PROMPT_CHARS and many.tokens == 1_000_000
    big_image = "A" * 5_000_000
    media = prompt_info(chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": big_image}}]}),
                        "/v1/chat/completions")
    assert len(media.text) < 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
bodies = st.dictionaries(
    st.sampled_from(["prompt", "messages", "tools", "system", "input_prefix", "input_suffix",
                     "input_extra", "user", "content", "role"]),
    json_values, max_size=6,
)


@given(body=bodies | json_values, path=st.sampled_from(
    ["/completion", "/v1/completions", "/v1/chat/completions", "/v1/messages", "/infill", "/x"]))
@settings(max_examples=300, deadline=None)
def test_prompt_info_never_raises_and_is_deterministic(body: Any, path: str) -> None:
    """Property: any JSON body on any path gives a PromptInfo (the same one twice), with a
    non-negative estimate and a form within the budget."""
    first, second = prompt_info(body, path), prompt_info(body, path)
    assert first == second
    assert first.tokens >= 0 and len(first.text) <= MAX_PROMPT_CHARS


def test_the_output_bound_is_read_from_the_fields_llama_server_reads() -> None:
    """max_completion_tokens, then max_tokens, then n_predict; a positive integer up to the cap;
    -1, 0, booleans, floats, strings and huge values mean "no bound"."""
    from paddler.routing.prompt import MAX_OUTPUT_TOKENS, prompt_info

    chat = [{"role": "user", "content": "hi"}]
    assert prompt_info({"messages": chat, "max_tokens": 64}, "/v1/chat/completions").max_tokens == 64
    assert prompt_info({"messages": chat, "max_completion_tokens": 9, "max_tokens": 64},
                       "/v1/chat/completions").max_tokens == 9
    assert prompt_info({"prompt": "hi", "n_predict": 32}, "/completion").max_tokens == 32
    for odd in (-1, 0, True, 3.5, "12", MAX_OUTPUT_TOKENS + 1, None):
        assert prompt_info({"prompt": "hi", "n_predict": odd}, "/completion").max_tokens is None
