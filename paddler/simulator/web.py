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

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from paddler.llamacpp.endpoints import ENDPOINTS
from paddler.simulator.engine import (
    CompletionResult,
    GenerationRequest,
    Job,
    SimulatedServerEngine,
    SimulatorError,
)
from paddler.simulator.formats import (
    INTERNAL_ERROR_BODY,
    LOADING_BODY,
    METRICS_DISABLED_BODY,
    NO_SLOT_BODY,
    NOT_FOUND_BODY,
    SLOTS_DISABLED_BODY,
    UNAUTHORIZED_BODY,
    Dialect,
    dumps,
    models_json,
    props_json,
    router_props_json,
    slot_json,
)
from paddler.simulator.metrics import render_metrics
from paddler.simulator.router import ModelState, SimulatedModel, SimulatedRouter
from paddler.simulator.tokenizer import BOS_TEXT, piece_text, split_pieces, tokenize
from paddler.simulator.validation import (
    InvalidRequest,
    chat_request,
    completion_request,
    detokenize_tokens,
    parse_body,
    tokenize_options,
)

PUBLIC_PATHS = frozenset({"/health", "/v1/health"})


@implementer(IPushProducer)
class _Exchange:
    """One generation request in flight: relays the job to the HTTP request.

    Registered as the request's push producer when streaming: the channel's
    pause/resume reach the engine job, and the client's disconnect cancels it
    (only when streaming, as in llama-server).
    """

    log = Logger()

    def __init__(self, request: Request, dialect: Dialect, stream: bool) -> None:
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
        # the slot-taking endpoints of the one table whose shape and format the simulator speaks
        speaks: dict[tuple[str, str], Handler] = {
            ("completion", "llama"): self._completion,
            ("completion", "openai"): self._oai_completion,
            ("chat", "openai"): self._chat,
        }
        for endpoint in ENDPOINTS.values():
            handler = speaks.get((endpoint.prompt, endpoint.api))
            if endpoint.takes_slot and handler is not None:
                self._routes[(b"POST", endpoint.path)] = handler

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
        return _answered(self, request, path, handler, "simulator")

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
        return parse_body(raw)

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
        return self._json(request, 200, [slot_json(slot) for slot in engine.slots])

    def _props(self, request: Request) -> bytes:
        return self._json(request, 200, props_json(self.engine))

    def _models(self, request: Request) -> bytes:
        return self._json(request, 200, models_json(self.engine, int(self.clock.seconds())))

    def _metrics(self, request: Request) -> bytes:
        engine = self.engine
        if not engine.config.metrics_endpoint:
            return self._json(request, 501, METRICS_DISABLED_BODY)
        request.setHeader(b"content-type", b"text/plain; version=0.0.4")
        return render_metrics(engine).encode("utf-8")

    def _tokenize(self, request: Request) -> bytes:
        content, add_special, with_pieces = tokenize_options(self._body(request))
        tokens = tokenize(content, add_bos=add_special)
        if with_pieces:
            texts = ([BOS_TEXT] if add_special else []) + split_pieces(content)
            out: list[Any] = [{"id": t, "piece": p} for t, p in zip(tokens, texts)]
        else:
            out = tokens
        return self._json(request, 200, {"tokens": out})

    def _detokenize(self, request: Request) -> bytes:
        tokens = detokenize_tokens(self._body(request))
        return self._json(request, 200, {"content": "".join(piece_text(t) for t in tokens)})

    # generation endpoints

    def _completion(self, request: Request) -> bytes | int:
        body = self._body(request)
        return self._generate(request, "completion", body, completion_request(body))

    def _oai_completion(self, request: Request) -> bytes | int:
        body = self._body(request)
        return self._generate(request, "text_completion", body, completion_request(body, openai=True))

    def _chat(self, request: Request) -> bytes | int:
        body = self._body(request)
        return self._generate(request, "chat", body, chat_request(body))

    def _generate(
        self, request: Request, kind: str, body: dict[str, Any], generation: GenerationRequest
    ) -> int:
        dialect = Dialect(kind, self.engine, self.clock, body)
        exchange = _Exchange(request, dialect, generation.stream)
        job = self.engine.submit(generation, on_token=exchange.on_token)
        exchange.start(job)
        return NOT_DONE_YET




#: The (prompt shape, API) pairs whose slot-taking endpoints the simulator answers.
_SPOKEN = frozenset({("completion", "llama"), ("completion", "openai"), ("chat", "openai")})
#: POST paths the router forwards to a model's child server by the body's model field
#: (the endpoints of the one table that a child answers, and the tokenizer's).
ROUTER_POST_PATHS = frozenset(
    {"/tokenize", "/detokenize"}
    | {e.path for e in ENDPOINTS.values() if e.takes_slot and (e.prompt, e.api) in _SPOKEN}
)
#: GET paths the router forwards by ``?model=`` (``/props`` too, when it names a model).
ROUTER_GET_PATHS = frozenset({"/slots", "/metrics", "/props"})


class RouterResource(Resource):
    """The HTTP API of one simulated router-mode llama-server.

    Requests that name a model are forwarded to that model's own
    L{SimulatorResource} once it is loaded; the router answers ``/health``,
    ``/props`` (without ``model``), ``/models``, ``/v1/models``,
    ``/models/load``, ``/models/unload`` and ``/models/sse`` itself, with
    llama.cpp's bodies and errors (``tools/server/server-models.cpp``).

    @param router: the models and their states.
    @param clock: the router's clock.
    @param api_key: like ``--api-key``: required everywhere but ``/health``.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, router: SimulatedRouter, clock: IReactorTime, api_key: str | None = None) -> None:
        super().__init__()
        self.router = router
        self.clock = clock
        self.api_key = api_key
        self._children: dict[str, tuple[SimulatedServerEngine, SimulatorResource]] = {}

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        request.setHeader(b"server", b"llama.cpp")
        request.setHeader(b"access-control-allow-origin", b"")
        path = request.path.decode("utf-8", "replace")
        if self.api_key is not None and path not in PUBLIC_PATHS and not self._authorized(request):
            return self._json(request, 401, UNAUTHORIZED_BODY)
        return _answered(self, request, path, lambda r: self._route(r, path), "simulated router")

    def _route(self, request: Request, path: str) -> bytes | int:
        method = request.method
        if method == b"GET":
            if path in PUBLIC_PATHS:
                return self._json(request, 200, {"status": "ok"})
            if path in ("/models", "/v1/models"):
                return self._json(request, 200, self.router.models_json(int(self.clock.seconds())))
            if path == "/models/sse":
                return self._sse(request)
            if path == "/props" and not self._arg(request, b"model"):
                return self._json(request, 200, router_props_json(self.router))
            if path in ROUTER_GET_PATHS:
                return self._forward(request, self._arg(request, b"model"), post=False)
        elif method == b"POST":
            if path in ("/models/load", "/models/unload"):
                return self._load_or_unload(request, path)
            if path in ROUTER_POST_PATHS:
                raw = request.content.read() if request.content is not None else b""
                try:
                    body = parse_body(raw)
                except InvalidRequest:
                    body = {}
                if request.content is not None:
                    request.content.seek(0)
                endpoint = ENDPOINTS.get(path)
                name = body.get(endpoint.model_field if endpoint is not None else "model")
                return self._forward(request, name if isinstance(name, str) else "", post=True)
        return self._json(request, 404, NOT_FOUND_BODY)

    # plumbing

    def _authorized(self, request: Request) -> bool:
        header = request.getHeader(b"authorization")
        if header is not None and header.decode("latin-1") == "Bearer " + str(self.api_key):
            return True
        x_api_key = request.getHeader(b"x-api-key")
        return x_api_key is not None and x_api_key.decode("latin-1") == self.api_key

    def _arg(self, request: Request, name: bytes) -> str:
        values = (request.args or {}).get(name) or [b""]
        return values[0].decode("utf-8", "replace")

    def _json(self, request: Request, code: int, body: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return dumps(body)

    def _error(self, request: Request, error: SimulatorError) -> bytes:
        return self._json(request, error.code, error.body())

    def _autoload(self, request: Request) -> bool:
        given = self._arg(request, b"autoload")
        if not given:
            return self.router.config.autoload
        return given in ("true", "1")

    # forwarding

    def _forward(self, request: Request, name: str, post: bool) -> bytes | int:
        """llama.cpp's ``router_validate_model``, then the model's child answers."""
        if not name:
            raise SimulatorError(400, "model name is missing from the request", "invalid_request_error")
        model = self.router.get(name)
        if model is None:
            raise SimulatorError(400, f"model '{name}' not found", "invalid_request_error")
        autoload = self._autoload(request)
        if not autoload and not model.running:
            raise SimulatorError(400, "model is not loaded", "invalid_request_error")
        if post:
            self.router.touch(model)
        if model.state is ModelState.SLEEPING and not _is_task(request):
            return self._child_render(request, model)  # answered from what it had; it sleeps on
        if model.state is ModelState.LOADED or (not autoload and model.state is not ModelState.SLEEPING):
            return self._child_render(request, model)
        waiting = self.router.ensure_ready(model)
        gone = request.notifyFinish()
        gone.addErrback(lambda _: waiting.cancel())
        waiting.addCallbacks(
            lambda ready: self._answer_later(request, ready, post),
            lambda failure: self._fail_later(request, failure),
        )
        return NOT_DONE_YET

    def _child_render(self, request: Request, model: SimulatedModel) -> bytes | int:
        engine = model.engine
        if engine is None:  # loading, and the request does not wait for it
            return self._json(request, 503, LOADING_BODY)
        known = self._children.get(model.name)
        if known is None or known[0] is not engine:
            known = (engine, SimulatorResource(engine, self.clock))
            self._children[model.name] = known
        if _is_task(request):
            self.router.task(model)
        return known[1].render(request)

    def _answer_later(self, request: Request, model: SimulatedModel, post: bool) -> None:
        if request._disconnected or request.finished:
            return
        if post:
            self.router.touch(model)
        try:
            result = self._child_render(request, model)
        except Exception:
            self.log.failure("simulated router failed to forward to {model}", model=model.name)
            result = self._json(request, 500, INTERNAL_ERROR_BODY)
        if result is not NOT_DONE_YET:
            assert isinstance(result, bytes)
            request.write(result)
            request.finish()

    def _fail_later(self, request: Request, failure: Failure) -> None:
        if failure.check(CancelledError) or request._disconnected or request.finished:
            return
        error = failure.value
        if isinstance(error, SimulatorError):
            payload = self._error(request, error)
        else:
            self.log.failure("simulated router failed while loading", failure)
            payload = self._json(request, 500, INTERNAL_ERROR_BODY)
        request.write(payload)
        request.finish()

    # router endpoints

    def _load_or_unload(self, request: Request, path: str) -> bytes:
        raw = request.content.read() if request.content is not None else b""
        body = parse_body(raw)
        name = body.get("model")
        model = self.router.get(name) if isinstance(name, str) else None
        if path == "/models/load":
            if model is None:
                # llama.cpp answers "model is not found", but its HTTP layer puts its own
                # 404 body in place of every 404's (seen on the real server)
                return self._json(request, 404, NOT_FOUND_BODY)
            self.router.load(model)
        else:
            if model is None:
                raise SimulatorError(400, "model is not found", "invalid_request_error")
            self.router.unload(model)
        return self._json(request, 200, {"success": True})

    def _sse(self, request: Request) -> int:
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")

        def listener(event: dict[str, Any] | None) -> None:
            if request.finished or request._disconnected:
                return
            if event is None:  # the server stops
                request.finish()
                return
            request.write(b"data: " + dumps(event) + b"\n\n")

        self.router.subscribe(listener)
        request.notifyFinish().addBoth(lambda _: self.router.unsubscribe(listener))
        request.write(b"")
        return NOT_DONE_YET


__all__ = ["RouterResource", "SimulatorResource"]


#: GET paths a child answers without it counting as a task (llama.cpp: they neither wake a
#: sleeping model nor restart its idle timer; ``/health`` and ``/models`` the router answers).
NOT_TASKS = frozenset({"/props", "/metrics"})


def _is_task(request: Request) -> bool:
    return request.method != b"GET" or request.path.decode("utf-8", "replace") not in NOT_TASKS


def _answered(resource: Any, request: Request, path: str, handler: Any, what: str) -> bytes | int:
    """C{handler(request)}, with llama.cpp's error shapes for what it raises (a 500 is logged)."""
    try:
        return handler(request)  # type: ignore[no-any-return]
    except InvalidRequest as e:
        return resource._error(request, SimulatorError(400, str(e), "invalid_request_error"))  # type: ignore[no-any-return]
    except SimulatorError as e:
        return resource._error(request, e)  # type: ignore[no-any-return]
    except Exception:
        resource.log.failure("{what} failed to answer {method} {path}", what=what,
                             method=request.method.decode("ascii", "replace"), path=path)
        return resource._json(request, 500, INTERNAL_ERROR_BODY)  # type: ignore[no-any-return]
