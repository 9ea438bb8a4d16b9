"""Routing: the per-upstream prefix index (paddler.routing.prefix)."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paddler.routing.prefix import (
    BLOCK_CHARS,
    BYTES_PER_ENTRY,
    PrefixIndex,
    SHRINK,
    block_hashes,
    blocks_to_tokens,
    tokens_to_blocks,
)


def text(seed: int, chars: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghij klmnop") for _ in range(chars))


SYSTEM = text(1, 64 * 40)  # 40 blocks


def test_blocks_are_chained_whole_blocks() -> None:
    """Only whole blocks count; equal prefixes give equal leading hashes; a change in
    block 0 changes every later hash (chaining)."""
    a = block_hashes(SYSTEM + "tail one" * 20)
    b = block_hashes(SYSTEM + "tail two" * 20)
    assert len(block_hashes("x" * (BLOCK_CHARS * 3 + 10))) == 3
    assert a[:40] == b[:40] and a[40] != b[40]
    changed = block_hashes("Z" + SYSTEM[1:])
    assert all(x != y for x, y in zip(changed, block_hashes(SYSTEM)))
    assert block_hashes("") == [] and block_hashes("short") == []
    assert blocks_to_tokens(4) == 4 * BLOCK_CHARS // 4 and tokens_to_blocks(blocks_to_tokens(7)) == 7


def test_match_counts_the_leading_blocks_an_upstream_served() -> None:
    """After recording S+a on u1, S+b matches S's 40 blocks there, nothing on u2; S+a matches whole."""
    index = PrefixIndex(max_blocks=1000)
    s_a = block_hashes(SYSTEM + text(2, 640))
    s_b = block_hashes(SYSTEM + text(3, 640))
    index.record("u1", s_a)
    assert index.match("u1", s_b) == 40
    assert index.match("u1", s_a) == len(s_a)
    assert index.match("u2", s_b) == 0
    assert index.match("u1", []) == 0
    assert index.match_all(["u1", "u2"], s_b) == {"u1": 40, "u2": 0}


def test_eviction_drops_the_ends_of_old_prompts_before_shared_heads() -> None:
    """At most max_blocks are held; recording touches blocks last-to-first, so the shared
    system prompt outlives the tails of older conversations, and a stream of new prompts
    pushes old ones out entirely."""
    index = PrefixIndex(max_blocks=200)
    conversations = [block_hashes(SYSTEM + text(10 + i, 64 * 15)) for i in range(8)]  # 55 blocks
    for blocks in conversations:
        index.record("u", blocks)
        assert index.stats("u").blocks <= 200
    assert index.match("u", conversations[-1]) == 55
    assert index.match("u", conversations[0]) == 40  # its tail is gone, the shared head is not
    for seed in range(20, 30):
        index.record("u", block_hashes(text(seed, 64 * 60)))
    assert index.match("u", conversations[-1]) == 0
    assert 100 <= index.stats("u").blocks <= 200


def test_a_prompt_longer_than_the_capacity_keeps_its_head() -> None:
    """Recording more blocks than the capacity keeps the first capacity-worth of them."""
    index = PrefixIndex(max_blocks=10)
    long = block_hashes(text(7, 64 * 50))
    index.record("u", long)
    assert index.match("u", long) == 10
    index.record("u", long)
    assert index.match("u", long) == 10 and index.stats("u").blocks <= 10


def test_the_oldest_entry_is_evicted_first_and_a_restored_one_comes_back_last() -> None:
    """Room for two 40-block entries: A, B, C leaves B and C (A, the oldest, is gone); A again
    is a miss, and B restored goes back last, so after D, B is kept and C is the next to go
    (llama-server's RAM FIFO with loading as a move: reference, section 1)."""
    index = PrefixIndex(max_blocks=80)
    a, b, c, d = (block_hashes(text(seed, 64 * 40)) for seed in (50, 51, 52, 53))
    for blocks in (a, b, c):
        index.record("u", blocks)
    assert [index.match("u", x) for x in (a, b, c)] == [0, 40, 40]
    index.record("u", b)  # restored: moves out, back in as the newest
    index.record("u", d)
    assert [index.match("u", x) for x in (b, c, d)] == [40, 0, 40]


def test_a_restored_entry_leaves_the_cache_so_a_shared_prefix_is_reused_once() -> None:
    """S+a, then S+b (restores S+a's entry into a slot: a move), then S+a matches only S."""
    index = PrefixIndex(max_blocks=1000)
    s_a = block_hashes(SYSTEM + text(2, 640))
    s_b = block_hashes(SYSTEM + text(3, 640))
    index.record("u", s_a)
    assert index.match("u", s_b) == 40
    index.record("u", s_b)
    assert index.match("u", s_a) == 40 and index.match("u", s_b) == len(s_b)


def test_a_shared_prefix_taken_from_an_entry_in_a_slot_moves_nothing() -> None:
    """On a 2-slot upstream, S+a then S+b: S+a is one of the two newest entries (in a slot,
    which llama-server also copies to RAM), so S+b reuses S from that slot and S+a stays whole;
    with two prompts in between (S+a no longer among the newest two) S+b's load moves it."""
    s_a = block_hashes(SYSTEM + text(2, 640))
    s_b = block_hashes(SYSTEM + text(3, 640))
    x, y = (block_hashes(text(seed, 640 * 3)) for seed in (4, 5))
    kept = PrefixIndex(max_blocks=1000)
    kept.record("u", s_a, slots=2)
    kept.record("u", s_b, slots=2)
    assert kept.match("u", s_a) == len(s_a) and kept.match("u", s_b) == len(s_b)
    moved = PrefixIndex(max_blocks=1000)
    for blocks in (s_a, x, y, s_b):
        moved.record("u", blocks, slots=2)
    assert moved.match("u", s_a) == 40 and moved.match("u", x) == len(x) == moved.match("u", y)


def test_an_entry_the_request_keeps_under_a_quarter_of_is_no_hit() -> None:
    """T (10 blocks) + 100 blocks cached: T + q keeps 10 % of that entry: no hit (f_keep < 0.25);
    an entry of 30 blocks with the same head qualifies (33 %)."""
    index = PrefixIndex(max_blocks=1000)
    head = SYSTEM[: 64 * 10]
    index.record("u", block_hashes(head + text(60, 64 * 100)))
    probe = block_hashes(head + text(61, 64 * 5))
    assert index.match("u", probe) == 0
    index.record("u", block_hashes(head + text(62, 64 * 20)))
    assert index.match("u", probe) == 10


def test_forget_drops_an_upstream() -> None:
    """forget (left, restarted, cache reset) empties that upstream only."""
    index = PrefixIndex()
    blocks = block_hashes(SYSTEM)
    index.record("u1", blocks)
    index.record("u2", blocks)
    index.forget("u1")
    index.forget("unknown")
    assert index.match("u1", blocks) == 0 and index.match("u2", blocks) == 40
    assert index.upstreams() == ["u2"] and index.forgotten == 1


def test_verify_shrinks_capacity_on_a_wrong_prediction_and_keeps_the_prompt() -> None:
    """The server reused 10 of 40 predicted blocks: capacity shrinks, but the prompt it has
    just evaluated stays indexed; a confirmed prediction regrows capacity."""
    index = PrefixIndex(max_blocks=1000)
    blocks = block_hashes(SYSTEM)
    index.record("u", blocks)
    predicted = index.match("u", blocks)
    assert index.verify("u", blocks, predicted, cache_n=blocks_to_tokens(predicted) - 1)
    assert index.stats("u").verified_hits == 1
    assert not index.verify("u", blocks, predicted, cache_n=blocks_to_tokens(10))
    stats = index.stats("u")
    assert index.match("u", blocks) == 40
    assert stats.verified_misses == 1 and stats.capacity == int(1000 * SHRINK)
    assert stats.tokens_saved == blocks_to_tokens(predicted) - 1 + blocks_to_tokens(10)
    assert index.verify("u", blocks, 0, cache_n=0)  # nothing predicted: nothing to check
    for _ in range(100):
        index.verify("u", blocks, 10, cache_n=blocks_to_tokens(10))
    assert index.stats("u").capacity == 1000


def test_one_wrong_prediction_costs_little_capacity() -> None:
    """A server that evicted one prefix (a real miss among hits) must not make the index forget
    most of what it knows: one miss takes at most 5 % of the capacity, and a few confirmed hits
    give it back (measured: shrinking by a quarter per miss left the fast servers' indexes at a
    quarter of their size on the multi-turn trace and doubled the moved conversations)."""
    index = PrefixIndex(max_blocks=4096)
    blocks = block_hashes(SYSTEM)
    index.record("u", blocks)
    predicted = index.match("u", blocks)
    index.verify("u", blocks, predicted, cache_n=0)
    assert index.stats("u").capacity >= 0.95 * 4096
    for _ in range(16):
        index.verify("u", blocks[:10], 10, cache_n=blocks_to_tokens(10))
    assert index.stats("u").capacity == 4096


def test_a_small_shortfall_is_not_a_wrong_prediction() -> None:
    """Reusing a couple of blocks less than predicted (text vs token boundaries) is a hit."""
    index = PrefixIndex()
    blocks = block_hashes(SYSTEM)
    index.record("u", blocks)
    assert index.verify("u", blocks, 40, cache_n=blocks_to_tokens(38))
    assert index.match("u", blocks) == 40


def test_bad_capacity_is_refused() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(max_blocks=0)


def test_bytes_per_entry_as_documented() -> None:
    """tracemalloc under churn: the index never holds more than about BYTES_PER_ENTRY bytes
    per block of capacity (the hash ints included)."""
    capacity = 4096
    texts = [text(100 + seed, 64 * capacity // 3) for seed in range(20)]
    index = PrefixIndex(max_blocks=capacity)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    peak = 0
    for prompt in texts:
        blocks = block_hashes(prompt)
        index.record("u", blocks)
        del blocks
        peak = max(peak, tracemalloc.get_traced_memory()[0] - before)
    tracemalloc.stop()
    per_entry = peak / capacity
    assert BYTES_PER_ENTRY * 0.5 <= per_entry <= BYTES_PER_ENTRY * 1.1, per_entry


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 30), st.integers(1, 80)),
                max_size=40))
@settings(max_examples=100, deadline=None)
def test_memory_never_exceeds_the_bound(records: list[tuple[str, int, int]]) -> None:
    """Property: whatever is recorded, each upstream holds at most max_blocks entries and the
    traced memory stays under upstreams x max_blocks x BYTES_PER_ENTRY (plus a fixed few KB
    per upstream for its containers)."""
    index = PrefixIndex(max_blocks=50)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for upstream, seed, n_blocks in records:
        index.record(upstream, block_hashes(text(seed, 64 * n_blocks)))
        assert all(index.stats(u).blocks <= 50 for u in index.upstreams())
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert index.total_blocks <= len(index.upstreams()) * 50
    containers = 4096 * len(index.upstreams())  # small sets have a minimum table, plus the objects
    assert used <= index.memory_bound + containers


@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(1, 40))
@settings(max_examples=100, deadline=None)
def test_binary_search_match_equals_a_linear_scan(seeds: list[int], capacity: int) -> None:
    """Property: match (binary search) equals the longest run of leading blocks some entry holds,
    when an entry holding that run keeps a quarter of itself (else 0)."""
    index = PrefixIndex(max_blocks=capacity)
    for seed in seeds:
        index.record("u", block_hashes(SYSTEM[: 64 * (seed + 1)] + text(seed, 64 * 8)))
    probe = block_hashes(SYSTEM[:64 * 3] + text(seeds[-1], 64 * 8))
    entries = index._upstreams["u"]
    linear = 0
    for block in probe:
        if block not in entries:
            break
        linear += 1
    qualifies = any(
        len(entry) <= 4 * linear and tuple(entry[:linear]) == tuple(probe[:linear])
        for entry in entries.entries.values()
    )
    assert index.match("u", probe) == (linear if qualifies else 0)
