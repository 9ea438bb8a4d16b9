"""llama-server's HTTP API on top of L{SimulatedServerEngine}.

Field names, status codes and error bodies follow the new build of
llama-server (0c1e57098) as captured in the project's reference samples.
Streams are written one SSE event per C{request.write}, as soon as each
token is generated; the engine's job is the push producer registered on
the request, so a paused transport pauses generation, and a streaming
client that goes away cancels the job and frees its slot at once. A client
of a whole (non-streaming) response that goes away does not: as in
llama-server, the job runs to its end and holds its slot meanwhile.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from paddler.simulator.engine import (
    BOS_TEXT,
    EOS_TEXT,
    N_VOCAB,
    CompletionResult,
    GenerationRequest,
    Job,
    JobState,
    SimulatedServerEngine,
    SimulatorError,
    piece_text,
    split_pieces,
    tokenize,
)

BUILD_INFO = "b1-paddler-simulator"

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MISSING_PROMPT_MESSAGE = "[json.exception.out_of_range.403] key 'prompt' not found"

PROMPT_TYPE_MESSAGE = (
    '"prompt" elements must be a string, a list of tokens, a JSON object containing '
    "a prompt string, or a list of mixed strings & tokens."
)

# llama-server puts "message" first in these bodies and "code" first in the
# others; clients must parse, but we keep the order anyway.
LOADING_BODY = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
NOT_FOUND_BODY = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
UNAUTHORIZED_BODY = {
    "error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}
}
NO_SLOT_BODY = {"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}}
SLOTS_DISABLED_BODY = {
    "error": {
        "code": 501,
        "message": "This server does not support slots endpoint. Start it with `--slots`",
        "type": "not_supported_error",
    }
}
METRICS_DISABLED_BODY = {
    "error": {
        "code": 501,
        "message": "This server does not support metrics endpoint. Start it with `--metrics`",
        "type": "not_supported_error",
    }
}
INTERNAL_ERROR_BODY = {"error": {"code": 500, "message": "Internal server error", "type": "server_error"}}

PUBLIC_PATHS = frozenset({"/health", "/v1/health"})

_FLOAT32_DEFAULTS: dict[str, Any] = {
    "seed": 4294967295,
    "temperature": 0.800000011920929,
    "dynatemp_range": 0.0,
    "dynatemp_exponent": 1.0,
    "top_k": 40,
    "top_p": 0.949999988079071,
    "min_p": 0.05000000074505806,
    "top_n_sigma": -1.0,
    "xtc_probability": 0.0,
    "xtc_threshold": 0.10000000149011612,
    "typical_p": 1.0,
    "repeat_last_n": 64,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "dry_multiplier": 0.0,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "dry_penalty_last_n": 64,
    "dry_sequence_breakers": ["\n", ":", '"', "*"],
    "mirostat": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.10000000149011612,
    "adaptive_target": -1.0,
    "adaptive_decay": 0.8999999761581421,
    "stop": [],
    "max_tokens": -1,
    "n_predict": -1,
    "n_keep": 0,
    "n_discard": 0,
    "ignore_eos": False,
    "stream": False,
    "logit_bias": [],
    "n_probs": 0,
    "min_keep": 0,
    "grammar": "",
    "grammar_lazy": False,
    "grammar_triggers": [],
    "preserved_tokens": [],
    "chat_format": "Content-only",
    "reasoning_format": "deepseek",
    "reasoning_in_content": False,
    "generation_prompt": "",
    "samplers": [
        "penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature",
    ],
    "speculative.types": "none",
    "timings_per_token": False,
    "post_sampling_probs": False,
    "backend_sampling": False,
    "lora": [],
}

# Keys that /slots and /props leave out of "params".
_NOT_IN_SLOT_PARAMS = frozenset(
    {"dry_sequence_breakers", "stop", "logit_bias", "grammar", "grammar_lazy",
     "grammar_triggers", "preserved_tokens"}
)

_NUMBER_SETTINGS = (
    "temperature", "dynatemp_range", "dynatemp_exponent", "top_k", "top_p", "min_p",
    "top_n_sigma", "xtc_probability", "xtc_threshold", "typical_p", "repeat_last_n",
    "repeat_penalty", "presence_penalty", "frequency_penalty", "dry_multiplier", "dry_base",
    "dry_allowed_length", "dry_penalty_last_n", "mirostat", "mirostat_tau", "mirostat_eta",
    "n_keep", "n_probs", "min_keep",
)


def dumps(obj: Any) -> bytes:
    """JSON as llama-server writes it: compact, UTF-8."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def generation_settings(request: GenerationRequest, *, for_slot: bool = False) -> dict[str, Any]:
    """The ``generation_settings`` (or, for /slots and /props, ``params``) object."""
    settings = dict(_FLOAT32_DEFAULTS)
    settings.update(request.settings)
    if request.seed is not None:
        settings["seed"] = request.seed
    settings["stop"] = list(request.stop)
    settings["max_tokens"] = request.n_predict
    settings["n_predict"] = request.n_predict
    settings["ignore_eos"] = request.ignore_eos
    settings["stream"] = request.stream
    if for_slot:
        return {k: v for k, v in settings.items() if k not in _NOT_IN_SLOT_PARAMS}
    return settings


class BadRequest(Exception):
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


def _type_error(expected: str, value: Any, key: str | None = None) -> BadRequest:
    """nlohmann::json's type error, prefixed with the field as llama-server does."""
    message = f"[json.exception.type_error.302] type must be {expected}, but is {_json_type(value)}"
    return BadRequest(message if key is None else f"Field '{key}': {message}")


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


def _prompt_tokens(prompt: Any) -> tuple[list[int], str]:
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
                    raise BadRequest(f"invalid token {token} in the prompt")
            return list(prompt), "".join(piece_text(token) for token in prompt)
        if all(isinstance(item, (str, int)) and not isinstance(item, bool) for item in prompt):
            if all(isinstance(item, str) for item in prompt):
                raise BadRequest("the simulator serves one prompt per request, not a list of prompts")
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
    raise BadRequest(PROMPT_TYPE_MESSAGE)


def render_chat(messages: Any) -> str:
    """Render chat messages with the simulated model's ChatML template."""
    if not isinstance(messages, list):
        raise BadRequest("Expected 'messages' to be an array")
    if not messages:
        raise BadRequest("'messages' must not be empty")
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("Missing 'role' in message")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise BadRequest("unsupported content[].type")
                text = part.get("text")
                if not isinstance(text, str):
                    raise BadRequest("Missing 'text' in content part")
                texts.append(text)
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise BadRequest("Invalid 'content' type")
        out.append("<|im_start|>" + message["role"] + "\n" + content + "<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def _finish_reason(result: CompletionResult) -> str:
    return "length" if result.stop_type == "limit" else "stop"


def _usage(result: CompletionResult) -> dict[str, Any]:
    return {
        "completion_tokens": result.tokens_predicted,
        "prompt_tokens": result.tokens_evaluated,
        "total_tokens": result.tokens_evaluated + result.tokens_predicted,
        "prompt_tokens_details": {"cached_tokens": result.timings.cache_n},
    }


def _pick_fields(body: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """llama-server's ``response_fields``: keep only these (``a/b`` paths)."""
    out: dict[str, Any] = {}
    for path in fields:
        node: Any = body
        for part in path.split("/"):
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                break
        else:
            out[path] = node
    return out


class _Dialect:
    """How one endpoint formats results: /completion or an OpenAI endpoint."""

    def __init__(self, resource: SimulatorResource, kind: str, body: dict[str, Any]) -> None:
        self.kind = kind  # "completion", "text_completion" or "chat"
        self.resource = resource
        engine = resource.engine
        self.model = engine.config.model
        self.created = int(resource.clock.seconds())
        self.id = "chatcmpl-" + engine.random_id() if kind != "completion" else ""
        options = body.get("stream_options") or {}
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        fields = body.get("response_fields")
        self.response_fields = fields if isinstance(fields, list) else None
        self.return_tokens = body.get("return_tokens") is True
        self.sent_role = False

    def _oai(self, obj: dict[str, Any], chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj_name = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj_name = "text_completion"
        if chunk:
            obj.update(
                {"created": self.created, "id": self.id, "model": self.model,
                 "system_fingerprint": BUILD_INFO, "object": obj_name}
            )
        else:
            obj.update(
                {"created": self.created, "model": self.model,
                 "system_fingerprint": BUILD_INFO, "object": obj_name}
            )
        return obj

    # streaming

    def token_events(self, job: Job, piece: str, token: int) -> list[dict[str, Any]]:
        if self.kind == "completion":
            return [
                {"index": 0, "content": piece, "tokens": [token], "stop": False, "id_slot": -1,
                 "tokens_predicted": job.n_decoded, "tokens_evaluated": job.n_prompt}
            ]
        if self.kind == "text_completion":
            event = self._oai(
                {"choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}]},
                chunk=False,  # llama-server's text_completion chunks put "id" last
            )
            event["id"] = self.id
            return [event]
        events = []
        if not self.sent_role:
            self.sent_role = True
            events.append(self.role_event())
        events.append(
            self._oai(
                {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": piece}}]},
                chunk=True,
            )
        )
        return events

    def role_event(self) -> dict[str, Any]:
        return self._oai(
            {"choices": [{"finish_reason": None, "index": 0,
                          "delta": {"role": "assistant", "content": None}}]},
            chunk=True,
        )

    def final_events(self, job: Job, result: CompletionResult) -> list[dict[str, Any] | str]:
        if self.kind == "completion":
            return [self.completion_body(job, result, streamed=True)]
        events: list[dict[str, Any] | str] = []
        if self.kind == "chat":
            if not self.sent_role:
                self.sent_role = True
                events.append(self.role_event())
            finish = self._oai(
                {"choices": [{"finish_reason": _finish_reason(result), "index": 0, "delta": {}}]},
                chunk=True,
            )
        else:
            # /v1/completions always ends with one chunk that carries the
            # finish_reason, usage and timings, include_usage or not.
            finish = self._oai(
                {"choices": [{"text": "", "index": 0, "logprobs": None,
                              "finish_reason": _finish_reason(result)}]},
                chunk=False,
            )
            finish["usage"] = _usage(result)
            finish["id"] = self.id
            finish["timings"] = result.timings.to_json()
            return [finish, "[DONE]"]
        events.append(finish)
        if self.include_usage:
            usage = self._oai({"choices": []}, chunk=True)
            usage["usage"] = _usage(result)
            usage["timings"] = result.timings.to_json()
            events.append(usage)
        else:
            finish["timings"] = result.timings.to_json()
        events.append("[DONE]")
        return events

    # whole responses

    def completion_body(self, job: Job, result: CompletionResult, streamed: bool) -> dict[str, Any]:
        body = {
            "index": 0,
            "content": "" if streamed else result.content,
            "tokens": list(result.tokens) if self.return_tokens and not streamed else [],
            "id_slot": result.id_slot,
            "stop": True,
            "model": self.model,
            "tokens_predicted": result.tokens_predicted,
            "tokens_evaluated": result.tokens_evaluated,
            "generation_settings": generation_settings(job.request),
            "prompt": job.request.prompt_text,
            "has_new_line": result.has_new_line,
            "truncated": result.truncated,
            "stop_type": result.stop_type,
            "stopping_word": result.stopping_word,
            "tokens_cached": result.tokens_cached,
            "timings": result.timings.to_json(),
        }
        if self.response_fields is not None and not streamed:
            return _pick_fields(body, [f for f in self.response_fields if isinstance(f, str)])
        return body

    def body(self, job: Job, result: CompletionResult) -> dict[str, Any]:
        if self.kind == "completion":
            return self.completion_body(job, result, streamed=False)
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "finish_reason": _finish_reason(result),
                "index": 0,
                "message": {"role": "assistant", "content": result.content},
            }
        else:
            choice = {"text": result.content, "index": 0, "logprobs": None,
                      "finish_reason": _finish_reason(result)}
        body = self._oai({"choices": [choice]}, chunk=False)
        body["usage"] = _usage(result)
        body["id"] = self.id
        body["timings"] = result.timings.to_json()
        return body


@implementer(IPushProducer)
class _Exchange:
    """One generation request in flight: relays the job to the HTTP request.

    Registered as the request's push producer when streaming: the channel's
    pause/resume reach the engine job, and the client's disconnect cancels it
    (only when streaming, as in llama-server).
    """

    log = Logger()

    def __init__(self, request: Request, dialect: _Dialect, stream: bool) -> None:
        self.request = request
        self.dialect = dialect
        self.stream = stream
        self.job: Job | None = None
        self.gone = False
        self.done = False
        self.events_written = 0

    def start(self, job: Job) -> None:
        self.job = job
        self.request.notifyFinish().addErrback(self._client_gone)
        if self.stream:
            self.request.setHeader(b"content-type", b"text/event-stream")
            self.request.setHeader(b"x-accel-buffering", b"no")
            self.request.registerProducer(self, True)
            self.request.write(b"")  # flush the headers now, as llama-server does
        job.whenDone().addCallbacks(self._finished, self._cancelled)

    def on_token(self, job: Job, piece: str, token: int) -> None:
        if self.stream and not self.gone:
            for event in self.dialect.token_events(job, piece, token):
                self._write_event(event)

    def _write_event(self, event: dict[str, Any] | str) -> None:
        payload = event.encode("utf-8") if isinstance(event, str) else dumps(event)
        self.request.write(b"data: " + payload + b"\n\n")
        self.events_written += 1

    def _finished(self, result: CompletionResult) -> None:
        self.done = True
        if self.gone:
            return
        assert self.job is not None
        if self.stream:
            for event in self.dialect.final_events(self.job, result):
                self._write_event(event)
            self.request.unregisterProducer()
        else:
            payload = dumps(self.dialect.body(self.job, result))
            self.request.setHeader(b"content-type", b"application/json; charset=utf-8")
            self.request.setHeader(b"content-length", str(len(payload)).encode("ascii"))
            self.request.write(payload)
        self.request.finish()

    def _cancelled(self, failure: Failure) -> None:
        failure.trap(CancelledError)
        self.done = True
        if self.gone:
            return
        # The server cancelled the job (it is stopping): drop the connection,
        # as a llama-server that goes away would.
        if self.stream:
            self.request.unregisterProducer()
        self.request.loseConnection()

    def _client_gone(self, reason: Failure) -> None:
        self.gone = True
        if not self.stream:
            # llama-server notices a closed connection only while it streams:
            # a whole-response request keeps its slot until it is done.
            return
        if self.job is not None and self.job.active:
            self.log.debug(
                "client went away: cancelling task {id_task}", id_task=self.job.id_task
            )
            self.job.cancel()

    # IPushProducer

    def pauseProducing(self) -> None:
        if self.job is not None:
            self.job.pauseProducing()

    def resumeProducing(self) -> None:
        if self.job is not None:
            self.job.resumeProducing()

    def stopProducing(self) -> None:
        self.gone = True
        if self.job is not None:
            self.job.cancel()


Handler = Callable[[Request], "bytes | int"]


class SimulatorResource(Resource):
    """The HTTP API of one simulated llama-server.

    @param engine: the engine holding slots and queue.
    @param clock: the clock for ``created`` timestamps (the engine's clock).
    """

    isLeaf = True
    log = Logger()

    def __init__(self, engine: SimulatedServerEngine, clock: IReactorTime) -> None:
        super().__init__()
        self.engine = engine
        self.clock = clock
        self._routes: dict[tuple[bytes, str], Handler] = {}
        for path in ("/health", "/v1/health"):
            self._routes[(b"GET", path)] = self._health
        self._routes[(b"GET", "/slots")] = self._slots
        self._routes[(b"GET", "/props")] = self._props
        for path in ("/models", "/v1/models"):
            self._routes[(b"GET", path)] = self._models
        self._routes[(b"GET", "/metrics")] = self._metrics
        self._routes[(b"POST", "/tokenize")] = self._tokenize
        self._routes[(b"POST", "/detokenize")] = self._detokenize
        for path in ("/completion", "/completions"):
            self._routes[(b"POST", path)] = self._completion
        self._routes[(b"POST", "/v1/completions")] = self._oai_completion
        for path in ("/chat/completions", "/v1/chat/completions"):
            self._routes[(b"POST", path)] = self._chat

    # plumbing

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        request.setHeader(b"server", b"llama.cpp")
        request.setHeader(b"access-control-allow-origin", b"")
        path = request.path.decode("utf-8", "replace")
        if self.engine.loading:
            return self._json(request, 503, LOADING_BODY)
        if self.engine.config.api_key is not None and path not in PUBLIC_PATHS:
            if not self._authorized(request):
                return self._json(request, 401, UNAUTHORIZED_BODY)
        handler = self._routes.get((request.method, path))
        if handler is None:
            return self._json(request, 404, NOT_FOUND_BODY)
        try:
            return handler(request)
        except BadRequest as e:
            return self._error(request, SimulatorError(400, str(e), "invalid_request_error"))
        except SimulatorError as e:
            return self._error(request, e)
        except Exception:
            self.log.failure("simulator failed to answer {method} {path}",
                             method=request.method.decode("ascii", "replace"), path=path)
            return self._json(request, 500, INTERNAL_ERROR_BODY)

    def _authorized(self, request: Request) -> bool:
        key = self.engine.config.api_key
        header = request.getHeader(b"authorization")
        if header is not None and header.decode("latin-1") == "Bearer " + str(key):
            return True
        x_api_key = request.getHeader(b"x-api-key")
        return x_api_key is not None and x_api_key.decode("latin-1") == key

    def _json(self, request: Request, code: int, body: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return dumps(body)

    def _error(self, request: Request, error: SimulatorError) -> bytes:
        return self._json(request, error.code, error.body())

    def _body(self, request: Request) -> dict[str, Any]:
        raw = request.content.read() if request.content is not None else b""
        try:
            body = json.loads(raw.decode("utf-8"))
        except json.JSONDecodeError as e:
            # llama-server lets nlohmann::json's parse_error escape: 500 server_error.
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
        if not isinstance(body, dict):
            raise BadRequest(
                f"[json.exception.type_error.304] cannot use at() with {_json_type(body)}"
            )
        return body

    # read-only endpoints

    def _health(self, request: Request) -> bytes:
        return self._json(request, 200, {"status": "ok"})

    def _slots(self, request: Request) -> bytes:
        engine = self.engine
        if not engine.config.slots_endpoint:
            return self._json(request, 501, SLOTS_DISABLED_BODY)
        fail = request.args.get(b"fail_on_no_slot", [b""])[0]
        if fail and engine.idle_slots == 0:
            return self._json(request, 503, NO_SLOT_BODY)
        slots = []
        for slot in engine.slots:
            entry: dict[str, Any] = {
                "id": slot.id, "n_ctx": slot.n_ctx, "speculative": False,
                "is_processing": slot.job is not None,
            }
            job = slot.job
            if job is not None:
                entry.update({
                    "id_task": job.id_task,
                    "n_prompt_tokens": job.n_prompt,
                    "n_prompt_tokens_processed": job.n_prompt_processed,
                    "n_prompt_tokens_cache": job.cache_n,
                    "params": generation_settings(job.request, for_slot=True),
                    "next_token": [{
                        "has_next_token": job.state in (JobState.PROMPT, JobState.GENERATING),
                        "has_new_line": job.has_new_line,
                        "n_remain": job.n_remain,
                        "n_decoded": job.n_decoded,
                    }],
                })
            slots.append(entry)
        return self._json(request, 200, slots)

    def _props(self, request: Request) -> bytes:
        config = self.engine.config
        default = GenerationRequest(prompt_tokens=[])
        return self._json(request, 200, {
            "default_generation_settings": {
                "params": generation_settings(default, for_slot=True),
                "n_ctx": config.n_ctx,
            },
            "total_slots": config.slots,
            "model_alias": config.model,
            "model_ftype": "simulated",
            "model_path": config.model,
            "modalities": {"vision": False, "video": False, "audio": False},
            "endpoint_slots": config.slots_endpoint,
            "endpoint_props": False,
            "endpoint_metrics": config.metrics_endpoint,
            "ui": False,
            "ui_settings": {},
            "chat_template": CHAT_TEMPLATE,
            "chat_template_caps": {
                "supports_object_arguments": False,
                "supports_parallel_tool_calls": False,
                "supports_preserve_reasoning": False,
                "supports_reasoning_effort": False,
                "supports_string_content": True,
                "supports_system_role": True,
                "supports_tool_calls": False,
                "supports_tools": False,
                "supports_typed_content": False,
            },
            "bos_token": BOS_TEXT,
            "eos_token": EOS_TEXT,
            "build_info": BUILD_INFO,
            "is_sleeping": False,
            "cors_proxy_enabled": False,
        })

    def _models(self, request: Request) -> bytes:
        config = self.engine.config
        model = config.model
        return self._json(request, 200, {
            "models": [{
                "name": model, "model": model, "modified_at": "", "size": "", "digest": "",
                "type": "model", "description": "", "tags": [""],
                "capabilities": ["completion"], "parameters": "",
                "details": {
                    "parent_model": "", "format": "gguf", "family": "", "families": [""],
                    "parameter_size": "", "quantization_level": "",
                },
            }],
            "object": "list",
            "data": [{
                "id": model, "aliases": [model], "tags": [], "object": "model",
                "created": int(self.clock.seconds()), "owned_by": "llamacpp",
                "meta": {
                    "vocab_type": 1, "n_vocab": N_VOCAB, "n_ctx": config.n_ctx,
                    "n_ctx_train": config.n_ctx, "n_embd": 128, "n_params": 0, "size": 0,
                    "ftype": "simulated",
                },
            }],
        })

    def _metrics(self, request: Request) -> bytes:
        engine = self.engine
        if not engine.config.metrics_endpoint:
            return self._json(request, 501, METRICS_DISABLED_BODY)
        request.setHeader(b"content-type", b"text/plain; version=0.0.4")
        return render_metrics(engine).encode("utf-8")

    def _tokenize(self, request: Request) -> bytes:
        body = self._body(request)
        content = body.get("content", "")
        add_special = _get_bool(body, "add_special", False)
        with_pieces = _get_bool(body, "with_pieces", False)
        if not isinstance(content, str):
            raise _type_error("string", content)
        pieces = split_pieces(content)
        tokens = tokenize(content, add_bos=add_special)
        if with_pieces:
            texts = ([BOS_TEXT] if add_special else []) + pieces
            out: list[Any] = [{"id": t, "piece": p} for t, p in zip(tokens, texts)]
        else:
            out = tokens
        return self._json(request, 200, {"tokens": out})

    def _detokenize(self, request: Request) -> bytes:
        body = self._body(request)
        tokens = body.get("tokens", [])
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise _type_error("array of numbers", tokens)
        return self._json(request, 200, {"content": "".join(piece_text(t) for t in tokens)})

    # generation endpoints

    def _common(self, body: dict[str, Any], tokens: list[int], text: str, n_predict: int) -> GenerationRequest:
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

    def _completion(self, request: Request) -> bytes | int:
        body = self._body(request)
        if "prompt" not in body:
            raise BadRequest(MISSING_PROMPT_MESSAGE)
        tokens, text = _prompt_tokens(body["prompt"])
        n_predict = _get_int(body, "n_predict", _get_int_lenient(body, "max_tokens", -1))
        return self._generate(request, _Dialect(self, "completion", body),
                              self._common(body, tokens, text, n_predict))

    def _oai_completion(self, request: Request) -> bytes | int:
        body = self._body(request)
        if "prompt" not in body:
            raise BadRequest(MISSING_PROMPT_MESSAGE)
        tokens, text = _prompt_tokens(body["prompt"])
        n_predict = _get_int(body, "max_tokens", _get_int(body, "n_predict", -1))
        return self._generate(request, _Dialect(self, "text_completion", body),
                              self._common(body, tokens, text, n_predict))

    def _chat(self, request: Request) -> bytes | int:
        body = self._body(request)
        if "messages" not in body:
            raise BadRequest("'messages' is required")
        text = render_chat(body["messages"])
        n_predict = _get_int(
            body, "max_completion_tokens",
            _get_int(body, "max_tokens", _get_int(body, "n_predict", -1)),
        )
        return self._generate(request, _Dialect(self, "chat", body),
                              self._common(body, tokenize(text), text, n_predict))

    def _generate(self, request: Request, dialect: _Dialect, generation: GenerationRequest) -> int:
        exchange = _Exchange(request, dialect, generation.stream)
        job = self.engine.submit(generation, on_token=exchange.on_token)
        exchange.start(job)
        return NOT_DONE_YET


def _metric_value(value: float) -> str:
    return f"{value:.6g}"


def render_metrics(engine: SimulatedServerEngine) -> str:
    """llama-server's Prometheus text for /metrics (the new build's names)."""
    m = engine.metrics
    prompt_rate = m.prompt_tokens_total / m.prompt_seconds_total if m.prompt_seconds_total else 0
    predicted_rate = (
        m.tokens_predicted_total / m.tokens_predicted_seconds_total
        if m.tokens_predicted_seconds_total else 0
    )
    busy = m.n_busy_slots_total / m.n_decode_total if m.n_decode_total else 0
    rows: list[tuple[str, str, str, float]] = [
        ("prompt_tokens_total", "counter",
         "Number of prompt tokens processed, excluding cached tokens", m.prompt_tokens_total),
        ("prompt_tokens_cached_total", "counter",
         "Number of prompt tokens reused from the cache", m.prompt_tokens_cached_total),
        ("prompt_seconds_total", "counter", "Total time spent processing prompts",
         m.prompt_seconds_total),
        ("tokens_predicted_total", "counter", "Number of generation tokens processed",
         m.tokens_predicted_total),
        ("tokens_predicted_seconds_total", "counter", "Total time spent generating tokens",
         m.tokens_predicted_seconds_total),
        ("n_decode_total", "counter",
         "Total number of llama_decode() calls, excluding speculative decoding and multimodal decoding",
         m.n_decode_total),
        ("n_tokens_max", "counter", "Largest observed sequence length (prompt + generation)",
         m.n_tokens_max),
        ("spec_decode_num_draft_tokens_total", "counter",
         "Speculative: Total draft tokens generated", 0),
        ("spec_decode_num_accepted_tokens_total", "counter",
         "Speculative: Total draft tokens accepted by the target model", 0),
        ("spec_decode_num_drafts_total", "counter",
         "Speculative: Total speculative decoding verification steps", 0),
        ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s", prompt_rate),
        ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s",
         predicted_rate),
        ("requests_processing", "gauge", "Number of requests processing",
         engine.requests_processing),
        ("requests_deferred", "gauge", "Number of requests deferred", engine.requests_deferred),
        ("n_busy_slots_per_decode", "gauge",
         "Average number of busy slots per llama_decode() call", busy),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines.append(f"# HELP llamacpp:{name} {help_text}")
        lines.append(f"# TYPE llamacpp:{name} {kind}")
        lines.append(f"llamacpp:{name} {_metric_value(value)}")
    return "\n".join(lines) + "\n"


__all__ = [
    "BUILD_INFO",
    "SimulatorResource",
    "dumps",
    "generation_settings",
    "render_chat",
    "render_metrics",
]
