"""A bounded, approximate index of the prompt prefixes each upstream has served.

**Blocks.** The stable prompt text (L{paddler.routing.prompt}) is cut into
blocks of L{BLOCK_CHARS} = 64 characters (about 16 tokens at 4 characters
per token, llm-d's block size); the last, partial block is ignored. Block
*i*'s hash is ``hash((hash(i - 1), block i))``: chained, so a hit on block
*i* stands for the whole prefix up to it, and one dictionary lookup answers
"has this upstream seen these first *i* blocks?". A prompt gives at most
64 Ki / 64 = 1024 blocks.

**Hash.** Python's built-in ``hash`` of a tuple of the previous hash and the
block string: SipHash-1-3 over the string (64 bits, C speed: 320 blocks of a
20 KB prompt in about 20 µs, faster than ``xxhash`` called per block from
Python and than ``hashlib``), keyed per process by ``PYTHONHASHSEED``, so a
client cannot craft collisions with another tenant's prefix. Hashes are not
stable across processes: a shared (Redis) index would need a shared key
(``xxhash.xxh3_64`` with a configured seed is the drop-in then).

**Per upstream.** At most ``max_blocks`` block hashes, in a two-generation
approximation of an LRU: touched blocks go to the current set; when it
holds half the capacity it becomes the previous set and the older one is
dropped (so between half and all of the capacity is held once full).
L{PrefixIndex.record} touches a prompt's blocks from the last to the first,
so a prefix's first blocks are always at least as recent as its later ones:
eviction drops the ends of long prompts before the shared heads, and
"block *i* present" implies "blocks before *i* present", which lets
L{PrefixIndex.match} binary-search (about 10 lookups per upstream for a
1024-block prompt). An ``OrderedDict`` LRU was measured too: 175 bytes per
entry under churn (deleted slots build up) against about 100 here.

**Memory.** One entry (set slot + the hash int) takes at most about
L{BYTES_PER_ENTRY} = 104 bytes, measured with tracemalloc under churn
(``tests/test_routing_prefix.py``), so the index holds at most
``upstreams x max_blocks x 104`` bytes: the default 4096 blocks per upstream
(65,536 tokens: the default 8 GiB ``--cache-ram`` of an 8B-parameter f16
model) is at most about 430 KB per upstream, 27 MB for 64 upstreams.

**Staying honest.** L{PrefixIndex.forget} drops an upstream (it left,
restarted, or reported a cache reset). L{PrefixIndex.verify} compares a
prediction with the ``timings.cache_n`` the server reported: when it reused
much less, the blocks of that prefix from the first one it did not reuse
are dropped for that upstream, and the upstream's capacity estimate shrinks
by L{SHRINK} (3 %: its cache holds less than the index assumed); confirmed
hits let the capacity grow back to ``max_blocks``. (Shrinking by a quarter
per miss was measured on the multi-turn benchmark: a few real evictions
left the fast servers' indexes at a quarter of their size, they forgot the
conversations they still held, and moved conversations doubled.)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from paddler.routing.prompt import CHARS_PER_TOKEN

#: Characters per block.
BLOCK_CHARS = 64
#: Default capacity of one upstream's LRU, in blocks.
DEFAULT_MAX_BLOCKS = 4096
#: Bytes one index entry takes at most (measured with tracemalloc; see the module docstring).
BYTES_PER_ENTRY = 104
#: A prediction is wrong when the server reused less than this share of it ...
VERIFY_TOLERANCE = 0.5
#: ... and more than this many blocks less.
VERIFY_SLACK_BLOCKS = 2
#: On a wrong prediction the upstream's capacity is multiplied by this (gently: see the docstring) ...
SHRINK = 0.97
#: ... but not below this share of max_blocks.
MIN_CAPACITY_SHARE = 0.125
#: Blocks of capacity regained per confirmed hit.
GROW_BLOCKS = 16

_SEED = hash("paddler.routing.prefix")


def block_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[int]:
    """The chained hashes of the whole blocks of C{text}."""
    hashes: list[int] = []
    previous = _SEED
    append = hashes.append
    for start in range(0, len(text) - block_chars + 1, block_chars):
        previous = hash((previous, text[start : start + block_chars]))
        append(previous)
    return hashes


def blocks_to_tokens(blocks: int, block_chars: int = BLOCK_CHARS) -> int:
    """The tokens that C{blocks} blocks stand for (at L{CHARS_PER_TOKEN})."""
    return blocks * block_chars // CHARS_PER_TOKEN


def tokens_to_blocks(tokens: int, block_chars: int = BLOCK_CHARS) -> int:
    """The whole blocks that C{tokens} tokens cover (at L{CHARS_PER_TOKEN})."""
    return max(0, tokens) * CHARS_PER_TOKEN // block_chars


@dataclass
class PrefixStats:
    """What the index knows about one upstream, for ``/api/v1/state`` and metrics.

    @ivar blocks: block hashes held now.
    @ivar capacity: the current capacity estimate, in blocks.
    @ivar recorded: prompts recorded.
    @ivar verified_hits: predictions the server confirmed.
    @ivar verified_misses: predictions the server contradicted (entries dropped).
    @ivar tokens_saved: prompt tokens the server reported reused (sum of ``cache_n``).
    """

    blocks: int = 0
    capacity: int = 0
    recorded: int = 0
    verified_hits: int = 0
    verified_misses: int = 0
    tokens_saved: int = 0


class _Upstream:
    """One upstream's blocks: a two-generation approximation of an LRU.

    New and touched blocks go to C{current}; when it holds half the capacity
    it becomes C{previous} (the older one is dropped). At most C{capacity}
    blocks are held, at least half of it once full: about 100 bytes each
    (set slots + the hash int), with no deleted-slot build-up under churn.
    """

    __slots__ = ("current", "previous", "capacity", "stats")

    def __init__(self, capacity: int) -> None:
        self.current: set[int] = set()
        self.previous: set[int] = set()
        self.capacity = capacity
        self.stats = PrefixStats(capacity=capacity)

    def __len__(self) -> int:
        return len(self.current) + len(self.previous)

    def __contains__(self, block: int) -> bool:
        return block in self.current or block in self.previous

    def touch(self, block: int) -> None:
        current = self.current
        if block in current:
            return
        self.previous.discard(block)
        current.add(block)
        if len(current) >= max(1, self.capacity // 2):
            self.previous = current
            self.current = set()

    def discard(self, block: int) -> None:
        self.current.discard(block)
        self.previous.discard(block)

    def fit(self) -> None:
        """Drop generations until at most C{capacity} blocks are held."""
        if len(self) > self.capacity:
            self.previous = set()
        if len(self.current) > self.capacity:
            self.current = set()
        self.stats.blocks = len(self)


class PrefixIndex:
    """Per-upstream LRU indexes of chained block hashes. Pure: no clock, no I/O.

    @param max_blocks: the most block hashes kept per upstream.
    """

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be at least 1, got {max_blocks}")
        self.max_blocks = max_blocks
        self._upstreams: dict[Hashable, _Upstream] = {}
        #: Upstreams forgotten so far.
        self.forgotten = 0

    def _get(self, upstream_id: Hashable) -> _Upstream:
        entry = self._upstreams.get(upstream_id)
        if entry is None:
            entry = self._upstreams[upstream_id] = _Upstream(self.max_blocks)
        return entry

    @property
    def total_blocks(self) -> int:
        """Block hashes held for all upstreams."""
        return sum(len(entry) for entry in self._upstreams.values())

    @property
    def memory_bound(self) -> int:
        """The most bytes the entries can take with the upstreams known now."""
        return len(self._upstreams) * self.max_blocks * BYTES_PER_ENTRY

    def upstreams(self) -> list[Hashable]:
        """The upstreams the index holds anything for."""
        return list(self._upstreams)

    def match(self, upstream_id: Hashable, blocks: Sequence[int]) -> int:
        """How many leading C{blocks} the upstream has served (does not touch the LRU)."""
        entry = self._upstreams.get(upstream_id)
        if entry is None or not blocks or not len(entry):
            return 0
        lru = entry
        if blocks[-1] in lru:
            return len(blocks)
        low, high = 0, len(blocks) - 1  # blocks[high] is absent
        while low < high:
            middle = (low + high) // 2
            if blocks[middle] in lru:
                low = middle + 1
            else:
                high = middle
        return low

    def match_all(self, upstream_ids: Sequence[Hashable], blocks: Sequence[int]) -> dict[Hashable, int]:
        """L{match} for several upstreams."""
        return {upstream_id: self.match(upstream_id, blocks) for upstream_id in upstream_ids}

    def record(self, upstream_id: Hashable, blocks: Sequence[int]) -> None:
        """The upstream is about to hold these blocks (call it when dispatching there)."""
        entry = self._get(upstream_id)
        entry.stats.recorded += 1
        touch = entry.touch
        # At most half the capacity (one generation), so a long prompt keeps its head.
        for block in reversed(blocks[: max(1, entry.capacity // 2)]):
            touch(block)
        entry.stats.blocks = len(entry)

    def verify(
        self, upstream_id: Hashable, blocks: Sequence[int], predicted_blocks: int, cache_n: int
    ) -> bool:
        """Check a prediction against the server's ``timings.cache_n``.

        @param blocks: the request's block hashes.
        @param predicted_blocks: what L{match} said before dispatching.
        @param cache_n: the prompt tokens the server reported reused.
        @return: True when the prediction held (or there was none), False
            when the server reused much less: then the blocks of this prefix
            from the first one it did not reuse are dropped for the upstream,
            and its capacity shrinks.
        """
        entry = self._upstreams.get(upstream_id)
        if entry is None:
            return True
        stats = entry.stats
        stats.tokens_saved += max(0, cache_n)
        if predicted_blocks <= 0:
            return True
        reused = tokens_to_blocks(cache_n)
        if reused >= predicted_blocks * VERIFY_TOLERANCE or predicted_blocks - reused <= VERIFY_SLACK_BLOCKS:
            stats.verified_hits += 1
            entry.capacity = min(self.max_blocks, entry.capacity + GROW_BLOCKS)
            stats.capacity = entry.capacity
            return True
        stats.verified_misses += 1
        for block in blocks[reused:]:
            entry.discard(block)
        floor = max(1, int(self.max_blocks * MIN_CAPACITY_SHARE))
        entry.capacity = max(floor, int(entry.capacity * SHRINK))
        stats.capacity = entry.capacity
        entry.fit()
        return False

    def forget(self, upstream_id: Hashable) -> None:
        """Drop everything about an upstream (it left, restarted, or lost its cache)."""
        if self._upstreams.pop(upstream_id, None) is not None:
            self.forgotten += 1

    def stats(self, upstream_id: Hashable) -> PrefixStats:
        """A copy of one upstream's figures (zeros for an unknown upstream)."""
        entry = self._upstreams.get(upstream_id)
        if entry is None:
            return PrefixStats(capacity=self.max_blocks)
        stats = entry.stats
        return PrefixStats(
            blocks=len(entry), capacity=entry.capacity, recorded=stats.recorded,
            verified_hits=stats.verified_hits, verified_misses=stats.verified_misses,
            tokens_saved=stats.tokens_saved,
        )
