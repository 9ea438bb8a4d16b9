"""The simulated llama.cpp server itself: slots, queue and timing.

The prompt cache it keeps (slot contents, slot choice, the host-memory
cache) is modelled in L{paddler.simulator.cache}; the tokenizer is in
L{paddler.simulator.tokenizer}. Everything here runs on an injected clock (an L{IReactorTime}): a request
holds a slot for ``prompt tokens / prompt_tokens_per_second`` seconds, then
produces one token every ``1 / tokens_per_second`` seconds through
C{clock.callLater}. Requests beyond the number of slots wait in the server's
own FIFO queue, as llama-server's deferred tasks do.

Job states::

    QUEUED --slot free--> PROMPT --prompt_ms--> GENERATING --last token--> DONE
       \\                    \\                      \\
        +--------------------+----------------------+--cancel()--> CANCELLED
"""

from __future__ import annotations

import enum
import random
import string
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from paddler.simulator.cache import (
    DEFAULT_CACHE_BYTES_PER_TOKEN,
    DEFAULT_CACHE_RAM_MIB,
    DEFAULT_SLOT_PROMPT_SIMILARITY,
    Choice,
    PromptCache,
    choose_slot,
    common_prefix,
    pinned_choice,
)
from paddler.simulator.tokenizer import FILLER_WORDS, piece_id, tokenize

__all__ = [
    "CompletionResult", "GenerationRequest", "Job", "JobState", "SimulatedServerEngine",
    "SimulatorConfig", "SimulatorError", "Slot", "Timings", "tokenize",
]

#: Without ``n_predict`` a generation ends with "eos" after a seeded number of
#: tokens in this range.
DEFAULT_GENERATION_RANGE = (16, 128)

#: Kept for older imports: llama-server's default ``--slot-prompt-similarity``.
SLOT_PROMPT_SIMILARITY = DEFAULT_SLOT_PROMPT_SIMILARITY


@dataclass
class SimulatorConfig:
    """The settings of one simulated llama-server (``llama-server`` flags)."""

    slots: int = 4
    model: str = "simulated.gguf"
    tokens_per_second: float = 50.0
    prompt_tokens_per_second: float = 2000.0
    n_ctx: int = 2048
    load_seconds: float = 0.0
    seed: int = 0
    slots_endpoint: bool = True
    metrics_endpoint: bool = True
    api_key: str | None = None
    #: ``--slot-prompt-similarity``: an idle slot whose tokens share more than
    #: this fraction of a new prompt is chosen for it (0 = off).
    slot_prompt_similarity: float = DEFAULT_SLOT_PROMPT_SIMILARITY
    #: ``--cache-ram`` in MiB: the host-memory prompt cache (-1 = no byte
    #: limit, 0 = off).
    cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB
    #: What one cached token costs in the host-memory cache.
    cache_bytes_per_token: int = DEFAULT_CACHE_BYTES_PER_TOKEN
    #: ``--cache-idle-slots``: copy idle slots to the host cache at each task launch.
    cache_idle_slots: bool = True
    #: ``-kvu``: one KV pool for all slots; idle slots are cleared once cached.
    kv_unified: bool = False


class SimulatorError(Exception):
    """A request the server refuses, with llama-server's status and error body."""

    def __init__(
        self, code: int, message: str, error_type: str, **extra: Any
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.error_type = error_type
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON error body, in llama-server's key order."""
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "type": self.error_type,
                **self.extra,
            }
        }


def context_exceeded(n_prompt_tokens: int, n_ctx: int) -> SimulatorError:
    """The new build's 400 for a prompt longer than the slot's context."""
    return SimulatorError(
        400,
        f"request ({n_prompt_tokens} tokens) exceeds the available context size "
        f"({n_ctx} tokens), try increasing it",
        "exceed_context_size_error",
        n_prompt_tokens=n_prompt_tokens,
        n_ctx=n_ctx,
    )


@dataclass
class GenerationRequest:
    """What the engine needs to know about one completion request."""

    prompt_tokens: list[int]
    prompt_text: str = ""
    n_predict: int = -1
    ignore_eos: bool = False
    cache_prompt: bool = True
    id_slot: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    settings: dict[str, Any] = field(default_factory=dict)


class JobState(enum.Enum):
    """Where a job is in its life."""

    QUEUED = "queued"
    PROMPT = "prompt"
    GENERATING = "generating"
    DONE = "done"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Timings:
    """llama-server's ``timings`` object."""

    cache_n: int
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float

    def to_json(self) -> dict[str, Any]:
        """The JSON object, in llama-server's key order."""
        return {
            "cache_n": self.cache_n,
            "prompt_n": self.prompt_n,
            "prompt_ms": self.prompt_ms,
            "prompt_per_token_ms": self.prompt_per_token_ms,
            "prompt_per_second": self.prompt_per_second,
            "predicted_n": self.predicted_n,
            "predicted_ms": self.predicted_ms,
            "predicted_per_token_ms": self.predicted_per_token_ms,
            "predicted_per_second": self.predicted_per_second,
        }


@dataclass(frozen=True)
class CompletionResult:
    """The outcome of a finished job."""

    id_task: int
    id_slot: int
    content: str
    tokens: list[int]
    tokens_evaluated: int
    tokens_predicted: int
    tokens_cached: int
    stop_type: str
    stopping_word: str
    truncated: bool
    has_new_line: bool
    timings: Timings


@dataclass
class Slot:
    """One of the server's parallel sequences and the tokens its KV cache holds.

    @ivar tokens: the tokens in the slot's KV cache; an idle slot keeps them.
    @ivar last_job: the last job the slot ran (``/slots`` shows its id and params).
    """

    id: int
    n_ctx: int
    job: Job | None = None
    tokens: list[int] = field(default_factory=list)
    t_last_used: float = -1.0
    last_job: Job | None = None
    #: The host-cache entry known to hold these tokens (None: not since they changed).
    ram_entry: list[int] | None = None

    @property
    def is_processing(self) -> bool:
        return self.job is not None

    @property
    def n_tokens(self) -> int:
        """Tokens the slot holds now (``/slots`` ``n_prompt_tokens``), growing while busy."""
        job = self.job
        if job is None:
            return len(self.tokens)
        if job.state is JobState.PROMPT:
            return job.cache_n + job.n_prompt_processed
        return job.n_prompt + max(0, job.n_decoded - 1)


@dataclass
class EngineMetrics:
    """Counters behind ``/metrics``."""

    prompt_tokens_total: int = 0
    prompt_tokens_cached_total: int = 0
    prompt_seconds_total: float = 0.0
    tokens_predicted_total: int = 0
    tokens_predicted_seconds_total: float = 0.0
    n_decode_total: int = 0
    n_busy_slots_total: int = 0
    n_tokens_max: int = 0
    requests_total: int = 0
    requests_cancelled_total: int = 0
    prompt_cache_loads_total: int = 0
    prompt_cache_saves_total: int = 0
    prompt_cache_evictions_total: int = 0


TokenCallback = Callable[["Job", str, int], None]


class Job:
    """One completion request inside the engine.

    It waits in the queue, then holds a slot while its prompt is processed
    and its tokens generated. C{whenDone()} gives a L{Deferred} that fires
    with a L{CompletionResult}, or fails with L{CancelledError} when the job
    is cancelled (client gone, server stopping). C{pauseProducing} and
    C{resumeProducing} hold back token generation while a consumer cannot
    take more (the slot stays busy meanwhile).
    """

    def __init__(
        self,
        engine: SimulatedServerEngine,
        id_task: int,
        request: GenerationRequest,
        target: int,
        stop_type: str,
        truncated: bool,
        rng: random.Random,
        on_token: TokenCallback | None,
    ) -> None:
        self.engine = engine
        self.id_task = id_task
        self.request = request
        self.target = target
        self.stop_type = stop_type
        self.truncated = truncated
        self.stopping_word = ""
        self.on_token = on_token
        self.state = JobState.QUEUED
        self.slot: Slot | None = None
        self.n_prompt = len(request.prompt_tokens)
        self.cache_n = 0
        self.prompt_n = 0
        self.n_decoded = 0
        self.pieces: list[str] = []
        self.token_ids: list[int] = []
        self.has_new_line = False
        self.paused = False
        self.t_enqueued = engine.clock.seconds()
        self.t_start: float | None = None
        self.t_prompt_done: float | None = None
        self.t_end: float | None = None
        self.result: CompletionResult | None = None
        self._rng = rng
        self._call: IDelayedCall | None = None
        self._next_at = 0.0
        self._waiters: list[Deferred[CompletionResult]] = []

    @property
    def n_remain(self) -> int:
        """Tokens left to the requested n_predict (-1 when none was asked)."""
        if self.request.n_predict < 0:
            return -1
        return max(0, self.request.n_predict - self.n_decoded)

    @property
    def n_prompt_processed(self) -> int:
        """Prompt tokens evaluated so far (grows during the prompt phase)."""
        if self.state is JobState.QUEUED or self.t_start is None:
            return 0
        if self.state is JobState.PROMPT:
            elapsed = self.engine.clock.seconds() - self.t_start
            rate = self.engine.config.prompt_tokens_per_second
            return min(self.prompt_n, int(elapsed * rate))
        return self.prompt_n

    @property
    def active(self) -> bool:
        """True while the job is queued or holds a slot."""
        return self.state in (JobState.QUEUED, JobState.PROMPT, JobState.GENERATING)

    def whenDone(self) -> Deferred[CompletionResult]:
        """A new Deferred for the result (or L{CancelledError})."""
        d: Deferred[CompletionResult] = Deferred()
        if self.state is JobState.DONE:
            assert self.result is not None
            d.callback(self.result)
        elif self.state is JobState.CANCELLED:
            d.errback(Failure(CancelledError()))
        else:
            self._waiters.append(d)
        return d

    def cancel(self) -> None:
        """Stop the job at once, free its slot and hand it to the next queued job."""
        self.engine._cancel(self)

    def pauseProducing(self) -> None:
        """Hold back the next token until L{resumeProducing}."""
        self.engine._pause(self)

    def resumeProducing(self) -> None:
        """Generate tokens again."""
        self.engine._resume(self)

    def stopProducing(self) -> None:
        """Same as L{cancel}."""
        self.cancel()

    def _next_piece(self) -> str:
        return self._rng.choice(FILLER_WORDS)

    def _fire(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if self.result is not None:
                d.callback(self.result)
            else:
                d.errback(Failure(CancelledError()))


class SimulatedServerEngine:
    """The state of one simulated llama-server: N slots and a FIFO queue.

    @param clock: the L{IReactorTime} all timing runs on.
    @param config: the server's settings.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, config: SimulatorConfig) -> None:
        self.clock = clock
        self.config = config
        self.slots = [Slot(index, config.n_ctx) for index in range(config.slots)]
        self.queue: deque[Job] = deque()
        self.metrics = EngineMetrics()
        self.prompt_cache: PromptCache | None = None
        if config.cache_ram_mib != 0:
            limit = config.cache_ram_mib * 1024 * 1024 if config.cache_ram_mib > 0 else 0
            self.prompt_cache = PromptCache(
                limit, config.n_ctx * config.slots, config.cache_bytes_per_token
            )
        self._rng = random.Random(config.seed)
        self._next_id_task = 0
        self._started_at = clock.seconds()
        self._stopping = False
        #: Called whenever a job leaves its slot or the queue (router mode
        #: loads a waiting model when a busy one goes idle).
        self.on_idle: Callable[[], None] | None = None
        #: A router's model child asleep (``--sleep-idle-seconds``): ``/props`` says ``is_sleeping``.
        self.is_sleeping = False

    # lifecycle

    def start(self) -> None:
        """(Re)start: the loading phase counts from now; the prompt cache is
        empty, as in a new llama-server process."""
        self._started_at = self.clock.seconds()
        self._stopping = False
        for slot in self.slots:
            if slot.job is None:
                slot.tokens = []
                slot.t_last_used = -1.0
                slot.last_job = None
                slot.ram_entry = None
        if self.prompt_cache is not None:
            self.prompt_cache.clear()

    def stop(self) -> None:
        """Cancel every queued and running job; later submissions are refused."""
        self._stopping = True
        for job in list(self.queue) + [s.job for s in self.slots if s.job is not None]:
            job.cancel()

    @property
    def loading(self) -> bool:
        """True during the first C{load_seconds} after start ("Loading model")."""
        return self.clock.seconds() - self._started_at < self.config.load_seconds

    @property
    def seconds_until_loaded(self) -> float:
        """How long the loading phase still lasts (0 once loaded)."""
        return max(0.0, self._started_at + self.config.load_seconds - self.clock.seconds())

    # figures

    @property
    def requests_processing(self) -> int:
        """Slots busy with a request (llamacpp:requests_processing)."""
        return sum(1 for slot in self.slots if slot.job is not None)

    @property
    def requests_deferred(self) -> int:
        """Requests waiting in the queue (llamacpp:requests_deferred)."""
        return len(self.queue)

    @property
    def idle_slots(self) -> int:
        """Slots without a request."""
        return len(self.slots) - self.requests_processing

    def random_id(self, length: int = 32) -> str:
        """A seeded random alphanumeric id (for ``chatcmpl-...``)."""
        alphabet = string.ascii_letters + string.digits
        return "".join(self._rng.choice(alphabet) for _ in range(length))

    # requests

    def submit(
        self, request: GenerationRequest, on_token: TokenCallback | None = None
    ) -> Job:
        """Queue a request; it starts at once when a suitable slot is idle.

        @param on_token: called with C{(job, piece, token_id)} for every
            generated token, as soon as it is generated.
        @raise SimulatorError: the prompt does not fit the slot context (400),
            or the server is stopping (503).
        """
        if self._stopping:
            raise SimulatorError(503, "Server is shutting down", "unavailable_error")
        n_prompt = len(request.prompt_tokens)
        n_ctx = self.config.n_ctx
        if n_prompt > n_ctx:
            raise context_exceeded(n_prompt, n_ctx)
        if request.seed is not None:
            rng = random.Random(request.seed)
        else:
            rng = random.Random(self._rng.getrandbits(64))
        budget = n_ctx - n_prompt
        wanted: int | None
        if request.n_predict >= 0:
            wanted, stop_type = request.n_predict, "limit"
        elif request.ignore_eos:
            wanted, stop_type = None, "limit"
        else:
            wanted, stop_type = rng.randint(*DEFAULT_GENERATION_RANGE), "eos"
        if wanted is None or wanted > budget:
            target, stop_type, truncated = budget, "limit", True
        else:
            target, truncated = wanted, False
        job = Job(self, self._next_id_task, request, target, stop_type, truncated, rng, on_token)
        self._next_id_task += 1
        self.metrics.requests_total += 1
        self.queue.append(job)
        self.log.debug(
            "task {id_task} queued: {n_prompt} prompt tokens, {target} to generate",
            id_task=job.id_task,
            n_prompt=n_prompt,
            target=target,
        )
        self._dispatch()
        return job

    def _dispatch(self) -> None:
        for job in list(self.queue):
            if self.idle_slots == 0:
                return
            choice = self._choose_slot(job)
            if choice is not None:
                self.queue.remove(job)
                self._start(job, choice)

    def _choose_slot(self, job: Job) -> Choice | None:
        request = job.request
        if 0 <= request.id_slot < len(self.slots):
            pinned = self.slots[request.id_slot]
            return pinned_choice(pinned, request.prompt_tokens) if pinned.job is None else None
        idle = [slot for slot in self.slots if slot.job is None]
        return choose_slot(idle, request.prompt_tokens, self.config.slot_prompt_similarity)

    def _update_prompt_cache(self, choice: Choice, prompt: list[int]) -> None:
        """Save the chosen slot to RAM and load the best entry into it (see L{paddler.simulator.cache})."""
        cache = self.prompt_cache
        if cache is None or not choice.update_cache:
            return
        slot = choice.slot
        assert isinstance(slot, Slot)
        if slot.tokens and cache.save(slot.tokens):
            self.metrics.prompt_cache_saves_total += 1
            # The limits apply as soon as the slot is saved, before the load:
            # a full cache drops its oldest entry even when that is the one
            # the prompt needs (seen on the real server).
            self.metrics.prompt_cache_evictions_total += cache.update()
        restored = cache.load(slot.tokens, prompt, choice.empty_loads)
        if restored is not None:
            slot.tokens = restored
            self.metrics.prompt_cache_loads_total += 1
        self.metrics.prompt_cache_evictions_total += cache.update()

    def _cache_idle_slots(self) -> None:
        """At a task launch, copy every idle slot to RAM (and clear it under ``-kvu``)."""
        cache = self.prompt_cache
        if cache is None or not self.config.cache_idle_slots:
            return
        for slot in self.slots:
            if slot.job is None and slot.tokens:
                if not cache.holds(slot.ram_entry):
                    slot.ram_entry, added = cache.save_entry(slot.tokens)
                    if added:
                        self.metrics.prompt_cache_saves_total += 1
                if self.config.kv_unified:
                    slot.tokens = []
        self.metrics.prompt_cache_evictions_total += cache.update()

    def _start(self, job: Job, choice: Choice) -> None:
        now = self.clock.seconds()
        prompt = job.request.prompt_tokens
        slot = choice.slot
        assert isinstance(slot, Slot)
        self._update_prompt_cache(choice, prompt)
        slot.job = job
        slot.last_job = job
        job.slot = slot
        job.state = JobState.PROMPT
        job.t_start = now
        cache_n = common_prefix(slot.tokens, prompt) if job.request.cache_prompt else 0
        if job.n_prompt > 0 and cache_n >= job.n_prompt:
            # llama-server always evaluates the last prompt token again.
            cache_n = job.n_prompt - 1
        job.cache_n = cache_n
        job.prompt_n = job.n_prompt - cache_n
        slot.tokens = list(prompt[:cache_n])
        slot.ram_entry = None
        self._cache_idle_slots()
        delay = job.prompt_n / self.config.prompt_tokens_per_second
        self.log.debug(
            "task {id_task} in slot {id_slot} ({reason}): {prompt_n} prompt tokens to evaluate, "
            "{cache_n} cached",
            id_task=job.id_task,
            id_slot=slot.id,
            reason=choice.reason,
            prompt_n=job.prompt_n,
            cache_n=cache_n,
        )
        job._next_at = now + delay
        job._call = self.clock.callLater(delay, self._prompt_done, job)

    def _prompt_done(self, job: Job) -> None:
        # Timings use the nominal times the work was due at, so that they
        # match the configured rates even when the clock jumps in big steps.
        job._call = None
        now = job._next_at
        assert job.slot is not None and job.t_start is not None
        job.state = JobState.GENERATING
        job.t_prompt_done = now
        job.slot.tokens = list(job.request.prompt_tokens)
        metrics = self.metrics
        metrics.prompt_tokens_total += job.prompt_n
        metrics.prompt_tokens_cached_total += job.cache_n
        metrics.prompt_seconds_total += now - job.t_start
        metrics.n_decode_total += 1
        metrics.n_busy_slots_total += self.requests_processing
        if job.target <= 0:
            self._finish(job)
            return
        self._schedule_token(job, now + 1.0 / self.config.tokens_per_second)

    def _schedule_token(self, job: Job, at: float) -> None:
        job._next_at = at
        if job.paused:
            return
        delay = max(0.0, at - self.clock.seconds())
        job._call = self.clock.callLater(delay, self._token, job)

    def _token(self, job: Job) -> None:
        job._call = None
        piece = job._next_piece()
        token = piece_id(piece)
        before = "".join(job.pieces)
        job.n_decoded += 1
        job.token_ids.append(token)
        emitted = piece
        finished = job.n_decoded >= job.target
        for word in job.request.stop:
            content = before + piece
            at = content.find(word, max(0, len(before) - len(word) + 1))
            if word and at >= 0:
                emitted = piece[: max(0, at - len(before))]
                job.stop_type, job.stopping_word, job.truncated = "word", word, False
                finished = True
                break
        job.pieces.append(emitted)
        if "\n" in emitted:
            job.has_new_line = True
        metrics = self.metrics
        metrics.tokens_predicted_total += 1
        metrics.n_decode_total += 1
        metrics.n_busy_slots_total += self.requests_processing
        if job.on_token is not None and emitted:
            job.on_token(job, emitted, token)
        if job.state is not JobState.GENERATING:
            return  # the callback cancelled the job
        if finished:
            self._finish(job)
        else:
            self._schedule_token(job, job._next_at + 1.0 / self.config.tokens_per_second)

    def _pause(self, job: Job) -> None:
        job.paused = True
        if job.state is JobState.GENERATING and job._call is not None and job._call.active():
            job._call.cancel()
            job._call = None

    def _resume(self, job: Job) -> None:
        if not job.paused:
            return
        job.paused = False
        if job.state is JobState.GENERATING and job._call is None:
            self._schedule_token(job, max(job._next_at, self.clock.seconds()))

    def _retire(self, job: Job, now: float) -> None:
        """Account for a job leaving its slot at C{now} and free the slot."""
        job.t_end = now
        slot = job.slot
        assert slot is not None
        if job.state is JobState.GENERATING:
            assert job.t_prompt_done is not None
            self.metrics.tokens_predicted_seconds_total += now - job.t_prompt_done
            # The last sampled token is never evaluated, so it is not cached.
            slot.tokens = list(job.request.prompt_tokens) + job.token_ids[:-1]
        self.metrics.n_tokens_max = max(self.metrics.n_tokens_max, job.n_prompt + job.n_decoded)
        slot.job = None
        slot.t_last_used = now

    def _finish(self, job: Job) -> None:
        # job._next_at is when the last token (or the prompt) was due.
        self._retire(job, job._next_at)
        job.state = JobState.DONE
        job.result = self._result(job)
        self.log.debug(
            "task {id_task} done in slot {id_slot}: {n_decoded} tokens, stop {stop_type}",
            id_task=job.id_task,
            id_slot=job.result.id_slot,
            n_decoded=job.n_decoded,
            stop_type=job.stop_type,
        )
        self._dispatch()
        job._fire()
        self._notify_idle()

    def _notify_idle(self) -> None:
        if self.on_idle is not None:
            self.on_idle()

    def _cancel(self, job: Job) -> None:
        if not job.active:
            return
        if job._call is not None and job._call.active():
            job._call.cancel()
        job._call = None
        if job.state is JobState.QUEUED:
            self.queue.remove(job)
            id_slot = -1
        else:
            assert job.slot is not None
            id_slot = job.slot.id
            self._retire(job, self.clock.seconds())
        job.state = JobState.CANCELLED
        self.metrics.requests_cancelled_total += 1
        self.log.debug(
            "task {id_task} cancelled (slot {id_slot}) after {n_decoded} tokens",
            id_task=job.id_task,
            id_slot=id_slot,
            n_decoded=job.n_decoded,
        )
        self._dispatch()
        job._fire()
        self._notify_idle()

    def _result(self, job: Job) -> CompletionResult:
        assert job.slot is not None and job.t_start is not None
        assert job.t_prompt_done is not None and job.t_end is not None
        prompt_ms = round((job.t_prompt_done - job.t_start) * 1000.0, 3)
        predicted_ms = round((job.t_end - job.t_prompt_done) * 1000.0, 3)
        timings = Timings(
            cache_n=job.cache_n,
            prompt_n=job.prompt_n,
            prompt_ms=prompt_ms,
            prompt_per_token_ms=prompt_ms / job.prompt_n if job.prompt_n else 0.0,
            prompt_per_second=1000.0 * job.prompt_n / prompt_ms if prompt_ms else 0.0,
            predicted_n=job.n_decoded,
            predicted_ms=predicted_ms,
            predicted_per_token_ms=predicted_ms / job.n_decoded if job.n_decoded else 0.0,
            predicted_per_second=1000.0 * job.n_decoded / predicted_ms if predicted_ms else 0.0,
        )
        return CompletionResult(
            id_task=job.id_task,
            id_slot=job.slot.id,
            content="".join(job.pieces),
            tokens=list(job.token_ids),
            tokens_evaluated=job.n_prompt,
            tokens_predicted=job.n_decoded,
            tokens_cached=len(job.slot.tokens),
            stop_type=job.stop_type,
            stopping_word=job.stopping_word,
            truncated=job.truncated,
            has_new_line=job.has_new_line,
            timings=timings,
        )
