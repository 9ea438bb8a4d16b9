"""The simulated llama-server's engine: slots, FIFO queue, cache, timing, cancellation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from paddler.simulator.engine import (
    CompletionResult,
    GenerationRequest,
    JobState,
    SimulatedServerEngine,
    SimulatorConfig,
    SimulatorError,
)
from paddler.simulator.tokenizer import BOS_ID, split_pieces, tokenize


@pytest.fixture
def clock() -> Iterator[Clock]:
    """A fake clock; at the end of each test nothing may still be scheduled on it."""
    clock = Clock()
    yield clock
    assert clock.getDelayedCalls() == []


def request(text: str = "hello there", **kwargs: object) -> GenerationRequest:
    return GenerationRequest(prompt_tokens=tokenize(text), prompt_text=text, **kwargs)  # type: ignore[arg-type]


def results_of(job) -> list[CompletionResult]:  # type: ignore[no-untyped-def]
    out: list[CompletionResult] = []
    job.whenDone().addCallback(out.append)
    return out


def test_tokenizer_counts_words_punctuation_and_bos() -> None:
    """A prompt costs one token per word or punctuation mark, plus BOS."""
    assert split_pieces("Hello, world.") == ["Hello", ",", " world", "."]
    tokens = tokenize("Hello, world.")
    assert tokens[0] == BOS_ID and len(tokens) == 5
    assert tokenize("Hello, world.") == tokens  # stable ids
    assert tokenize("Hello", add_bos=False) == tokens[1:2]


def test_prompt_then_tokens_at_configured_rates(clock: Clock) -> None:
    """Prompt time is prompt_n / prompt rate, then one token per 1/tokens_per_second."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(tokens_per_second=50, prompt_tokens_per_second=1000))
    tokens_seen: list[tuple[float, str]] = []
    job = engine.submit(
        request("a b c d", n_predict=10),
        on_token=lambda job, piece, token: tokens_seen.append((clock.seconds(), piece)),
    )
    done = results_of(job)
    assert job.state is JobState.PROMPT and job.n_prompt == 5
    clock.advance(0.0049)
    assert job.state is JobState.PROMPT
    clock.advance(0.0002)
    assert job.state is JobState.GENERATING and tokens_seen == []
    clock.advance(0.02)
    assert len(tokens_seen) == 1
    clock.advance(0.02 * 8)
    assert len(tokens_seen) == 9 and done == []
    clock.advance(0.02)
    assert len(tokens_seen) == 10
    [result] = done
    timings = result.timings
    assert timings.prompt_n == 5 and timings.cache_n == 0
    assert timings.prompt_ms == pytest.approx(5.0)
    assert timings.prompt_per_second == pytest.approx(1000.0)
    assert timings.predicted_n == 10 and result.tokens_predicted == 10
    assert timings.predicted_ms == pytest.approx(200.0)
    assert timings.predicted_per_token_ms == pytest.approx(20.0)
    assert timings.predicted_per_second == pytest.approx(50.0)
    assert result.tokens_evaluated == 5
    assert result.tokens_cached == 5 + 10 - 1
    assert result.stop_type == "limit" and not result.truncated
    assert result.content == "".join(piece for _, piece in tokens_seen)


def test_timings_follow_rates_even_when_the_clock_jumps(clock: Clock) -> None:
    """One big clock step runs every due token, and timings still show the configured rates."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(tokens_per_second=100))
    job = engine.submit(request("x", n_predict=7))
    done = results_of(job)
    clock.advance(10)
    [result] = done
    assert result.timings.predicted_ms == pytest.approx(70.0)
    assert result.timings.predicted_per_second == pytest.approx(100.0)


def test_requests_beyond_slots_wait_in_fifo_order(clock: Clock) -> None:
    """N+3 requests on N slots: N run, 3 wait, and they finish in arrival order."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(slots=2, tokens_per_second=10))
    finished: list[int] = []
    jobs = []
    for index in range(5):
        job = engine.submit(request(f"prompt number {index}", n_predict=5))
        job.whenDone().addCallback(lambda _, index=index: finished.append(index))  # type: ignore[call-overload]
        jobs.append(job)
    assert engine.requests_processing == 2 and engine.requests_deferred == 3
    assert [job.state for job in jobs] == [JobState.PROMPT] * 2 + [JobState.QUEUED] * 3
    clock.pump([0.1] * 6)
    assert finished == [0, 1]
    assert engine.requests_processing == 2 and engine.requests_deferred == 1
    clock.pump([0.1] * 6)
    assert finished == [0, 1, 2, 3]
    clock.pump([0.1] * 6)
    assert finished == [0, 1, 2, 3, 4]
    assert engine.requests_processing == 0 and engine.requests_deferred == 0


def test_cancelling_a_running_job_hands_its_slot_to_the_next_queued_job(clock: Clock) -> None:
    """Cancel frees the slot at once; the queued job starts in it; the cancelled one fails."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(slots=1))
    first = engine.submit(request("first", n_predict=100))
    second = engine.submit(request("second", n_predict=3))
    failures: list[object] = []
    first.whenDone().addErrback(lambda f: failures.append(f.trap(CancelledError)))
    clock.advance(0.5)
    assert first.n_decoded > 0 and second.state is JobState.QUEUED
    decoded = first.n_decoded
    first.cancel()
    assert failures == [CancelledError]
    assert first.state is JobState.CANCELLED
    assert engine.slots[0].job is second and second.state is JobState.PROMPT
    done = results_of(second)
    clock.advance(1)
    assert first.n_decoded == decoded  # no generation after cancel
    assert [r.tokens_predicted for r in done] == [3]
    assert engine.metrics.requests_cancelled_total == 1


def test_cancelling_a_queued_job_removes_it_from_the_queue(clock: Clock) -> None:
    """A queued job that is cancelled never runs."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(slots=1))
    running = engine.submit(request("a", n_predict=2))
    queued = engine.submit(request("b", n_predict=2))
    queued.whenDone().addErrback(lambda f: f.trap(CancelledError))
    queued.cancel()
    assert engine.requests_deferred == 0 and queued.state is JobState.CANCELLED
    done = results_of(running)
    clock.advance(1)
    assert len(done) == 1 and queued.t_start is None


def test_same_prompt_in_same_slot_is_served_from_the_cache(clock: Clock) -> None:
    """A repeat of a prompt on the same slot has cache_n = n_prompt - 1 and a shorter prompt time."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(slots=2, prompt_tokens_per_second=100))
    text = "Building a website can be done in 10 simple steps:"
    first = results_of(engine.submit(request(text, n_predict=4, id_slot=1)))
    clock.advance(5)
    second = results_of(engine.submit(request(text, n_predict=4, id_slot=1)))
    clock.advance(5)
    uncached = results_of(engine.submit(request(text, n_predict=4, id_slot=1, cache_prompt=False)))
    clock.advance(5)
    n_prompt = len(tokenize(text))
    assert first[0].id_slot == second[0].id_slot == 1
    assert first[0].timings.cache_n == 0 and first[0].timings.prompt_n == n_prompt
    assert second[0].timings.cache_n == n_prompt - 1 and second[0].timings.prompt_n == 1
    assert second[0].timings.prompt_ms < first[0].timings.prompt_ms
    assert second[0].timings.prompt_ms == pytest.approx(10.0)
    assert uncached[0].timings.cache_n == 0
    assert engine.metrics.prompt_tokens_cached_total == n_prompt - 1


def test_unpinned_request_prefers_the_slot_holding_its_prompt(clock: Clock) -> None:
    """Without id_slot, an idle slot whose cache shares the prompt is chosen (prompt similarity)."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(slots=4))
    text = "a long shared conversation prefix about rivers and boats"
    results_of(engine.submit(request(text, n_predict=1, id_slot=2)))
    clock.advance(1)
    done = results_of(engine.submit(request(text + " and more", n_predict=1)))
    clock.advance(1)
    [again] = done
    assert again.id_slot == 2 and again.timings.cache_n == len(tokenize(text))


def test_pinned_request_waits_for_its_busy_slot_while_others_are_idle(clock: Clock) -> None:
    """id_slot pins: the request queues behind its slot even if other slots are idle."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(slots=2, tokens_per_second=10))
    busy = engine.submit(request("one", n_predict=5, id_slot=0))
    pinned = engine.submit(request("two", n_predict=1, id_slot=0))
    free = engine.submit(request("three", n_predict=1))
    assert pinned.state is JobState.QUEUED and free.slot is engine.slots[1]
    done = results_of(pinned)
    clock.advance(0.6)
    assert busy.state is JobState.DONE and pinned.slot is engine.slots[0]
    clock.advance(1)
    assert done[0].id_slot == 0


def test_out_of_range_id_slot_is_ignored(clock: Clock) -> None:
    """id_slot 99 on a 4-slot server is served by any idle slot, like the new build."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(slots=4))
    done = results_of(engine.submit(request("hi", n_predict=2, id_slot=99)))
    clock.advance(1)
    assert done[0].id_slot in range(4)


def test_prompt_longer_than_context_is_refused(clock: Clock) -> None:
    """A prompt over n_ctx raises the new build's 400 exceed_context_size_error."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(n_ctx=8))
    with pytest.raises(SimulatorError) as raised:
        engine.submit(request("one two three four five six seven eight nine"))
    assert raised.value.body() == {
        "error": {
            "code": 400,
            "message": "request (10 tokens) exceeds the available context size (8 tokens), try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 10,
            "n_ctx": 8,
        }
    }
    assert engine.requests_deferred == 0


def test_generation_stops_at_the_context_limit_truncated(clock: Clock) -> None:
    """n_predict beyond the context stops at n_ctx with truncated and stop_type 'limit'."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(n_ctx=16))
    done = results_of(engine.submit(request("hello", n_predict=1000, ignore_eos=True)))
    clock.advance(10)
    [result] = done
    assert result.tokens_evaluated == 2 and result.tokens_predicted == 14
    assert result.truncated and result.stop_type == "limit"


def test_without_n_predict_generation_ends_with_eos_after_a_seeded_length(clock: Clock) -> None:
    """n_predict -1 stops with 'eos' after 16..128 tokens; ignore_eos runs to the context end."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(n_ctx=256, tokens_per_second=1000))
    natural = results_of(engine.submit(request("tell me")))
    forced = results_of(engine.submit(request("tell me", ignore_eos=True)))
    clock.advance(10)
    assert natural[0].stop_type == "eos" and not natural[0].truncated
    assert 16 <= natural[0].tokens_predicted <= 128
    assert forced[0].stop_type == "limit" and forced[0].truncated
    assert forced[0].tokens_predicted == 256 - 3


def test_same_seed_gives_the_same_run(clock: Clock) -> None:
    """Two engines with the same seed produce identical text; another seed differs."""
    def run(seed: int) -> list[str]:
        engine = SimulatedServerEngine(clock, SimulatorConfig(seed=seed, tokens_per_second=1000))
        jobs = [results_of(engine.submit(request("story"))) for _ in range(3)]
        clock.advance(10)
        return [done[0].content for done in jobs]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_request_seed_fixes_the_content(clock: Clock) -> None:
    """The request's own seed gives the same text whatever the server's state."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(tokens_per_second=1000))
    first = results_of(engine.submit(request("x", n_predict=8, seed=42)))
    results_of(engine.submit(request("y", n_predict=8)))
    second = results_of(engine.submit(request("z", n_predict=8, seed=42)))
    clock.advance(10)
    assert first[0].content == second[0].content


def test_stop_word_ends_generation_with_stop_type_word(clock: Clock) -> None:
    """A stop string ends the generation before it, with stop_type 'word'."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(tokens_per_second=1000, seed=1))
    probe = results_of(engine.submit(request("x", n_predict=20, seed=3)))
    clock.advance(10)
    word = probe[0].content.split(" ")[3]
    done = results_of(engine.submit(request("x", n_predict=20, seed=3, stop=(" " + word,))))
    clock.advance(10)
    [result] = done
    assert result.stop_type == "word" and result.stopping_word == " " + word
    assert (" " + word) not in result.content
    assert probe[0].content.startswith(result.content)


def test_paused_job_holds_its_slot_and_generates_nothing(clock: Clock) -> None:
    """pauseProducing stops token generation (slot stays busy) until resumeProducing."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(tokens_per_second=10))
    job = engine.submit(request("x", n_predict=5))
    done = results_of(job)
    clock.advance(0.25)
    decoded = job.n_decoded
    job.pauseProducing()
    clock.advance(5)
    assert job.n_decoded == decoded and job.state is JobState.GENERATING
    assert engine.requests_processing == 1
    job.resumeProducing()
    clock.advance(1)
    assert done[0].tokens_predicted == 5


def test_stop_cancels_everything_and_refuses_new_work(clock: Clock) -> None:
    """engine.stop() cancels running and queued jobs, leaving nothing scheduled."""
    engine = SimulatedServerEngine(clock, SimulatorConfig(slots=1))
    jobs = [engine.submit(request("a", n_predict=50)) for _ in range(3)]
    errors: list[object] = []
    for job in jobs:
        job.whenDone().addErrback(lambda f: errors.append(f.trap(CancelledError)))
    clock.advance(0.1)
    engine.stop()
    assert errors == [CancelledError] * 3
    assert engine.requests_processing == 0 and engine.requests_deferred == 0
    with pytest.raises(SimulatorError) as raised:
        engine.submit(request("late"))
    assert raised.value.code == 503


def test_loading_phase_lasts_load_seconds_from_start(clock: Clock) -> None:
    """The engine is 'loading' for load_seconds after start(), then ready."""
    clock.advance(100)
    engine = SimulatedServerEngine(clock, SimulatorConfig(load_seconds=2))
    assert engine.loading
    clock.advance(1.5)
    engine.start()
    clock.advance(1.9)
    assert engine.loading and engine.seconds_until_loaded == pytest.approx(0.1)
    clock.advance(0.1)
    assert not engine.loading
