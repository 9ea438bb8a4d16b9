"""The llama-server endpoints paddler treats by name: one table, read by the proxy, the router and the simulator.

Each L{Endpoint} says whether a C{POST} to it runs in one of the server's
slots (the proxy then takes a slot for it, or waits in the buffer, instead
of sending it to any healthy upstream), which shape of prompt its body
carries (L{paddler.routing.prompt} reads it for prefix-aware routing), which
body field names the model (the pool picks an upstream serving it), and
which API's wire format it speaks (the simulator answers those it
implements).

The paths under C{/slots} (L{addresses_slots}) name one server's slots by
id: C{GET /slots}, C{/slots/{id}?action=save|restore|erase}. The proxy sends
them, and slot-taking requests that name an C{id_slot}, to one upstream (the
slot home), so that the ids a client reads are the ids it names.

Every other path is proxied as it is (method, target, headers, body; the
answer likewise), to any healthy upstream, without a slot: C{/health} of an
upstream, C{/props}, C{/metrics}, C{/v1/models}, C{/tokenize},
C{/detokenize}, C{/apply-template}, C{/v1/messages/count_tokens} (it only
tokenizes), C{/tools} and the MCP paths, C{/cors-proxy},
C{/v1/audio/transcriptions} (a multipart body, not JSON), C{OPTIONS} (CORS
preflights) and whatever a newer server adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

#: The prompt shapes L{paddler.routing.prompt} knows; C{"none"}: no prompt it reads.
PromptShape = Literal["completion", "chat", "infill", "none"]
#: The wire formats: llama-server's own, OpenAI's, Anthropic's.
Api = Literal["llama", "openai", "anthropic"]


@dataclass(frozen=True)
class Endpoint:
    """
    One llama-server endpoint.

    @ivar path: the request path, exactly (no trailing slash, no query).
    @ivar takes_slot: a C{POST} runs in one of the server's slots.
    @ivar prompt: the shape of the prompt in the body.
    @ivar model_field: the body field that names the model (router mode).
    @ivar api: the wire format of the body and the answer.
    """

    path: str
    takes_slot: bool
    prompt: PromptShape
    api: Api
    model_field: str = "model"


ENDPOINTS: MappingProxyType[str, Endpoint] = MappingProxyType(
    {
        e.path: e
        for e in (
            Endpoint("/completion", True, "completion", "llama"),
            Endpoint("/completions", True, "completion", "llama"),
            Endpoint("/v1/completions", True, "completion", "openai"),
            Endpoint("/chat/completions", True, "chat", "openai"),
            Endpoint("/v1/chat/completions", True, "chat", "openai"),
            Endpoint("/v1/messages", True, "chat", "anthropic"),
            Endpoint("/v1/responses", True, "none", "openai"),
            Endpoint("/responses", True, "none", "openai"),
            Endpoint("/infill", True, "infill", "llama"),
            Endpoint("/embedding", True, "none", "llama"),
            Endpoint("/embeddings", True, "none", "llama"),
            Endpoint("/v1/embeddings", True, "none", "openai"),
            Endpoint("/rerank", True, "none", "llama"),
            Endpoint("/reranking", True, "none", "llama"),
            Endpoint("/v1/rerank", True, "none", "openai"),
            Endpoint("/v1/reranking", True, "none", "openai"),
        )
    }
)

#: The paths whose C{POST} takes a slot, as bytes (the proxy compares C{request.path}).
SLOT_PATHS: frozenset[bytes] = frozenset(e.path.encode("ascii") for e in ENDPOINTS.values() if e.takes_slot)


#: The path whose subtree names one server's slots by id.
SLOTS_PATH = b"/slots"


def addresses_slots(path: bytes) -> bool:
    """Whether C{path} (no query) is C{/slots} or under it: it names one server's slots."""
    return path == SLOTS_PATH or path.startswith(SLOTS_PATH + b"/")


def endpoint_for(path: str | bytes) -> Endpoint | None:
    """The L{Endpoint} at C{path} exactly, or C{None}."""
    if isinstance(path, bytes):
        path = path.decode("latin-1")
    return ENDPOINTS.get(path)


def prompt_shape(path: str) -> PromptShape:
    """The prompt shape of the endpoint at C{path} (C{"none"} for any other path)."""
    endpoint = ENDPOINTS.get(path)
    return endpoint.prompt if endpoint is not None else "none"
