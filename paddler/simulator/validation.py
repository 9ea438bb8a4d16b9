"""Request validation: what llama-server accepts, and its exact 400 messages.

Each generation endpoint's JSON body becomes a L{GenerationRequest} here, or
a L{InvalidRequest} whose message is the one llama-server (0c1e57098) sends
(nlohmann::json's type errors prefixed with the field, its own prompt and
messages errors). Chat messages are templated with the simulated model's
ChatML template into one prompt, deterministically, so that the turns of a
conversation share prefixes as they do on a real server.
"""

from __future__ import annotations

import json
from typing import Any

from paddler.simulator.engine import GenerationRequest, SimulatorError
from paddler.simulator.tokenizer import BOS_TEXT, N_VOCAB, piece_text, tokenize

MISSING_PROMPT_MESSAGE = "[json.exception.out_of_range.403] key 'prompt' not found"

PROMPT_TYPE_MESSAGE = (
    '"prompt" elements must be a string, a list of tokens, a JSON object containing '
    "a prompt string, or a list of mixed strings & tokens."
)


_NUMBER_SETTINGS = (
    "temperature", "dynatemp_range", "dynatemp_exponent", "top_k", "top_p", "min_p",
    "top_n_sigma", "xtc_probability", "xtc_threshold", "typical_p", "repeat_last_n",
    "repeat_penalty", "presence_penalty", "frequency_penalty", "dry_multiplier", "dry_base",
    "dry_allowed_length", "dry_penalty_last_n", "mirostat", "mirostat_tau", "mirostat_eta",
    "n_keep", "n_probs", "min_keep",
)


class InvalidRequest(Exception):
    """A request body llama-server would answer with 400 invalid_request_error."""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_error(expected: str, value: Any, key: str | None = None) -> InvalidRequest:
    """nlohmann::json's type error, prefixed with the field as llama-server does."""
    message = f"[json.exception.type_error.302] type must be {expected}, but is {_json_type(value)}"
    return InvalidRequest(message if key is None else f"Field '{key}': {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get_int(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if not _is_number(value):
        raise _type_error("number", value, key)
    return int(value)


def _get_int_lenient(body: dict[str, Any], key: str, default: int) -> int:
    """A number field llama-server ignores when it has the wrong type
    (``id_slot``, and ``max_tokens`` on /completion)."""
    value: Any = body.get(key)
    return int(value) if _is_number(value) else default


def _get_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error("boolean", value, key)
    return value


def _get_stop(body: dict[str, Any]) -> tuple[str, ...]:
    """``stop``: a string or a list of strings; anything else is ignored, as llama-server does."""
    value = body.get("stop")
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(word for word in value if isinstance(word, str))
    return ()


def _get_settings(body: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for key in _NUMBER_SETTINGS:
        if key in body and body[key] is not None:
            value = body[key]
            if not _is_number(value):
                raise _type_error("number", value, key)
            settings[key] = value
    return settings


def prompt_tokens(prompt: Any) -> tuple[list[int], str]:
    """Tokenize a /completion prompt; return the tokens and the prompt as text."""
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt_string"), str):
        prompt = prompt["prompt_string"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenize(prompt), BOS_TEXT + " " + prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
            for token in prompt:
                if not 0 <= token < N_VOCAB:
                    raise InvalidRequest(f"invalid token {token} in the prompt")
            return list(prompt), "".join(piece_text(token) for token in prompt)
        if all(isinstance(item, (str, int)) and not isinstance(item, bool) for item in prompt):
            if all(isinstance(item, str) for item in prompt):
                raise InvalidRequest("the simulator serves one prompt per request, not a list of prompts")
            tokens = tokenize("", add_bos=True)
            text = BOS_TEXT
            for item in prompt:
                if isinstance(item, str):
                    tokens.extend(tokenize(item, add_bos=False))
                    text += item
                else:
                    tokens.append(item)
                    text += piece_text(item)
            return tokens, text
    raise InvalidRequest(PROMPT_TYPE_MESSAGE)


def render_chat(messages: Any) -> str:
    """Render chat messages with the simulated model's ChatML template.

    Each message becomes ``<|im_start|>ROLE\nCONTENT<|im_end|>\n`` in order
    (text parts of a content array joined by newlines), then the assistant
    generation prompt: the same history always gives the same prompt, and a
    longer history extends the shorter one's prompt.
    """
    if not isinstance(messages, list):
        raise InvalidRequest("Expected 'messages' to be an array")
    if not messages:
        raise InvalidRequest("'messages' must not be empty")
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest("Missing 'role' in message")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise InvalidRequest("unsupported content[].type")
                text = part.get("text")
                if not isinstance(text, str):
                    raise InvalidRequest("Missing 'text' in content part")
                texts.append(text)
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise InvalidRequest("Invalid 'content' type")
        out.append("<|im_start|>" + message["role"] + "\n" + content + "<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object.

    @raise SimulatorError: not JSON at all: llama-server lets nlohmann::json's
        parse error escape as a 500 server_error.
    @raise InvalidRequest: JSON but not an object.
    """
    try:
        body = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise SimulatorError(
            500,
            f"[json.exception.parse_error.101] parse error at line {e.lineno}, column "
            f"{e.colno}: syntax error while parsing value - {e.msg}",
            "server_error",
        ) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise SimulatorError(
            500, f"[json.exception.parse_error.101] parse error: {e}", "server_error"
        ) from None
    except RecursionError:  # nested deeper than Python's parser goes (nlohmann::json has no such limit)
        raise SimulatorError(
            500, "[json.exception.parse_error.101] parse error: nested too deeply", "server_error"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"[json.exception.type_error.304] cannot use at() with {_json_type(body)}"
        )
    return body


def _generation(body: dict[str, Any], tokens: list[int], text: str, n_predict: int) -> GenerationRequest:
    seed: int | None = _get_int(body, "seed", -1)
    if seed in (-1, 4294967295):
        seed = None
    return GenerationRequest(
        prompt_tokens=tokens,
        prompt_text=text,
        n_predict=n_predict,
        ignore_eos=_get_bool(body, "ignore_eos", False),
        cache_prompt=_get_bool(body, "cache_prompt", True),
        id_slot=_get_int_lenient(body, "id_slot", -1),
        seed=seed,
        stop=_get_stop(body),
        stream=_get_bool(body, "stream", False),
        settings=_get_settings(body),
    )


def completion_request(body: dict[str, Any], openai: bool = False) -> GenerationRequest:
    """The request of a ``/completion`` (or, with C{openai}, ``/v1/completions``) body.

    @raise InvalidRequest: a field llama-server refuses.
    """
    if "prompt" not in body:
        raise InvalidRequest(MISSING_PROMPT_MESSAGE)
    tokens, text = prompt_tokens(body["prompt"])
    if openai:
        n_predict = _get_int(body, "max_tokens", _get_int(body, "n_predict", -1))
    else:
        n_predict = _get_int(body, "n_predict", _get_int_lenient(body, "max_tokens", -1))
    return _generation(body, tokens, text, n_predict)


def chat_request(body: dict[str, Any]) -> GenerationRequest:
    """The request of a ``/v1/chat/completions`` body: its messages templated into one prompt.

    @raise InvalidRequest: a field llama-server refuses.
    """
    if "messages" not in body:
        raise InvalidRequest("'messages' is required")
    text = render_chat(body["messages"])
    n_predict = _get_int(
        body, "max_completion_tokens",
        _get_int(body, "max_tokens", _get_int(body, "n_predict", -1)),
    )
    return _generation(body, tokenize(text), text, n_predict)


def tokenize_options(body: dict[str, Any]) -> tuple[str, bool, bool]:
    """``/tokenize``: the content, ``add_special`` and ``with_pieces``."""
    content = body.get("content", "")
    add_special = _get_bool(body, "add_special", False)
    with_pieces = _get_bool(body, "with_pieces", False)
    if not isinstance(content, str):
        raise _type_error("string", content)
    return content, add_special, with_pieces


def detokenize_tokens(body: dict[str, Any]) -> list[int]:
    """``/detokenize``: the token list."""
    tokens = body.get("tokens", [])
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise _type_error("array of numbers", tokens)
    return tokens
