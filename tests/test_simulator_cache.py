"""The simulator's prompt cache: slot contents, slot choice, the host-memory cache.

The sequences are the ones run against a real llama-server (0c1e57098) in
the reference's experiment table (docs: prompt-aware routing, section 1);
the expected figures are what that server reported, up to tokenizer
differences (the simulator's prompts here are one token per word).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from paddler.simulator.cache import (
    DEFAULT_CACHE_BYTES_PER_TOKEN,
    PromptCache,
    _pack,
    _packed_prefix,
    choose_slot,
    common_prefix,
)
from paddler.simulator.engine import (
    CompletionResult,
    GenerationRequest,
    SimulatedServerEngine,
    SimulatorConfig,
)
from paddler.simulator.tokenizer import BOS_ID, tokenize

WORDS = [f"w{i}" for i in range(500)]


def words(seed: int, n: int) -> str:
    """A prompt of n distinct-looking words (one token each), the same for the same seed."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture
def clock() -> Iterator[Clock]:
    clock = Clock()
    yield clock
    assert clock.getDelayedCalls() == []


class Server:
    """An engine on a fake clock that runs one request at a time to its end."""

    def __init__(self, clock: Clock, **config: Any) -> None:
        self.clock = clock
        self.engine = SimulatedServerEngine(clock, SimulatorConfig(n_ctx=8192, **config))

    def run(self, text: str, **kwargs: Any) -> CompletionResult:
        job = self.engine.submit(
            GenerationRequest(prompt_tokens=tokenize(text), prompt_text=text,
                              n_predict=kwargs.pop("n_predict", 1), **kwargs)
        )
        done: list[CompletionResult] = []
        job.whenDone().addCallback(done.append)
        while not done:
            self.clock.advance(1)
        return done[0]


A, B, C, D, X = (words(seed, 1100) for seed in (1, 2, 3, 4, 7))


def test_a_b_c_then_a_on_one_slot_restores_a_from_host_memory(clock: Clock) -> None:
    """-np 1: after A, B, C the slot holds C, yet A again reuses all but its last token (the
    real server: cache_n 1100, prompt_n 1) and B plus 8 tokens reuses all of B."""
    server = Server(clock, slots=1)
    first = server.run(A)
    assert (first.timings.cache_n, first.timings.prompt_n) == (0, len(tokenize(A)))
    assert server.run(B).timings.cache_n == 1  # only BOS in common with A
    assert server.run(C).timings.cache_n == 1
    again = server.run(A)
    assert (again.timings.cache_n, again.timings.prompt_n) == (len(tokenize(A)) - 1, 1)
    longer = server.run(B + " " + words(9, 8))
    assert (longer.timings.cache_n, longer.timings.prompt_n) == (len(tokenize(B)), 8)


def test_without_host_cache_only_the_slot_counts(clock: Clock) -> None:
    """--cache-ram 0: A after B and C shares only BOS with the slot (cache_n 1)."""
    server = Server(clock, slots=1, cache_ram_mib=0)
    for text in (A, B, C):
        server.run(text)
    assert server.run(A).timings.cache_n == 1
    assert server.engine.prompt_cache is None


def test_host_cache_evicts_the_oldest_entry_beyond_its_byte_budget(clock: Clock) -> None:
    """--cache-ram 3 with ~1.1 MiB entries holds two: after A, B, C, D the entry of A is gone."""
    server = Server(clock, slots=1, cache_ram_mib=3, cache_bytes_per_token=1024)
    for text in (A, B, C, D):
        server.run(text)
    cache = server.engine.prompt_cache
    assert cache is not None and len(cache.entries) == 2
    assert cache.size_bytes <= 3 * 1024 * 1024
    assert server.run(A).timings.cache_n == 1
    assert server.engine.metrics.prompt_cache_evictions_total >= 1
    # Saving the slot (D) evicts before the lookup: C went too (as on the real server).
    assert server.run(C).timings.cache_n == 1
    recent = Server(clock, slots=1, cache_ram_mib=3, cache_bytes_per_token=1024)
    for text in (A, B, C, D):
        recent.run(text)
    assert recent.run(C).timings.prompt_n == 1


def test_a_shared_prefix_entry_moves_out_when_loaded(clock: Clock) -> None:
    """S+a, X, S+b, X, S+a with a 550-token S: S+b takes S+a's entry (f_keep 0.5 >= 0.25) and
    reuses S; X comes back whole; the last S+a finds only S, not its own 1100 tokens, because
    loading moved its entry out of the cache."""
    shared = words(5, 550)
    s_a, s_b, x = shared + " " + words(6, 550), shared + " " + words(8, 550), words(7, 1100)
    server = Server(clock, slots=1)
    server.run(s_a)
    server.run(x)
    n_shared = len(tokenize(shared))
    assert server.run(s_b).timings.cache_n == n_shared
    assert server.run(x).timings.cache_n == len(tokenize(x)) - 1
    assert server.run(s_a).timings.cache_n == n_shared


def test_an_entry_that_would_keep_under_a_quarter_is_not_loaded(clock: Clock) -> None:
    """T+a (220 + 1100 tokens), X, T+q: T is 17 % of T+a's entry, under 25 %: cache_n 1."""
    prefix = words(9, 220)
    server = Server(clock, slots=1)
    server.run(prefix + " " + words(10, 1100))
    server.run(X)
    assert server.run(prefix + " " + words(11, 30)).timings.cache_n == 1


def test_pinning_to_an_empty_slot_skips_the_host_cache(clock: Clock) -> None:
    """-np 2: A and then X pinned to slot 0, A pinned to the never used slot 1: cache_n 0
    (llama.cpp issue 28139); pinned to a used slot, A is restored (cache_n n - 1)."""
    server = Server(clock, slots=2)
    server.run(A, id_slot=0)
    server.run(X, id_slot=0)
    assert server.run(A, id_slot=1).timings.cache_n == 0
    other = Server(clock, slots=2)
    other.run(A, id_slot=0)
    other.run(words(12, 1100), id_slot=1)
    other.run(X, id_slot=0)
    assert other.run(A, id_slot=1).timings.cache_n == len(tokenize(A)) - 1


def test_a_pinned_slot_that_keeps_half_is_not_saved(clock: Clock) -> None:
    """A pinned slot reused for a prompt sharing over half its tokens is overwritten without a
    copy in RAM: A cannot be restored later."""
    server = Server(clock, slots=2)
    server.run(words(12, 1000), id_slot=1)
    server.run(A, id_slot=0)
    server.run(A[: int(len(A) * 0.7)] + " " + words(20, 300), id_slot=0)
    assert server.run(A, id_slot=1).timings.cache_n == 1


def test_an_empty_slot_chosen_by_lru_loads_from_the_host_cache(clock: Clock) -> None:
    """-np 3: A and X pinned to slot 2; unpinned A goes to an empty slot by LRU and is
    restored from RAM all the same (cache_n n - 1)."""
    server = Server(clock, slots=3)
    server.run(A, id_slot=2)
    server.run(X, id_slot=2)
    again = server.run(A)
    assert again.id_slot == 1 and again.timings.cache_n == len(tokenize(A)) - 1


def test_idle_slots_are_copied_to_the_host_cache_at_each_launch(clock: Clock) -> None:
    """-np 3: A, B, C fill the slots (last slot first); A' overwrites A's slot by similarity
    without saving it, yet A pinned to B's slot is restored: A was copied when B launched."""
    server = Server(clock, slots=3)
    assert [server.run(text).id_slot for text in (A, B, C)] == [2, 1, 0]
    changed = server.run(A[: int(len(A) * 0.7)] + " " + words(20, 300))
    assert changed.id_slot == 2
    assert server.run(A, id_slot=1).timings.cache_n == len(tokenize(A)) - 1
    without = Server(clock, slots=3, cache_idle_slots=False)
    for text in (A, B, C):
        without.run(text)
    without.run(A[: int(len(A) * 0.7)] + " " + words(20, 300))
    assert without.run(A, id_slot=1).timings.cache_n == 1


def test_unified_kv_clears_idle_slots_once_they_are_cached(clock: Clock) -> None:
    """-np 2 -kvu: C lands in a cleared slot (cache_n 0, not the BOS 1) and A still hits."""
    server = Server(clock, slots=2, kv_unified=True)
    server.run(A)
    server.run(B)
    assert server.run(C).timings.cache_n == 0
    assert server.run(A).timings.cache_n == len(tokenize(A)) - 1


def test_cache_prompt_false_evaluates_everything_but_keeps_the_slot_choice(clock: Clock) -> None:
    """cache_prompt false: the similar slot is still chosen, all tokens are evaluated, and the
    slot holds the prompt afterwards, so the next request hits."""
    server = Server(clock, slots=2)
    first = server.run(A)
    uncached = server.run(A, cache_prompt=False)
    assert uncached.id_slot == first.id_slot
    assert (uncached.timings.cache_n, uncached.timings.prompt_n) == (0, len(tokenize(A)))
    assert server.run(A).timings.cache_n == len(tokenize(A)) - 1


def test_prompt_time_counts_only_uncached_tokens(clock: Clock) -> None:
    """prompt_ms = prompt_n / prompt speed: a hit costs one token's time."""
    server = Server(clock, slots=1, prompt_tokens_per_second=1000)
    first = server.run(A)
    again = server.run(A)
    assert first.timings.prompt_ms == pytest.approx(len(tokenize(A)), rel=1e-6)
    assert again.timings.prompt_ms == pytest.approx(1.0)


def test_prompt_tokens_total_counts_only_evaluated_tokens(clock: Clock) -> None:
    """llamacpp:prompt_tokens_total sums prompt_n; cached tokens go to prompt_tokens_cached_total."""
    server = Server(clock, slots=1)
    results = [server.run(text) for text in (A, B, A)]
    metrics = server.engine.metrics
    assert metrics.prompt_tokens_total == sum(r.timings.prompt_n for r in results)
    assert metrics.prompt_tokens_cached_total == sum(r.timings.cache_n for r in results)
    assert metrics.prompt_tokens_cached_total == 1 + len(tokenize(A)) - 1


def test_a_restart_loses_the_cache(clock: Clock) -> None:
    """The cache is process memory: after stop and start, A is evaluated again in full."""
    server = Server(clock, slots=2)
    server.run(A)
    server.run(B)
    server.engine.stop()
    server.engine.start()
    assert server.run(A).timings.cache_n == 0
    assert all(slot.tokens == [] or slot.job is None for slot in server.engine.slots)


def test_similarity_zero_turns_the_similarity_rule_off(clock: Clock) -> None:
    """--slot-prompt-similarity 0: slots are chosen by LRU only; the host cache still restores."""
    server = Server(clock, slots=2, slot_prompt_similarity=0.0)
    assert [server.run(text).id_slot for text in (A, B)] == [1, 0]
    assert server.run(B).id_slot == 1  # LRU, not slot 0 that holds B
    again = server.run(A)  # LRU: slot 0; A's copy (made when B launched) is loaded
    assert again.id_slot == 0 and again.timings.cache_n == len(tokenize(A)) - 1
    similar = Server(clock, slots=2)
    for text in (A, B):
        similar.run(text)
    assert similar.run(B).id_slot == 0


# the cache model's parts


def test_common_prefix_counts_equal_leading_tokens_across_chunk_borders() -> None:
    """The chunked comparison finds the exact first difference, also inside and at chunk ends."""
    base = list(range(300))
    for cut in (0, 1, 63, 64, 65, 128, 299):
        other = base[:cut] + [-1] + base[cut + 1:]
        assert common_prefix(base, other) == cut
    assert common_prefix(base, base[:100]) == 100
    assert common_prefix([], base) == 0


@given(st.lists(st.integers(0, 3), max_size=200), st.lists(st.integers(0, 3), max_size=200))
@settings(max_examples=200, deadline=None)
def test_common_prefix_matches_the_naive_definition(a: list[int], b: list[int]) -> None:
    """Property: the chunked LCP equals the token-by-token one."""
    naive = 0
    for x, y in zip(a, b):
        if x != y:
            break
        naive += 1
    assert common_prefix(a, b) == naive


@given(st.lists(st.integers(0, 70_000), max_size=300), st.lists(st.integers(0, 70_000), max_size=300),
       st.integers(0, 300))
@settings(max_examples=200, deadline=None)
def test_packed_prefix_matches_the_list_one(a: list[int], b: list[int], shared: int) -> None:
    """Property: the host cache's byte-packed LCP equals the token-by-token one, whichever
    byte of a token differs."""
    b = a[:shared] + b
    packed_a, packed_b = _pack(a), _pack(b)
    assert packed_a is not None and packed_b is not None
    assert _packed_prefix(packed_a, packed_b) == common_prefix(a, b)
    assert _pack([-1]) is None  # does not fit: the cache falls back to lists


def test_saving_skips_held_prompts_and_drops_contained_ones() -> None:
    """An entry already holding the tokens blocks a save; entries the tokens hold are dropped."""
    cache = PromptCache(0, 10_000, 1)
    assert cache.save([1, 2, 3])
    assert not cache.save([1, 2])  # held by [1, 2, 3]
    assert cache.save([1, 2, 3, 4])  # holds [1, 2, 3], which goes
    assert list(cache.entries) == [[1, 2, 3, 4]]


def test_loading_moves_the_best_entry_and_honours_f_keep() -> None:
    """An empty slot loads the entry with the best f_keep and similarity, which leaves the
    cache; an entry that would keep under a quarter of its tokens is never loaded; a slot
    already keeping more than an entry would is left alone; a pinned empty slot never loads."""
    cache = PromptCache(0, 10_000, 1)
    cache.save([1, 2, 3, 4, 5, 6, 7, 8])
    cache.save([1, 9, 9, 9])
    assert cache.load([], [1, 2, 3, 4, 10], empty_loads=False) is None
    assert cache.load([1, 2, 3, 4, 77], [1, 2, 3, 4, 10]) is None  # the slot keeps 4/5 already
    assert cache.load([], [1, 2, 3, 4, 10]) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert list(cache.entries) == [[1, 9, 9, 9]]
    cache.save([1] + list(range(100, 108)))
    assert cache.load([], [1, 50]) == [1, 9, 9, 9]  # keeps exactly 1/4: allowed
    assert cache.load([], [1, 100, 50]) is None  # the one left would keep 2/9 < 1/4


def test_byte_and_token_limits_drop_oldest_first_but_keep_one() -> None:
    """Over the byte budget the oldest entries go; one entry always stays."""
    cache = PromptCache(limit_bytes=10, n_ctx_total=1, bytes_per_token=1)
    cache.save([1] * 6)
    cache.save([2] * 6)
    assert cache.update() == 1 and list(cache.entries) == [[2] * 6]
    cache.save([3] * 20)
    cache.update()
    assert list(cache.entries) == [[3] * 20]  # alone and over the budget: kept
    unlimited = PromptCache(limit_bytes=0, n_ctx_total=10, bytes_per_token=DEFAULT_CACHE_BYTES_PER_TOKEN)
    unlimited.save([4] * 8)
    unlimited.save([5] * 8)
    unlimited.update()
    assert list(unlimited.entries) == [[5] * 8]  # -1: only the context-size token limit


def test_lru_ties_go_to_the_last_slot_and_similarity_needs_more_than_the_threshold() -> None:
    """A fresh server picks its last slot; a slot sharing exactly the threshold is not
    'similar'; a similar slot keeping at least half of its tokens is not saved to RAM."""

    class S:
        def __init__(self, id: int, tokens: list[int], t: float) -> None:
            self.id, self.tokens, self.t_last_used = id, tokens, t

    fresh = [S(0, [], -1), S(1, [], -1), S(2, [], -1)]
    choice = choose_slot(fresh, [BOS_ID, 5], 0.1)
    assert choice is not None and choice.slot.id == 2 and choice.reason == "lru"
    assert choice.update_cache and choice.empty_loads
    prompt = list(range(10))
    exactly = [S(0, [0, 99], 1.0), S(1, [], 2.0)]
    choice = choose_slot(exactly, prompt, 0.1)  # slot 0 shares 1/10: not above 0.10
    assert choice is not None and choice.slot.id == 0 and choice.reason == "lru"
    slots = [S(0, [0, 99], 1.0), S(1, [0, 1, 99], 2.0)]
    choice = choose_slot(slots, prompt, 0.1)
    assert choice is not None and choice.slot.id == 1 and choice.reason == "similarity"
    assert not choice.update_cache  # keeps 2 of its 3 tokens
    slots = [S(0, [0, 1] + [99] * 5, 1.0)]
    choice = choose_slot(slots, prompt, 0.1)
    assert choice is not None and choice.reason == "similarity" and choice.update_cache
    assert choose_slot([], prompt, 0.1) is None
