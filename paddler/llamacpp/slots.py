"""Reading a llama.cpp server's slots, shared by the balancer's probes and the agent.

- ``GET /slots`` (``is_processing`` in new servers, ``state`` 0/1 in old ones);
  a server answering 501 (``--no-slots``) or 404 falls back to
- ``GET /props`` for ``total_slots``; how many are busy is then not known
  (every busy slot is taken to be one of the balancer's requests).
  ``/metrics`` is never read: llama-server resets its "since last scrape"
  figures at every scrape, so a probe's scrape would empty its owner's;
- in ``health`` mode, ``GET /health`` plus ``GET /props``: neither wakes a
  server started with ``--sleep-idle-seconds``.

A server started with ``--api-key`` answers 401 to everything but
``/health`` without the key: the probe then fails with L{NeedsKey}, which
says which setting gives it the key (a client's key is never borrowed).
"""

from __future__ import annotations

import json
from urllib.parse import quote
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from paddler.llamacpp.errors import LOADING_MESSAGE, Loading, NeedsKey, ProbeError, error_message
from paddler.upstream.body import read_body
from paddler.server.instance import ThisBalancer, answered_by

#: How the slots can be read (``--probe-mode``).
PROBE_MODES = ("slots", "health")


def count_processing(slots: list[Any]) -> int:
    """Busy slots in a C{/slots} answer: ``is_processing`` (new) or ``state`` 0/1 (old)."""
    busy = 0
    for slot in slots:
        if not isinstance(slot, dict):
            raise ProbeError("/slots entries must be objects")
        if "is_processing" in slot:
            busy += bool(slot["is_processing"])
        elif "state" in slot:
            busy += slot["state"] != 0
        else:
            raise ProbeError("/slots entry has neither is_processing nor state")
    return busy


#: C{get(path)} -> C{(status, body)}; raises L{Loading} on 503 "Loading model".
Getter = Callable[[str], Awaitable[tuple[int, bytes]]]


def http_getter(
    http_client: Any, base_url: str, api_key: str | None = None, own_instance: str | None = None
) -> Getter:
    """
    A L{Getter} for the llama.cpp server at C{base_url} (C{http_client} is a
    treq C{HTTPClient}). An answer that carries C{own_instance} as its
    C{X-Paddler-Instance} came from the balancer itself: L{ThisBalancer}.
    """
    headers = {b"authorization": [b"Bearer " + api_key.encode("utf-8")]} if api_key else {}

    async def get(path: str) -> tuple[int, bytes]:
        response = await http_client.get(base_url + path, headers=headers)
        body = await read_body(response)
        if own_instance is not None and answered_by(response.headers) == own_instance:
            raise ThisBalancer()
        if response.code == 503 and error_message(body) == LOADING_MESSAGE:
            raise Loading()
        return response.code, body

    return get


def client_getter(
    client: Any, base_url: str, api_key: str | None = None, own_instance: str | None = None
) -> Getter:
    """
    A L{Getter} over a L{paddler.upstream.client.UpstreamClient}
    (kept-alive connections); an answer carrying C{own_instance} as its
    C{X-Paddler-Instance} came from the balancer itself: L{ThisBalancer}.
    """
    origin = base_url.encode("ascii")
    authority = origin.partition(b"://")[2]
    headers = [(b"Host", authority)]
    if api_key:
        headers.append((b"Authorization", b"Bearer " + api_key.encode("utf-8")))

    async def get(path: str) -> tuple[int, bytes]:
        instance: list[bytes] = []
        code, body = await client.fetch(origin, path.encode("ascii"), headers, seen=instance)
        if own_instance is not None and instance and instance[0].decode("latin-1").strip() == own_instance:
            raise ThisBalancer()
        if code == 503 and error_message(body) == LOADING_MESSAGE:
            raise Loading()
        return code, body

    return get


class SlotsCache:
    """The last C{/slots} answer of one server and what it said, so that an unchanged answer is not parsed again."""

    __slots__ = ("body", "total", "busy", "slots")

    def __init__(self) -> None:
        self.body: bytes | None = None
        self.total = 0
        self.busy = 0
        self.slots: list[Any] = []


@dataclass
class SlotReading:
    """One look at a server's slots.

    C{processing} is C{None} when the server does not say; C{models} is
    C{None} when they were not read this time; C{method} is how the slots
    were read (``slots`` or, after a 404/501 on C{/slots}, ``props``);
    C{mark} is what C{mark()} returned just before the request whose answer
    gave C{processing} was sent.
    """

    total: int
    processing: int | None
    method: str
    models: tuple[str, ...] | None = None
    raw_slots: list[Any] | None = None
    mark: int = 0
    #: False when the answer was byte for byte the last one (see L{SlotsCache})
    changed: bool = True


def _require_ok(path: str, code: int, body: bytes) -> None:
    if code == 401:
        raise NeedsKey(
            f"{path} answered 401 ({error_message(body)}): the server wants an API key; give it to "
            "the balancer with --llamacpp-api-key or the upstream's api_key"
        )
    if code != 200:
        raise ProbeError(f"{path} answered {code}: {error_message(body)}")


class RouterMode(Exception):
    """The server runs in router mode (``/props`` says ``role: router``): read it with L{read_router}."""

    def __init__(self, message: str = "the server runs in router mode (several models): it is read "
                 "with /models and /slots?model=") -> None:
        super().__init__(message)


class NotRouterMode(Exception):
    """A server read as a router no longer is one (restarted with ``-m``): read it with L{read_slots}."""


#: What a router-mode llama-server answers to ``/slots`` without ``?model=``.
MODEL_MISSING_MESSAGE = "model name is missing from the request"

#: The model states a router reports (``status.value``), plus ``failed``.
MODEL_STATES = ("unloaded", "loading", "loaded", "sleeping", "failed")


@dataclass
class ModelReading:
    """One model of a router-mode server, as ``/models`` (and its ``/slots``) showed it.

    C{state} is ``status.value``, or ``failed`` for a load that failed
    (``unloaded`` with ``failed``/``exit_code``); C{total}, C{processing} and
    C{raw_slots} come from ``/slots?model=ID&autoload=false`` and are read for
    loaded models only.
    """

    id: str
    aliases: tuple[str, ...] = ()
    state: str = "unloaded"
    exit_code: int = 0
    total: int = 0
    #: None when not read (``--probe-mode health``: ``/props?model=`` gives the slots only).
    processing: int | None = 0
    raw_slots: list[Any] | None = None
    #: The child upstream's probe mark taken just before its /slots was asked.
    mark: int = 0


@dataclass
class RouterReading:
    """One look at a router-mode server: its limits and every model's state and slots."""

    max_instances: int
    autoload: bool
    models: list[ModelReading]
    mark: int = 0


def _is_router(props: Any) -> bool:
    return isinstance(props, dict) and props.get("role") == "router"


async def _props(get: Getter) -> Any:
    """C{/props}, parsed; raises L{ProbeError} (or L{Loading}) for any other answer."""
    code, body = await get("/props")
    _require_ok("/props", code, body)
    try:
        return json.loads(body)
    except ValueError:
        raise ProbeError("/props answered invalid JSON")


async def _read_props(get: Getter) -> tuple[int, tuple[str, ...]]:
    props = await _props(get)
    if _is_router(props):
        raise RouterMode()
    try:
        total = int(props["total_slots"])
    except (ValueError, KeyError, TypeError):
        raise ProbeError("/props has no total_slots")
    models = (str(props.get("model_alias") or ""), str(props.get("model_path") or ""))
    return total, models


async def _read_models(get: Getter) -> tuple[str, ...] | None:
    """The model names from C{/props}, else C{/v1/models}; never fatal."""
    try:
        _, models = await _read_props(get)
        return models
    except (ProbeError, Loading):
        pass
    code, body = await get("/v1/models")
    if code != 200:
        return None
    try:
        data = json.loads(body)["data"]
        names: list[str] = []
        for entry in data:
            names.append(str(entry["id"]))
            names.extend(str(alias) for alias in entry.get("aliases", []))
    except (ValueError, KeyError, TypeError):
        return None
    return tuple(names)


async def read_slots(
    get: Getter,
    method: str = "slots",
    mode: str = "slots",
    want_models: bool = True,
    mark: Callable[[], int] = lambda: 0,
    cache: SlotsCache | None = None,
) -> SlotReading:
    """
    Read the slots of the server behind C{get}: C{/slots}, falling back to
    C{/props} on 404/501 (or directly when C{method} is ``props``); in
    C{mode} ``health``, C{/health} + C{/props}. Raises L{Loading},
    L{NeedsKey} (a 401) or L{ProbeError}. With a C{cache}, a C{/slots} answer equal
    to the last one is not parsed again (C{changed} is then C{False}).
    """
    if mode == "health":
        taken = mark()
        code, body = await get("/health")
        _require_ok("/health", code, body)
        total, models = await _read_props(get)
        return SlotReading(total, None, "health", models, mark=taken)
    if method != "props":
        taken = mark()
        code, body = await get("/slots")
        if code == 400 and error_message(body) == MODEL_MISSING_MESSAGE:
            raise RouterMode()
        if code not in (404, 501):
            _require_ok("/slots", code, body)
            names = await _read_models(get) if want_models else None
            if cache is not None and body == cache.body:
                return SlotReading(cache.total, cache.busy, "slots", names, cache.slots, taken, changed=False)
            try:
                slots = json.loads(body)
            except ValueError:
                raise ProbeError("/slots answered invalid JSON")
            if not isinstance(slots, list):
                raise ProbeError("/slots answer is not a list")
            busy = count_processing(slots)
            if cache is not None:
                cache.body, cache.total, cache.busy, cache.slots = body, len(slots), busy, slots
            return SlotReading(len(slots), busy, "slots", names, slots, taken)
    taken = mark()
    total, models = await _read_props(get)
    return SlotReading(total, None, "props", models, mark=taken)


#: Models one router may list (each becomes an upstream of the fleet): a bound against a hostile server.
MAX_ROUTER_MODELS = 256
#: The longest model id (or alias) taken from a router.
MAX_MODEL_NAME = 512


def _model_name(value: Any) -> bool:
    return (
        isinstance(value, str) and 0 < len(value) <= MAX_MODEL_NAME
        and not any(ord(c) < 32 or ord(c) == 127 for c in value)
    )


def _model_entry(entry: Any) -> ModelReading:
    if not isinstance(entry, dict) or not _model_name(entry.get("id")):
        raise ProbeError(
            f"/models entries must be objects with an id of 1 to {MAX_MODEL_NAME} printable characters"
        )
    status = entry.get("status")
    value = status.get("value") if isinstance(status, dict) else None
    if value not in MODEL_STATES:
        raise ProbeError(f"/models: model {entry['id']!r} has no known status.value")
    exit_code = 0
    if isinstance(status, dict) and status.get("failed"):
        value = "failed"
        try:
            exit_code = int(status.get("exit_code", 1))
        except (TypeError, ValueError):
            exit_code = 1
    aliases = entry.get("aliases")
    names = tuple(a for a in aliases if _model_name(a))[:16] if isinstance(aliases, list) else ()
    return ModelReading(entry["id"], names, str(value), exit_code)


async def read_router(
    get: Getter, mark: Callable[[], int] = lambda: 0, model_mark: Callable[[str], int] = lambda _: 0,
    slots: bool = True,
) -> RouterReading:
    """
    Read a router-mode server: C{/props} (C{max_instances}, C{models_autoload}),
    C{/models} (every model's state), and C{/slots?model=ID&autoload=false} for
    each loaded model (C{autoload=false}: a probe must never load or evict a
    model). C{model_mark(id)} is taken just before a model's C{/slots} is
    asked (the child upstream's L{probe_mark}). A loaded model whose C{/slots} fails (it was just unloaded) is
    reported C{unloaded}. Raises L{ProbeError} or L{Loading}.

    Without C{slots} (``--probe-mode health``) a loaded model's
    C{/props?model=ID} is read instead: its C{total_slots}, and C{processing}
    None. llama.cpp counts a ``/slots`` read as a task (it restarts the
    model's ``--sleep-idle-seconds`` timer, and wakes a sleeping model),
    ``/props`` not: so models can sleep behind the balancer, at the price of
    not seeing other clients' requests. A sleeping model is asked nothing.
    """
    props = await _props(get)
    if not _is_router(props):
        raise NotRouterMode()
    try:
        max_instances = int(props.get("max_instances", 0))
    except (TypeError, ValueError):
        max_instances = 0
    autoload = props.get("models_autoload", True) is not False
    code, body = await get("/models")
    _require_ok("/models", code, body)
    try:
        data = json.loads(body)["data"]
    except (ValueError, KeyError, TypeError):
        raise ProbeError("/models has no data list")
    if not isinstance(data, list):
        raise ProbeError("/models has no data list")
    if len(data) > MAX_ROUTER_MODELS:
        raise ProbeError(f"/models lists {len(data)} models, more than {MAX_ROUTER_MODELS}")
    models = [_model_entry(entry) for entry in data]
    if len({m.id for m in models}) != len(models):
        raise ProbeError("/models lists a model id twice")
    taken = mark()
    for model in models:
        if model.state != "loaded":
            continue
        model.mark = model_mark(model.id)
        if not slots:
            await _read_model_props(get, model)
            continue
        code, body = await get("/slots?model=" + quote(model.id, safe="") + "&autoload=false")
        if code != 200:
            model.state = "unloaded"  # unloaded between the two answers: the next probe will say
            continue
        try:
            slots = json.loads(body)
        except ValueError:
            raise ProbeError(f"/slots?model={model.id} answered invalid JSON")
        if not isinstance(slots, list):
            raise ProbeError(f"/slots?model={model.id} answer is not a list")
        model.total, model.processing, model.raw_slots = len(slots), count_processing(slots), slots
    return RouterReading(max_instances, autoload, models, taken)


async def _read_model_props(get: Getter, model: ModelReading) -> None:
    """C{model}'s slot count from C{/props?model=ID} (no task for llama.cpp: nothing wakes)."""
    code, body = await get("/props?model=" + quote(model.id, safe="") + "&autoload=false")
    if code != 200:
        model.state = "unloaded"  # unloaded between the two answers: the next probe will say
        return
    try:
        total = int(json.loads(body)["total_slots"])
    except (ValueError, KeyError, TypeError):
        raise ProbeError(f"/props?model={model.id} has no total_slots")
    if not 0 <= total <= 4096:  # the largest count paddler accepts anywhere (the shared store's too)
        raise ProbeError(f"/props?model={model.id} says {total} slots")
    model.total, model.processing, model.raw_slots = total, None, None
