"""What llama.cpp will evaluate for a request, in a stable form, and how long it is.

L{prompt_info} turns a parsed JSON request body, its path and its headers
into a L{PromptInfo}: the text llama-server will put in front of the model
(encoded so that two requests share a prefix of it exactly when llama.cpp
would evaluate the same leading tokens, as far as text can tell), an
estimate of its length in tokens, and the conversation key.

The stable form, by prompt shape (each endpoint's shape is in
L{paddler.llamacpp.endpoints.ENDPOINTS}):

* ``/completion``, ``/completions``, ``/v1/completions``: ``prompt``. A
  string is itself; a token id ``t`` is ``U+E000 t U+E001`` (so token lists
  and mixed lists of strings and ids concatenate in order); a list of
  several prompts (llama-server runs one task each) joins their forms with
  ``U+E002``; a ``{"prompt_string": ..., "multimodal_data": [...]}`` object is
  its string followed by one media marker per item.
* ``/chat/completions``, ``/v1/chat/completions``, ``/v1/messages``:
  ``tools`` first (canonical JSON: chat templates render them into the
  system prompt, ahead of the messages), then Anthropic's ``system``, then
  every message in order as ``U+E010 role U+E011 content U+E012``; content
  parts in order (text as is, images and audio as a media marker), an
  assistant's ``tool_calls`` and a tool message's ``tool_call_id`` as
  canonical JSON.
* ``/infill``: each ``input_extra`` chunk (``filename`` and ``text``), then
  ``U+E030 input_prefix U+E031 input_suffix U+E032 prompt``, the order of
  llama.cpp's fill-in-the-middle prompt.

A media marker is ``U+E020`` + the first 16 hex digits of BLAKE2b over the
data's length, its first 64 KiB and its last 64 KiB (bounded work on
multi-megabyte base64 images) + ``U+E021``; it counts as
L{MEDIA_TOKENS} tokens. The private-use code points keep the structure
apart from user text (text that contains them only costs a wrong guess).

**Token estimate.** L{CHARS_PER_TOKEN} = 4 characters per token, the usual
figure for BPE/SPM vocabularies on English text (the simulator's tokenizer,
one token per word, gives about 5); token ids count one each. The estimate
covers the whole prompt, the hashed text only its first L{MAX_PROMPT_CHARS}
characters (64 Ki): prefixes longer than that are not told apart, and a
20 KB prompt costs tens of microseconds.

**Output length.** C{max_tokens}: the request's own bound on generated
tokens, if it gives one: ``n_predict`` (``/completion``, ``/infill``),
``max_tokens`` or ``max_completion_tokens`` (OpenAI), a positive integer up
to L{MAX_OUTPUT_TOKENS}; None otherwise (-1 and 0 mean "no bound" there).

**Conversation key.** The ``X-Session-ID`` header, else the OpenAI ``user``
field (strings only, at most 256 characters), as ``"session:..."`` or
``"user:..."``.

Nothing here raises on odd JSON: a shape it does not know gives
L{NO_PROMPT} (no prefix, zero tokens).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from paddler.llamacpp.endpoints import prompt_shape

#: Characters per token assumed by every estimate here.
CHARS_PER_TOKEN = 4
#: Characters of the stable form kept for prefix matching.
MAX_PROMPT_CHARS = 64 * 1024
#: Tokens one image or audio item is assumed to cost.
MEDIA_TOKENS = 256
#: Longest conversation key kept.
MAX_KEY_CHARS = 256
#: At most this many list items (tokens, messages, parts) are looked at.
MAX_ITEMS = 100_000
#: Largest output bound taken from a request.
MAX_OUTPUT_TOKENS = 1_000_000
#: Body fields that bound the output, in the order llama-server reads them.
OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "n_predict")

TOKEN_OPEN, TOKEN_CLOSE, PROMPT_SEPARATOR = "\ue000", "\ue001", "\ue002"
MESSAGE_OPEN, ROLE_END, MESSAGE_CLOSE = "\ue010", "\ue011", "\ue012"
MEDIA_OPEN, MEDIA_CLOSE = "\ue020", "\ue021"
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "\ue030", "\ue031", "\ue032"

_MEDIA_SAMPLE = 64 * 1024



@dataclass(frozen=True)
class PromptInfo:
    """A request's prompt as routing sees it.

    @ivar text: the stable form, at most L{MAX_PROMPT_CHARS} characters.
    @ivar tokens: the estimated prompt length in tokens (the whole prompt).
    @ivar conversation: the conversation key, or None.
    @ivar kind: C{"completion"}, C{"chat"}, C{"infill"} or C{"none"}.
    @ivar truncated: the stable form was cut at L{MAX_PROMPT_CHARS}.
    @ivar max_tokens: the request's bound on generated tokens, or None.
    """

    text: str
    tokens: int
    conversation: str | None
    kind: str
    truncated: bool = False
    max_tokens: int | None = None

    @property
    def has_prefix(self) -> bool:
        """Whether there is any text to match prefixes on."""
        return bool(self.text)


NO_PROMPT = PromptInfo("", 0, None, "none")


class _Builder:
    """Collects the stable form up to a character budget and counts tokens beyond it."""

    def __init__(self, max_chars: int) -> None:
        self.parts: list[str] = []
        self.chars = 0
        self.max_chars = max_chars
        self.text_chars = 0  # all text, kept or not
        self.extra_tokens = 0  # token ids and media
        self.truncated = False

    def add(self, text: str, counts: bool = True) -> None:
        if counts:
            self.text_chars += len(text)
        room = self.max_chars - self.chars
        if room <= 0:
            self.truncated = self.truncated or bool(text)
            return
        if len(text) > room:
            text = text[:room]
            self.truncated = True
        self.parts.append(text)
        self.chars += len(text)

    def token(self, token: int) -> None:
        self.extra_tokens += 1
        if self.chars < self.max_chars:
            self.add(TOKEN_OPEN + str(token) + TOKEN_CLOSE, counts=False)
        else:
            self.truncated = True

    def media(self, data: Any) -> None:
        self.extra_tokens += MEDIA_TOKENS
        self.add(MEDIA_OPEN + media_digest(data) + MEDIA_CLOSE, counts=False)

    def result(self, conversation: str | None, kind: str) -> PromptInfo:
        text = "".join(self.parts)
        tokens = -(-self.text_chars // CHARS_PER_TOKEN) + self.extra_tokens
        if not text and not tokens:
            return PromptInfo("", 0, conversation, "none")
        return PromptInfo(text, tokens, conversation, kind, self.truncated)


def media_digest(data: Any) -> str:
    """16 hex digits identifying an image or audio payload (bounded work on any size)."""
    if not isinstance(data, str):
        data = _canonical(data)
    raw = data.encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(digest_size=8)
    digest.update(len(raw).to_bytes(8, "little"))
    digest.update(raw[:_MEDIA_SAMPLE])
    if len(raw) > _MEDIA_SAMPLE:
        digest.update(raw[-_MEDIA_SAMPLE:])
    return digest.hexdigest()


def _canonical(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          default=str)
    except (TypeError, ValueError, RecursionError):
        return repr(type(value))


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _add_prompt(builder: _Builder, prompt: Any) -> bool:
    """One prompt (string, token list, mixed list, multimodal object); False if unknown."""
    if isinstance(prompt, str):
        builder.add(prompt)
        return True
    if isinstance(prompt, dict):
        text = prompt.get("prompt_string")
        if not isinstance(text, str):
            return False
        builder.add(text)
        media = prompt.get("multimodal_data")
        if isinstance(media, list):
            for item in media[:MAX_ITEMS]:
                builder.media(item)
        return True
    if isinstance(prompt, list):
        for item in prompt[:MAX_ITEMS]:
            if isinstance(item, str):
                builder.add(item)
            elif _is_token(item):
                builder.token(item)
            else:
                return False
        if len(prompt) > MAX_ITEMS:
            builder.extra_tokens += len(prompt) - MAX_ITEMS
            builder.truncated = True
        return True
    return False


def _completion(builder: _Builder, body: Mapping[str, Any]) -> bool:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(
        isinstance(item, (list, dict)) or (isinstance(item, str) and len(prompt) > 1)
        for item in prompt[:MAX_ITEMS]
    ):
        # Several prompts: llama-server runs one task each; their forms are joined.
        for index, item in enumerate(prompt[:MAX_ITEMS]):
            if index:
                builder.add(PROMPT_SEPARATOR, counts=False)
            if not _add_prompt(builder, item):
                return False
        return True
    return _add_prompt(builder, prompt)


def _content(builder: _Builder, content: Any) -> None:
    if isinstance(content, str):
        builder.add(content)
    elif isinstance(content, list):
        for part in content[:MAX_ITEMS]:
            if isinstance(part, str):
                builder.add(part)
            elif isinstance(part, dict):
                kind = part.get("type")
                text = part.get("text")
                if isinstance(text, str) and kind in (None, "text", "input_text"):
                    builder.add(text)
                elif kind in ("image_url", "input_image", "image", "input_audio", "audio"):
                    builder.media(part.get(kind) or part.get("source") or part)
                else:
                    builder.add(_canonical(part))
    elif content is not None:
        builder.add(_canonical(content))


def _chat(builder: _Builder, body: Mapping[str, Any]) -> bool:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    tools = body.get("tools")
    if tools:
        builder.add(_canonical(tools))
    system = body.get("system")  # Anthropic's /v1/messages
    if system is not None:
        builder.add(MESSAGE_OPEN + "system" + ROLE_END, counts=False)
        _content(builder, system)
        builder.add(MESSAGE_CLOSE, counts=False)
    for message in messages[:MAX_ITEMS]:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        builder.add(MESSAGE_OPEN + (role if isinstance(role, str) else "") + ROLE_END)
        _content(builder, message.get("content"))
        for key in ("reasoning_content", "tool_calls", "tool_call_id", "name"):
            value = message.get(key)
            if value:
                builder.add(value if isinstance(value, str) else _canonical(value))
        builder.add(MESSAGE_CLOSE, counts=False)
    return True


def _infill(builder: _Builder, body: Mapping[str, Any]) -> bool:
    extra = body.get("input_extra")
    if isinstance(extra, list):
        for chunk in extra[:MAX_ITEMS]:
            if isinstance(chunk, dict):
                for key in ("filename", "text"):
                    value = chunk.get(key)
                    if isinstance(value, str):
                        builder.add(value)
    found = False
    for marker, key in ((FIM_PREFIX, "input_prefix"), (FIM_SUFFIX, "input_suffix"),
                        (FIM_MIDDLE, "prompt")):
        builder.add(marker, counts=False)
        value = body.get(key)
        if isinstance(value, str):
            builder.add(value)
            found = True
    return found


def output_bound(body: Any) -> int | None:
    """The request's bound on generated tokens (see the module docstring), or None."""
    if not isinstance(body, Mapping):
        return None
    for key in OUTPUT_FIELDS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value if 0 < value <= MAX_OUTPUT_TOKENS else None
    return None


def conversation_key(body: Any, headers: Any = None) -> str | None:
    """``"session:<X-Session-ID>"``, else ``"user:<user>"``, else None."""
    session = _header(headers, "x-session-id")
    if session:
        return "session:" + session[:MAX_KEY_CHARS]
    if isinstance(body, Mapping):
        user = body.get("user")
        if isinstance(user, str) and user:
            return "user:" + user[:MAX_KEY_CHARS]
    return None


def _header(headers: Any, name: str) -> str | None:
    """A header value from a mapping (any case) or a twisted L{Headers}."""
    if headers is None:
        return None
    try:
        if hasattr(headers, "getRawHeaders"):
            values = headers.getRawHeaders(name)
            value: Any = values[0] if values else None
        else:
            value = None
            for key, candidate in headers.items():
                key_text = key.decode("latin-1") if isinstance(key, bytes) else str(key)
                if key_text.lower() == name:
                    value = candidate
                    break
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(value, str):
            return value.strip() or None
    except Exception:  # a header object of an unexpected kind: no key
        return None
    return None


def normalise_path(path: str | bytes) -> str:
    """The path without its query string or trailing slash."""
    if isinstance(path, bytes):
        path = path.decode("latin-1")
    path = path.split("?", 1)[0]
    return path.rstrip("/") or "/"


def prompt_info(
    body: Any, path: str | bytes, headers: Any = None, max_chars: int = MAX_PROMPT_CHARS
) -> PromptInfo:
    """The prompt of a request as routing sees it (see the module docstring).

    @param body: the parsed JSON body (any JSON value).
    @param path: the request path (a query string is ignored).
    @param headers: a mapping of header names to values (any case) or a
        twisted L{Headers}, for ``X-Session-ID``; may be None.
    @param max_chars: the budget of the stable form.
    """
    try:
        conversation = conversation_key(body, headers)
        if not isinstance(body, Mapping):
            return NO_PROMPT
        kind = prompt_shape(normalise_path(path))
        builder = _Builder(max_chars)
        if kind == "completion":
            ok = _completion(builder, body)
        elif kind == "chat":
            ok = _chat(builder, body)
        elif kind == "infill":
            ok = _infill(builder, body)
        else:
            return PromptInfo("", 0, conversation, "none")
        if not ok:
            return PromptInfo("", 0, conversation, "none")
        info = builder.result(conversation, kind)
        bound = output_bound(body)
        return replace(info, max_tokens=bound) if bound is not None else info
    except Exception:  # never let an odd body break routing: it just has no prefix
        return NO_PROMPT
