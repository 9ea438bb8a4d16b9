"""llama-server's router mode, simulated: many models on one port, loaded on demand.

A real router (``llama-server --models-dir DIR --models-max N``) runs each
model in a child llama-server and forwards requests to it by the ``model``
field of a POST body or the ``?model=`` of a GET. Here each model that is
loaded gets its own L{SimulatedServerEngine} (its own slots and queue); the
router keeps the models' states and LRU order, as llama.cpp's
``server_models`` does (``tools/server/server-models.cpp``).

Model states (``status.value`` in ``/models``)::

    UNLOADED --load--> LOADING --load_seconds--> LOADED --unload / LRU eviction--> UNLOADED
                          \\                       |  ^
                           \\     sleep_idle_seconds |  | a task: woken in load_seconds
                            \\     without a task   v  |
                             \\                  SLEEPING --unload / LRU eviction--> UNLOADED
                              +--load fails (exit_code)--> UNLOADED, failed, exit_code

A request for an unloaded model (with autoload) joins the router's queue,
one entry per model however many requests wait for it (llama.cpp
coalesces them). The queue's head is loaded when fewer than
C{models_max} models run, or when the least recently used loaded model that
serves nothing and has nobody waiting for it can be evicted; otherwise it
waits until a running model goes idle. A waiting client that goes away
leaves the queue, so nothing is evicted for it. Only POST requests count as
a use for the LRU order, as in llama.cpp.

Sleeping (``--sleep-idle-seconds S``, llama.cpp's ``server_queue``): a loaded
model whose child got no I{task} for S seconds goes to sleep: it frees its
memory and KV cache (here: its engine, and so its prompt cache) but keeps its
place among the C{models_max} and can be evicted like a loaded one. Every
request the router forwards to the child is a task, ``GET /slots?model=``
included (even with ``autoload=false``), except ``/props`` and ``/metrics``,
which a sleeping child answers from what it had (``/props`` with
``is_sleeping: true``). A task for a sleeping model wakes it: the model
reloads (C{load_seconds}; ``/models`` says ``sleeping`` until it is
``loaded`` again, with no ``loading`` in between), then the task is answered.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from paddler.simulator.engine import SimulatedServerEngine, SimulatorConfig, SimulatorError

__all__ = ["ModelState", "RouterConfig", "SimulatedModel", "SimulatedRouter"]


@dataclass(frozen=True)
class RouterConfig:
    """The router-mode settings (``llama-server`` flags in router mode).

    @ivar models: the models the router lists (``--models-dir`` files).
    @ivar models_max: ``--models-max``: models loaded at once (0 = no limit).
    @ivar autoload: ``--models-autoload`` (off: ``--no-models-autoload``).
    @ivar load_seconds: how long a model takes to load.
    @ivar failing: models whose load fails, with the child's exit code.
    @ivar sleep_idle_seconds: ``--sleep-idle-seconds``: a loaded model with no
        task for this long sleeps (negative: never).
    """

    models: tuple[str, ...]
    models_max: int = 4
    autoload: bool = True
    load_seconds: float = 0.1
    failing: Mapping[str, int] = field(default_factory=dict)
    sleep_idle_seconds: float = -1.0


class ModelState(enum.Enum):
    """A model's ``status.value``."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    SLEEPING = "sleeping"


class SimulatedModel:
    """One model of the router: its state and, while loaded, its engine."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = ModelState.UNLOADED
        self.exit_code = 0
        self.engine: SimulatedServerEngine | None = None
        #: When a POST last went to it (or it was loaded): the LRU order.
        self.last_used = 0.0
        self.loads = 0
        #: Times it went to sleep, and woke up.
        self.sleeps = 0
        self.wakes = 0
        self._load_call: IDelayedCall | None = None
        self._sleep_call: IDelayedCall | None = None
        self._wake_call: IDelayedCall | None = None
        self._waiters: list[Deferred[SimulatedModel]] = []

    @property
    def running(self) -> bool:
        """Loading, loaded or sleeping: it takes one of the C{models_max} places."""
        return self.state is not ModelState.UNLOADED

    @property
    def ready_or_asleep(self) -> bool:
        """Loaded or sleeping: its child runs (llama.cpp's ``is_ready_or_sleep``)."""
        return self.state in (ModelState.LOADED, ModelState.SLEEPING)

    @property
    def failed(self) -> bool:
        """Its last load failed (unloaded with a non-zero exit code)."""
        return self.state is ModelState.UNLOADED and self.exit_code != 0

    @property
    def busy(self) -> bool:
        """Serving or queueing a request."""
        engine = self.engine
        return engine is not None and (engine.requests_processing + engine.requests_deferred) > 0

    def status_json(self) -> dict[str, Any]:
        """The ``status`` object of ``/models``."""
        status: dict[str, Any] = {"value": self.state.value, "args": ["llama-server", "--alias", self.name]}
        if self.failed:
            status["exit_code"] = self.exit_code
            status["failed"] = True
        return status


#: Called with each SSE event, and with None when the server stops.
Listener = Callable[[dict[str, Any] | None], None]


class SimulatedRouter:
    """The state of one simulated router-mode llama-server.

    @param clock: the clock every load and every child engine runs on.
    @param config: the router settings.
    @param child: the settings of each model's child server (slots, speed,
        context); its C{model} is replaced by the model's name.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, config: RouterConfig, child: SimulatorConfig) -> None:
        self.clock = clock
        self.config = config
        self.child = child
        self.models: dict[str, SimulatedModel] = {name: SimulatedModel(name) for name in config.models}
        #: Models waiting for a place to load in, oldest first, each at most once.
        self.queue: deque[SimulatedModel] = deque()
        self._listeners: list[Listener] = []
        self._stopping = False

    # lifecycle

    def start(self) -> None:
        self._stopping = False

    def stop(self) -> None:
        """Unload every model (cancelling their jobs and loads), answer every request waiting
        for a load 503, end the SSE streams; later requests are refused."""
        self._stopping = True
        for model in self.models.values():
            if model.running:
                self._unload(model)
        self.queue.clear()
        stopping = SimulatorError(503, "Server is shutting down", "unavailable_error")
        for model in self.models.values():
            self._fail_waiters(model, stopping)
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener(None)

    # lookups

    def get(self, name: str) -> SimulatedModel | None:
        """The model called C{name}, or None."""
        return self.models.get(name)

    @property
    def running(self) -> list[SimulatedModel]:
        return [m for m in self.models.values() if m.running]

    def touch(self, model: SimulatedModel) -> None:
        """A POST went to C{model}: it is the most recently used."""
        model.last_used = self.clock.seconds()

    # SSE

    def subscribe(self, listener: Listener) -> None:
        """Call C{listener(event)} with every ``/models/sse`` event from now on."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, event: str, model: SimulatedModel, data: dict[str, Any]) -> None:
        payload = {"model": model.name, "event": event, "data": data}
        for listener in list(self._listeners):
            listener(payload)

    # loading and unloading

    def ensure_ready(self, model: SimulatedModel) -> Deferred[SimulatedModel]:
        """A Deferred that fires with C{model} once it is loaded (loading it if need be).

        It fails with L{SimulatorError} when the load fails (500 "failed to
        load") or the model is unloaded while loading (400 "is not running").
        Cancelling it (the client went away) takes the model out of the queue
        when nobody else waits for it.
        """
        if self._stopping:
            return _failed(SimulatorError(503, "Server is shutting down", "unavailable_error"))
        if model.state is ModelState.LOADED:
            return succeed(model)

        def cancel(d: Deferred[SimulatedModel]) -> None:
            if d in model._waiters:
                model._waiters.remove(d)
            if not model._waiters and model in self.queue:
                self.queue.remove(model)
                self.log.debug("nobody waits for {model} any more: out of the load queue", model=model.name)
            self._tick()

        d: Deferred[SimulatedModel] = Deferred(cancel)
        model._waiters.append(d)
        if model.state is ModelState.SLEEPING:
            self._wake(model)
        elif model.state is ModelState.UNLOADED and model not in self.queue:
            self.queue.append(model)
            self._tick()
        return d

    # sleeping

    def task(self, model: SimulatedModel) -> None:
        """A task reached C{model}'s child (a request the router forwarded to it, but for
        ``/props`` and ``/metrics``): its idle timer starts again."""
        self._arm_sleep(model)

    def _arm_sleep(self, model: SimulatedModel) -> None:
        if model._sleep_call is not None and model._sleep_call.active():
            model._sleep_call.cancel()
        model._sleep_call = None
        idle = self.config.sleep_idle_seconds
        if idle < 0 or model.state is not ModelState.LOADED or self._stopping:
            return
        model._sleep_call = self.clock.callLater(idle, self._idle_out, model)

    def _idle_out(self, model: SimulatedModel) -> None:
        model._sleep_call = None
        if model.state is not ModelState.LOADED:
            return
        if model.busy or model._waiters:
            self._arm_sleep(model)  # work under way is no idleness (llama.cpp shifts the timer)
            return
        model.state = ModelState.SLEEPING
        model.sleeps += 1
        if model.engine is not None:
            model.engine.is_sleeping = True
        self.log.info("model {model} is sleeping (no task for {idle:g} s)",
                      model=model.name, idle=self.config.sleep_idle_seconds)
        self._notify("status_change", model, {"status": "sleeping"})

    def _wake(self, model: SimulatedModel) -> None:
        """Reload a sleeping model (C{load_seconds}); its waiters are answered once it is up."""
        if model._wake_call is not None:
            return  # waking already
        self.log.info("waking model {model}", model=model.name)
        model._wake_call = self.clock.callLater(self.config.load_seconds, self._woken, model)

    def _woken(self, model: SimulatedModel) -> None:
        model._wake_call = None
        if model.state is not ModelState.SLEEPING:
            return
        old = model.engine
        if old is not None:
            old.on_idle = None
            old.stop()
        model.engine = self._engine(model)  # the memory and the KV cache were freed
        model.state = ModelState.LOADED
        model.wakes += 1
        self.log.info("model {model} woke up", model=model.name)
        self._notify("status_change", model, {"status": "loaded"})  # no info on a wake-up
        self._arm_sleep(model)
        waiters, model._waiters = model._waiters, []
        for d in waiters:
            d.callback(model)

    def load(self, model: SimulatedModel) -> None:
        """``POST /models/load``: start loading C{model} now, evicting the LRU idle model if full.

        @raise SimulatorError: 400 already running; 500 "model limit reached"
            when every loaded model is busy.
        """
        if model.running:
            raise SimulatorError(400, "model is already running", "invalid_request_error")
        if not self._has_room() and not self._evict_one(exclude=model):
            raise SimulatorError(500, "model limit reached, try again later", "server_error")
        if model in self.queue:
            self.queue.remove(model)
        self._start_load(model)

    def unload(self, model: SimulatedModel) -> None:
        """``POST /models/unload``.

        @raise SimulatorError: 400 "model is not running".
        """
        if not model.running:
            raise SimulatorError(400, "model is not running", "invalid_request_error")
        self._unload(model)
        self._tick()

    def _has_room(self) -> bool:
        limit = self.config.models_max
        return limit <= 0 or len(self.running) < limit

    def _victim(self, exclude: SimulatedModel | None = None) -> SimulatedModel | None:
        """The least recently used loaded model that serves nothing and that nobody waits for."""
        candidates = [
            m for m in self.models.values()
            if m.ready_or_asleep and not m.busy and not m._waiters and m is not exclude
        ]
        return min(candidates, key=lambda m: m.last_used, default=None)

    def _evict_one(self, exclude: SimulatedModel | None = None) -> bool:
        victim = self._victim(exclude)
        if victim is None:
            return False
        self.log.info("models_max {models_max} reached: unloading {victim} (least recently used)",
                      models_max=self.config.models_max, victim=victim.name)
        self._unload(victim)
        return True

    def _tick(self) -> None:
        """Load the queue's head models while there is room (or a model to evict)."""
        while self.queue and not self._stopping:
            head = self.queue[0]
            if head.running:
                self.queue.popleft()
                continue
            if not self._has_room() and not self._evict_one(exclude=head):
                return
            self.queue.popleft()
            self._start_load(head)

    def _start_load(self, model: SimulatedModel) -> None:
        model.state = ModelState.LOADING
        model.exit_code = 0
        model.last_used = self.clock.seconds()
        model.loads += 1
        self.log.info("loading model {model}", model=model.name)
        self._notify("model_status", model, {"status": "loading"})
        model._load_call = self.clock.callLater(self.config.load_seconds, self._load_done, model)

    def _load_done(self, model: SimulatedModel) -> None:
        model._load_call = None
        exit_code = self.config.failing.get(model.name)
        if exit_code is not None:
            model.state = ModelState.UNLOADED
            model.exit_code = exit_code
            self.log.info("model {model} failed to load (exit code {exit_code})",
                          model=model.name, exit_code=exit_code)
            self._notify("status_change", model, {"status": "unloaded", "exit_code": exit_code})
            self._fail_waiters(model, SimulatorError(
                500, f"model name={model.name} failed to load", "server_error"))
            self._tick()
            return
        model.engine = self._engine(model)
        model.state = ModelState.LOADED
        self.log.info("model {model} loaded", model=model.name)
        self._notify("status_change", model, {"status": "loaded", "info": self.model_info(model)})
        self._arm_sleep(model)
        waiters, model._waiters = model._waiters, []
        for d in waiters:
            d.callback(model)
        self._tick()

    def _engine(self, model: SimulatedModel) -> SimulatedServerEngine:
        config = replace(self.child, model=model.name, load_seconds=0.0, api_key=None,
                         seed=self.child.seed + sorted(self.models).index(model.name))
        engine = SimulatedServerEngine(self.clock, config)
        engine.on_idle = self._tick
        engine.start()
        return engine

    def _unload(self, model: SimulatedModel) -> None:
        was_loading = model.state is ModelState.LOADING or model._wake_call is not None
        for call in (model._load_call, model._sleep_call, model._wake_call):
            if call is not None and call.active():
                call.cancel()
        model._load_call = model._sleep_call = model._wake_call = None
        engine, model.engine = model.engine, None
        model.state = ModelState.UNLOADED
        model.exit_code = 0
        if engine is not None:
            engine.on_idle = None
            engine.stop()
        self.log.info("model {model} unloaded", model=model.name)
        self._notify("status_change", model, {"status": "unloaded", "exit_code": 0})
        if was_loading:
            self._fail_waiters(model, SimulatorError(
                400, f"model name={model.name} is not running", "invalid_request_error"))

    def _fail_waiters(self, model: SimulatedModel, error: SimulatorError) -> None:
        waiters, model._waiters = model._waiters, []
        for d in waiters:
            d.errback(Failure(error))

    # /models

    def model_info(self, model: SimulatedModel) -> dict[str, Any]:
        """What a loaded child adds to its ``/models`` entry (its own ``/v1/models`` data)."""
        config = self.child
        return {
            "meta": {
                "vocab_type": 1, "n_ctx": config.n_ctx * config.slots, "n_ctx_train": config.n_ctx,
                "n_embd": 128, "n_params": 0, "size": 0, "ftype": "simulated",
            },
        }

    def models_json(self, created: int) -> dict[str, Any]:
        """The ``/models`` (and ``/v1/models``) body."""
        data = []
        for model in self.models.values():
            entry: dict[str, Any] = {
                "id": model.name, "aliases": [], "tags": [], "object": "model",
                "owned_by": "llamacpp", "created": created, "status": model.status_json(),
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "source": "local", "can_remove": False,
            }
            if model.running:
                for key, value in self.model_info(model).items():
                    entry.setdefault(key, value)
            data.append(entry)
        return {"data": data, "object": "list"}


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(error))
    return d


def parse_failing(text: str) -> dict[str, int]:
    """``beta=1,gamma=137`` -> C{{"beta": 1, "gamma": 137}}.

    @raise ValueError: an entry is not NAME=EXIT_CODE with a non-zero code.
    """
    failing: dict[str, int] = {}
    for entry in text.split(","):
        name, sep, code = entry.strip().partition("=")
        try:
            exit_code = int(code)
        except ValueError:
            exit_code = 0
        if not sep or not name.strip() or exit_code == 0:
            raise ValueError(f"expected MODEL=EXIT_CODE (a non-zero code), got {entry.strip()!r}")
        failing[name.strip()] = exit_code
    return failing


def parse_models(text: str) -> tuple[str, ...]:
    """``alpha,beta,gamma`` -> the model names, in order, each once.

    @raise ValueError: an empty name or a name given twice.
    """
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise ValueError(f"empty model name in {text!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"a model is named twice in {text!r}")
    return tuple(names)


def router_config(models: Sequence[str], **settings: Any) -> RouterConfig:
    """A L{RouterConfig} for C{models} (tests and the CLI)."""
    return RouterConfig(models=tuple(models), **settings)
