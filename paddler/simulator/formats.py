"""Response bodies: /completion, the OpenAI shapes, SSE chunks, /slots, /props, /models.

Field names, key order and values follow the new build of llama-server
(0c1e57098) as captured in the project's reference samples.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from paddler.simulator.engine import CompletionResult, GenerationRequest, Job, JobState, Slot
from paddler.simulator.tokenizer import BOS_TEXT, EOS_TEXT, N_VOCAB

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from paddler.simulator.engine import SimulatedServerEngine
    from paddler.simulator.router import SimulatedRouter

BUILD_INFO = "b1-paddler-simulator"

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
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


def _finish_reason(result: CompletionResult) -> str:
    return "length" if result.stop_type == "limit" else "stop"


def usage(result: CompletionResult) -> dict[str, Any]:
    """OpenAI ``usage``; ``cached_tokens`` is the prompt tokens reused from the cache."""
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


class Dialect:
    """How one endpoint formats results: /completion or an OpenAI endpoint.

    @param kind: C{"completion"}, C{"text_completion"} or C{"chat"}.
    @param engine: the server (for the model name and seeded completion ids).
    @param clock: for the ``created`` timestamp.
    @param body: the request body (``stream_options``, ``response_fields``, ``return_tokens``).
    """

    def __init__(
        self, kind: str, engine: SimulatedServerEngine, clock: IReactorTime, body: dict[str, Any]
    ) -> None:
        self.kind = kind
        self.model = engine.config.model
        self.created = int(clock.seconds())
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
            finish["usage"] = usage(result)
            finish["id"] = self.id
            finish["timings"] = result.timings.to_json()
            return [finish, "[DONE]"]
        events.append(finish)
        if self.include_usage:
            usage_event = self._oai({"choices": []}, chunk=True)
            usage_event["usage"] = usage(result)
            usage_event["timings"] = result.timings.to_json()
            events.append(usage_event)
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
        body["usage"] = usage(result)
        body["id"] = self.id
        body["timings"] = result.timings.to_json()
        return body


def slot_json(slot: Slot) -> dict[str, Any]:
    """One ``/slots`` entry.

    A slot that never ran a task is the minimal object; once it has, it shows
    its (last) task, ``n_prompt_tokens`` = the tokens its KV cache holds now
    (idle too), and while busy the task's prompt counters and progress.
    """
    entry: dict[str, Any] = {
        "id": slot.id, "n_ctx": slot.n_ctx, "speculative": False,
        "is_processing": slot.job is not None,
    }
    job = slot.job if slot.job is not None else slot.last_job
    if job is None:
        return entry
    busy = slot.job is not None
    entry.update({
        "id_task": job.id_task,
        "n_prompt_tokens": slot.n_tokens,
        "n_prompt_tokens_processed": job.n_prompt_processed if busy else 0,
        "n_prompt_tokens_cache": job.cache_n if busy else 0,
        "params": generation_settings(job.request, for_slot=True),
        "next_token": [{
            "has_next_token": busy and job.state in (JobState.PROMPT, JobState.GENERATING),
            "has_new_line": job.has_new_line if busy else False,
            "n_remain": job.n_remain if busy else -1,
            "n_decoded": job.n_decoded if busy else 0,
        }],
    })
    return entry


def props_json(engine: SimulatedServerEngine) -> dict[str, Any]:
    """The ``/props`` body."""
    config = engine.config
    default = GenerationRequest(prompt_tokens=[])
    return {
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
        "is_sleeping": engine.is_sleeping,
        "cors_proxy_enabled": False,
    }


def models_json(engine: SimulatedServerEngine, created: int) -> dict[str, Any]:
    """The ``/models`` and ``/v1/models`` body: Ollama's ``models`` and OpenAI's ``data``."""
    config = engine.config
    model = config.model
    return {
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
            "created": created, "owned_by": "llamacpp",
            "meta": {
                "vocab_type": 1, "n_vocab": N_VOCAB, "n_ctx": config.n_ctx,
                "n_ctx_train": config.n_ctx, "n_embd": 128, "n_params": 0, "size": 0,
                "ftype": "simulated",
            },
        }],
    }


def router_props_json(router: SimulatedRouter) -> dict[str, Any]:
    """The ``/props`` body of a router-mode server (no ``model``): no ``total_slots``."""
    return {
        "role": "router",
        "max_instances": router.config.models_max,
        "models_autoload": router.config.autoload,
        "model_alias": "llama-server",
        "model_path": "none",
        "default_generation_settings": {"params": None, "n_ctx": 0},
        "ui_settings": {},
        "build_info": BUILD_INFO,
        "cors_proxy_enabled": False,
    }
