"""Router-mode contract tests: the same facts checked against ``paddler simulate --models``
and a real llama-server in router mode (``--models-dir``, ``--models-max``).

Every case runs twice, through the ``router`` fixture: once against a simulator
subprocess and once against the real server (marked ``llamacpp``; skipped when
it cannot be built here), whose models dir holds alpha, beta and gamma (copies
of the tiny model) and ``broken``, a file whose load fails.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.llamacpp.clients import Background, get, get_json, post, wait_for

MODELS = ("alpha", "beta", "gamma")
CHAT = [{"role": "user", "content": "Say hello."}]
#: Seconds a load may take (about 0.1-0.3 s on the tiny model, more on a busy machine).
LOAD_DEADLINE = 30.0


@dataclass
class Router:
    """One router under contract: its URL and what it is."""

    kind: str  # "simulator" or "llama-server"
    url: str


StartRouter = Callable[..., Router]


@pytest.fixture(
    params=["simulator", pytest.param("llama-server", marks=pytest.mark.llamacpp)]
)
def router(request: pytest.FixtureRequest) -> StartRouter:
    """Factory: ``router(models_max=2, autoload=True)`` starts the parametrised kind."""
    kind = request.param
    processes = request.getfixturevalue(
        "start_simulator" if kind == "simulator" else "start_llama_router"
    )

    def start(models_max: int = 2, autoload: bool = True, sleep_idle: int = 0) -> Router:
        sleeping = ["--sleep-idle-seconds", str(sleep_idle)] if sleep_idle else []
        if kind == "simulator":
            args = ["--models", ",".join((*MODELS, "broken")), "--models-max", str(models_max),
                    "--models-fail-load", "broken=1", *sleeping]
            if not autoload:
                args.append("--no-models-autoload")
            url = processes(slots=2, n_ctx=1024, tokens_per_second=200.0, extra_args=args)
        else:
            url = processes(
                models=MODELS, models_max=models_max, slots=2, ctx=2048, broken=("broken",),
                extra_args=([] if autoload else ["--no-models-autoload"]) + sleeping,
            )
        return Router(kind, url)

    return start


def statuses(url: str) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in get_json(url, "/models")["data"]}


def error_of(reply: Any) -> tuple[int, str, str]:
    body = reply.json()["error"]
    return reply.status, body["type"], body["message"]


def wait_status(url: str, name: str, wanted: str) -> None:
    wait_for(lambda: statuses(url)[name] == wanted, LOAD_DEADLINE, f"{name} {wanted}")


def load(url: str, name: str) -> None:
    reply = post(url, "/models/load", {"model": name})
    assert (reply.status, reply.json()) == (200, {"success": True}), reply
    wait_status(url, name, "loaded")


def chat(url: str, model: str | None, **extra: Any) -> Any:
    body: dict[str, Any] = {"messages": CHAT, "max_tokens": 2, **extra}
    if model is not None:
        body["model"] = model
    return post(url, "/v1/chat/completions", body)


def test_health_and_props_of_a_router_with_no_model_loaded(router: StartRouter) -> None:
    """/health 200 ok with nothing loaded; /props: role router, max_instances, models_autoload,
    no total_slots, dummy default_generation_settings."""
    r = router(models_max=2)
    reply = get(r.url, "/health")
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    props = get_json(r.url, "/props")
    assert props["role"] == "router"
    assert (props["max_instances"], props["models_autoload"]) == (2, True)
    assert "total_slots" not in props
    assert props["default_generation_settings"]["n_ctx"] == 0
    assert props["model_path"] == "none"


def test_props_says_autoload_off(router: StartRouter) -> None:
    """--no-models-autoload shows in /props."""
    assert get_json(router(autoload=False).url, "/props")["models_autoload"] is False


def test_models_lists_every_model_unloaded_in_openai_shape(router: StartRouter) -> None:
    """/models and /v1/models: {"data": [...], "object": "list"}, each entry with id,
    aliases, tags, object model, owned_by llamacpp, created and status.value unloaded."""
    r = router()
    for path in ("/models", "/v1/models"):
        body = get_json(r.url, path)
        assert body["object"] == "list"
        entries = {m["id"]: m for m in body["data"]}
        assert set(entries) == {*MODELS, "broken"}
        for entry in entries.values():
            assert {"id", "aliases", "tags", "object", "owned_by", "created", "status"} <= set(entry)
            assert (entry["object"], entry["owned_by"]) == ("model", "llamacpp")
            assert entry["status"]["value"] == "unloaded"
            assert isinstance(entry["aliases"], list)


def test_slots_needs_a_model_and_autoload_false_probes_load_nothing(router: StartRouter) -> None:
    """/slots: 400 "model name is missing"; ?model=alpha&autoload=false 400 "model is not
    loaded" (and alpha stays unloaded); an unknown model 400 "model 'nope' not found"."""
    r = router()
    assert error_of(get(r.url, "/slots")) == (
        400, "invalid_request_error", "model name is missing from the request")
    assert error_of(get(r.url, "/slots?model=alpha&autoload=false")) == (
        400, "invalid_request_error", "model is not loaded")
    assert error_of(get(r.url, "/slots?model=nope&autoload=false")) == (
        400, "invalid_request_error", "model 'nope' not found")
    assert set(statuses(r.url).values()) == {"unloaded"}


def test_a_loaded_models_slots_and_props(router: StartRouter) -> None:
    """Once alpha is loaded, /slots?model=alpha&autoload=false lists its 2 idle slots and
    /props?model=alpha is the child's /props with total_slots."""
    r = router()
    load(r.url, "alpha")
    reply = get(r.url, "/slots?model=alpha&autoload=false")
    assert reply.status == 200, reply
    slots = reply.json()
    assert [(s["id"], s["n_ctx"], s["is_processing"]) for s in slots] == [
        (0, 1024, False), (1, 1024, False)]
    props = get_json(r.url, "/props?model=alpha&autoload=false")
    assert props["total_slots"] == 2


def test_a_get_with_autoload_loads_the_model(router: StartRouter) -> None:
    """GET /slots?model=beta (autoload on) loads beta, then answers its slots."""
    r = router()
    reply = get(r.url, "/slots?model=beta", timeout=LOAD_DEADLINE)
    assert reply.status == 200, reply
    assert len(reply.json()) == 2
    assert statuses(r.url)["beta"] == "loaded"


def test_load_and_unload_answers_and_errors(router: StartRouter) -> None:
    """/models/load 200 then loaded, again 400 "already running", unknown 404 "File Not
    Found"; /models/unload 200 then unloaded, again 400 "model is not running", unknown 400."""
    r = router()
    load(r.url, "alpha")
    assert error_of(post(r.url, "/models/load", {"model": "alpha"})) == (
        400, "invalid_request_error", "model is already running")
    assert error_of(post(r.url, "/models/load", {"model": "nope"})) == (
        404, "not_found_error", "File Not Found")
    reply = post(r.url, "/models/unload", {"model": "alpha"})
    assert (reply.status, reply.json()) == (200, {"success": True})
    wait_status(r.url, "alpha", "unloaded")
    assert error_of(post(r.url, "/models/unload", {"model": "alpha"})) == (
        400, "invalid_request_error", "model is not running")
    assert error_of(post(r.url, "/models/unload", {"model": "nope"})) == (
        400, "invalid_request_error", "model is not found")


def test_chat_is_routed_by_model_and_model_errors(router: StartRouter) -> None:
    """A chat naming gamma (unloaded, autoload) loads it and answers 200; without a model
    400 "missing"; an unknown model 400 "model 'nope' not found"."""
    r = router()
    reply = chat(r.url, "gamma")
    assert reply.status == 200, reply
    assert reply.json()["object"] == "chat.completion"
    assert statuses(r.url)["gamma"] == "loaded"
    assert error_of(chat(r.url, None)) == (
        400, "invalid_request_error", "model name is missing from the request")
    assert error_of(chat(r.url, "nope")) == (400, "invalid_request_error", "model 'nope' not found")


def test_without_autoload_a_chat_for_an_unloaded_model_is_refused(router: StartRouter) -> None:
    """--no-models-autoload: a chat for unloaded alpha is 400 "model is not loaded"; after a
    load it is served."""
    r = router(autoload=False)
    assert error_of(chat(r.url, "alpha")) == (400, "invalid_request_error", "model is not loaded")
    load(r.url, "alpha")
    assert chat(r.url, "alpha").status == 200


def test_two_models_two_clients_each_at_once(router: StartRouter) -> None:
    """Two clients for alpha and two for beta at the same time: all four are answered."""
    r = router()
    load(r.url, "alpha")
    load(r.url, "beta")
    calls = [Background(lambda m=m: chat(r.url, m, max_tokens=8))
             for m in ("alpha", "beta", "alpha", "beta")]
    for call in calls:
        assert call.result(LOAD_DEADLINE).status == 200


def test_a_third_model_evicts_the_least_recently_used(router: StartRouter) -> None:
    """models_max 2: alpha then beta loaded (beta last used by a chat); a request for gamma
    unloads alpha and loads gamma."""
    r = router(models_max=2)
    load(r.url, "alpha")
    load(r.url, "beta")
    assert chat(r.url, "beta").status == 200
    assert chat(r.url, "gamma").status == 200
    assert statuses(r.url) == {"alpha": "unloaded", "beta": "loaded", "gamma": "loaded",
                               "broken": "unloaded"}


def test_a_failed_load_reports_failed_and_an_exit_code(router: StartRouter) -> None:
    """A load that fails: the waiting chat gets an error (not 200) and /models shows the model
    unloaded with failed true and a non-zero exit_code."""
    r = router()
    reply = chat(r.url, "broken")
    assert reply.status >= 400, reply
    [entry] = [m for m in get_json(r.url, "/models")["data"] if m["id"] == "broken"]
    status = entry["status"]
    assert status["value"] == "unloaded"
    assert status["failed"] is True and status["exit_code"] != 0


class _SSE:
    """A GET /models/sse read by a helper thread; ``events`` collects the JSON payloads."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=LOAD_DEADLINE)
        self.events: list[dict[str, Any]] = []
        self.status: int | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self.conn.request("GET", "/models/sse")
            response = self.conn.getresponse()
            self.status = response.status
            while True:
                line = response.fp.readline()
                if not line:
                    return
                if line.startswith(b"data: "):
                    self.events.append(json.loads(line[len(b"data: "):]))
        except (OSError, ValueError, http.client.HTTPException):
            return

    def close(self) -> None:
        if self.conn.sock is not None:
            try:
                self.conn.sock.shutdown(2)
            except OSError:
                pass
        self.conn.close()


def test_models_sse_streams_the_status_of_a_load_and_an_unload(router: StartRouter) -> None:
    """/models/sse: loading alpha gives a "model_status" event with status loading, then a
    "status_change" with status loaded; the unload a "status_change" unloaded with exit_code."""
    r = router()
    sse = _SSE(r.url)
    try:
        wait_for(lambda: sse.status == 200, 10, "the /models/sse answer head")
        load(r.url, "alpha")
        post(r.url, "/models/unload", {"model": "alpha"})
        wait_status(r.url, "alpha", "unloaded")
        wait_for(lambda: any(e["data"].get("status") == "unloaded" for e in sse.events),
                 LOAD_DEADLINE, "unloaded event")
        seen = [(e["model"], e["event"], e["data"]["status"]) for e in sse.events
                if e.get("model") == "alpha"]
        assert seen[0] == ("alpha", "model_status", "loading")
        assert ("alpha", "status_change", "loaded") in seen
        assert seen[-1] == ("alpha", "status_change", "unloaded")
        [unloaded] = [e for e in sse.events if e["data"]["status"] == "unloaded"]
        assert "exit_code" in unloaded["data"]
    finally:
        sse.close()


#: --sleep-idle-seconds of the sleeping cases, and how long a model may take to fall asleep.
SLEEP_IDLE = 2
SLEEP_DEADLINE = 30.0


def test_an_idle_model_sleeps_and_props_metrics_models_do_not_wake_it(router: StartRouter) -> None:
    """--sleep-idle-seconds 2: loaded alpha with no task goes ``sleeping`` in /models; then
    /props?model=alpha says is_sleeping true, and /props, /metrics and /models, asked for 3 s,
    leave it sleeping (they are no task); beta, loaded next, fits beside it (models_max 2)."""
    r = router(sleep_idle=SLEEP_IDLE)
    load(r.url, "alpha")
    wait_for(lambda: statuses(r.url)["alpha"] == "sleeping", SLEEP_DEADLINE, "alpha sleeping")
    props = get_json(r.url, "/props?model=alpha")
    assert props["is_sleeping"] is True
    for _ in range(6):
        assert get(r.url, "/props?model=alpha").status == 200
        assert get(r.url, "/metrics?model=alpha").status == 200
        assert statuses(r.url)["alpha"] == "sleeping"
        time.sleep(0.5)
    load(r.url, "beta")
    assert statuses(r.url)["alpha"] == "sleeping"


def test_a_chat_or_a_slots_read_wakes_a_sleeping_model(router: StartRouter) -> None:
    """A chat for sleeping alpha is answered by alpha (200) and alpha is ``loaded`` after it;
    asleep again, ``GET /slots?model=alpha&autoload=false`` wakes it too (it is a task): its
    slots come back and alpha is ``loaded``. /models never says ``loading`` for a wake-up."""
    r = router(sleep_idle=SLEEP_IDLE)
    load(r.url, "alpha")
    wait_for(lambda: statuses(r.url)["alpha"] == "sleeping", SLEEP_DEADLINE, "alpha sleeping")
    reply = chat(r.url, "alpha")
    assert reply.status == 200 and reply.json()["object"] == "chat.completion", reply
    assert statuses(r.url)["alpha"] == "loaded"
    wait_for(lambda: statuses(r.url)["alpha"] == "sleeping", SLEEP_DEADLINE, "alpha sleeping again")
    slots = get(r.url, "/slots?model=alpha&autoload=false")
    assert slots.status == 200 and len(slots.json()) == 2, slots
    assert statuses(r.url)["alpha"] == "loaded"


def test_every_models_sse_event_is_one_the_balancer_follows(router: StartRouter) -> None:
    """The events of a load, an unload and a failed load all have the shape the balancer's
    follower (L{paddler.fleet.router_events.parse_event}) takes: an object with string
    ``model`` and ``event``, ``data`` an object whose ``status`` (when given) is a string;
    and each status change is one of the events that make it read the router."""
    from paddler.fleet.router_events import _CHANGES, parse_event

    r = router()
    sse = _SSE(r.url)
    try:
        wait_for(lambda: sse.status == 200, 10, "the /models/sse answer head")
        load(r.url, "alpha")
        post(r.url, "/models/unload", {"model": "alpha"})
        wait_status(r.url, "alpha", "unloaded")
        chat(r.url, "broken")
        wait_for(lambda: any(e.get("model") == "broken" and e["data"].get("status") == "unloaded"
                             for e in sse.events), LOAD_DEADLINE, "the failed load's event")
        assert len(sse.events) >= 5, sse.events
        for payload in list(sse.events):
            parsed = parse_event(b"data: " + json.dumps(payload).encode())
            assert parsed == payload
            if "status" in payload["data"]:
                assert payload["event"] in _CHANGES, payload
    finally:
        sse.close()
