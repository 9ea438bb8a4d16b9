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

**Per upstream: llama-server's host-memory prompt cache.** A server keeps
the prompts it evaluated in RAM (``--cache-ram``, on by default; see
``docs/routing.md``), one list per server, and any of its slots restores
any entry: so a prompt cached on a server is warm for every slot of it.
The index models that list, per upstream, from the prompts paddler sent
there (each entry is a prompt's whole chain of blocks, shared prefixes
counted once per entry, as the server stores them):

- *FIFO by capacity*: a new entry goes last; the oldest entries go first
  once the entries' blocks exceed the capacity (``max_blocks``; at least
  one entry stays, and a prompt longer than the capacity keeps its head).
  An entry that a new prompt contains entirely is dropped (the new one
  holds it).
- *Loading is a move*: the entry a request is predicted to restore leaves
  the list when the request is sent (the server loads it into a slot,
  and what comes back is the new prompt); so after S+a, X, Y then S+b on a
  2-slot server, S+a matches only S. *Except from a slot*: the newest
  ``slots`` entries stand for what the server's slots hold, and llama-server
  takes a prefix from an idle slot (``--slot-prompt-similarity``) after
  copying that slot to RAM (``--cache-idle-slots``): a match there moves
  nothing, so S+a then S+b leaves both whole. (Moving those too dropped a
  conversation's history whenever another conversation took their shared
  system prompt from it, and its next turn looked cold: replay of the
  two-real-servers trace, 20 seeds, 1.075 -> 1.031x the sticky ideal's
  prompt tokens.)
- *Quarter rule*: an entry is only restored when the request keeps at
  least L{MIN_ENTRY_F_KEEP} (a quarter) of it: a 10-block head shared
  with a 100-block entry is no hit.

L{PrefixIndex.match} finds the longest run of leading blocks some entry
holds by binary search (chained hashes: an entry holding block *i* holds
every block before it; about 10 lookups for a 1024-block prompt), then
applies the quarter rule to the entry that holds it.

**Memory.** One block of capacity (its hash int, its place in an entry's
tuple and in the block map) takes at most about L{BYTES_PER_ENTRY} bytes,
measured with tracemalloc under churn (``tests/test_routing_prefix.py``),
so the index holds at most ``upstreams x max_blocks x BYTES_PER_ENTRY``
bytes: the default 4096 blocks per upstream (65,536 tokens: the default
8 GiB ``--cache-ram`` of an 8B-parameter f16 model) is at most about
520 KB per upstream, 34 MB for 64 upstreams (116 bytes measured without shared heads).

**Staying honest.** L{PrefixIndex.forget} drops an upstream (it left,
restarted, or reported a cache reset). L{PrefixIndex.verify} compares a
prediction with the ``timings.cache_n`` the server reported: when it reused
much less, the upstream's capacity estimate shrinks by L{SHRINK} (3 %: its
cache holds less than the index assumed) and the oldest entries beyond it
go; the prompt itself stays (the server has just evaluated it); confirmed
hits let the capacity grow back to ``max_blocks``. (Shrinking by a quarter
per miss was measured on the multi-turn benchmark: a few real evictions
left the fast servers' indexes at a quarter of their size, they forgot the
conversations they still held, and moved conversations doubled.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from paddler.routing.prompt import CHARS_PER_TOKEN

#: Characters per block.
BLOCK_CHARS = 64
#: Default capacity of one upstream's LRU, in blocks.
DEFAULT_MAX_BLOCKS = 4096
#: Bytes one block of capacity takes at most (measured with tracemalloc; see the module docstring).
BYTES_PER_ENTRY = 128
#: An entry is restored only when the request keeps at least this share of it (llama-server's f_keep rule).
MIN_ENTRY_F_KEEP = 0.25
#: The entry a request restores leaves the cache (llama-server loads by moving).
MOVE_ON_LOAD = True
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
    """One upstream's host-memory cache as the index sees it: a FIFO of entries.

    C{entries} maps an entry's last block hash (chained: it names the whole
    prefix) to the entry's blocks, oldest first. C{owner} maps every block
    some entry holds to the newest such entry's key (it may name an entry
    gone since: then L{_Upstream.holder} looks again); C{shared} counts,
    for a block more than one entry holds, the entries beyond the first.
    """

    __slots__ = ("entries", "owner", "shared", "held", "capacity", "stats")

    def __init__(self, capacity: int) -> None:
        self.entries: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self.owner: dict[int, int] = {}
        self.shared: dict[int, int] = {}
        self.held = 0  # blocks in all entries (a shared head counts once per entry)
        self.capacity = capacity
        self.stats = PrefixStats(capacity=capacity)

    def __len__(self) -> int:
        return self.held

    def __contains__(self, block: int) -> bool:
        return block in self.owner

    def holder(self, block: int, position: int, most: int | None = None) -> int | None:
        """The key of an entry holding C{block} at C{position} (of at most C{most} blocks)."""
        key = self.owner.get(block)
        if key is None:
            return None
        entry = self.entries.get(key)
        if entry is not None and (most is None or len(entry) <= most):
            return key
        for key, entry in self.entries.items():
            if len(entry) > position and entry[position] == block and (most is None or len(entry) <= most):
                if most is None:
                    self.owner[block] = key
                return key
        return None

    def add(self, blocks: tuple[int, ...]) -> None:
        key = blocks[-1]
        if key in self.entries:
            self.remove(key)
        self.entries[key] = blocks
        owner, shared = self.owner, self.shared
        for block in blocks:
            if block in owner:
                shared[block] = shared.get(block, 0) + 1
            owner[block] = key
        self.held += len(blocks)

    def remove(self, key: int) -> None:
        blocks = self.entries.pop(key, None)
        if blocks is None:
            return
        owner, shared = self.owner, self.shared
        for block in blocks:
            extra = shared.get(block)
            if extra:
                if extra == 1:
                    del shared[block]
                else:
                    shared[block] = extra - 1
            else:
                owner.pop(block, None)
        self.held -= len(blocks)

    def in_slots(self, key: int, slots: int) -> bool:
        """Whether entry C{key} is one of the newest C{slots} entries (what the slots hold)."""
        if slots <= 0 or key not in self.entries:
            return False
        for position, newer in enumerate(reversed(self.entries)):
            if position >= slots:
                return False
            if newer == key:
                return True
        return False

    def fit(self) -> int:
        """Drop the oldest entries until the held blocks fit the capacity (one stays)."""
        dropped = 0
        while self.held > self.capacity and len(self.entries) > 1:
            self.remove(next(iter(self.entries)))
            dropped += 1
        self.stats.blocks = self.held
        return dropped


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

    def _lookup(self, entry: _Upstream, blocks: Sequence[int]) -> tuple[int, int | None]:
        """The leading blocks the upstream would restore for C{blocks}, and the entry they come from."""
        if not blocks or not entry.held:
            return 0, None
        owner = entry.owner
        if blocks[-1] in owner:
            matched = len(blocks)
        else:
            low, high = 0, len(blocks) - 1  # blocks[high] is absent
            while low < high:
                middle = (low + high) // 2
                if blocks[middle] in owner:
                    low = middle + 1
                else:
                    high = middle
            matched = low
        if not matched:
            return 0, None
        last = blocks[matched - 1]
        if last in entry.entries:
            return matched, last  # an entry that is exactly this prefix: all of it kept
        most = int(matched / MIN_ENTRY_F_KEEP)
        key = entry.holder(last, matched - 1)
        if key is not None and len(entry.entries[key]) > most:
            key = entry.holder(last, matched - 1, most)  # a shorter entry may still qualify
        if key is None:
            return 0, None
        return matched, key

    def match(self, upstream_id: Hashable, blocks: Sequence[int]) -> int:
        """How many leading C{blocks} the upstream would restore (changes nothing)."""
        entry = self._upstreams.get(upstream_id)
        if entry is None:
            return 0
        return self._lookup(entry, blocks)[0]

    def holds_entry(self, upstream_id: Hashable, key: int) -> bool:
        """Whether the upstream's cache holds the entry named C{key} (its last block hash)."""
        entry = self._upstreams.get(upstream_id)
        return entry is not None and key in entry.entries

    def newest_entry(self, upstream_id: Hashable) -> int | None:
        """The key of the entry recorded last on the upstream, if any."""
        entry = self._upstreams.get(upstream_id)
        if entry is None or not entry.entries:
            return None
        return next(reversed(entry.entries))

    def match_all(self, upstream_ids: Sequence[Hashable], blocks: Sequence[int]) -> dict[Hashable, int]:
        """L{match} for several upstreams."""
        return {upstream_id: self.match(upstream_id, blocks) for upstream_id in upstream_ids}

    def record(self, upstream_id: Hashable, blocks: Sequence[int], slots: int = 0) -> None:
        """The upstream is about to evaluate this prompt (call it when dispatching there):
        the entry it restores leaves the cache, entries the prompt contains are dropped,
        the prompt goes last, and the oldest entries beyond the capacity go.

        @param slots: the upstream's slots. Its newest C{slots} entries stand
            for what its slots hold: a prompt whose match is in one of them
            takes that slot and copies nothing out of RAM, so that entry stays
            (llama-server copies idle slots to RAM, ``--cache-idle-slots``); only
            a match in an older entry is a load from RAM, which moves it.
        """
        entry = self._get(upstream_id)
        entry.stats.recorded += 1
        if not blocks:
            return
        prompt = tuple(blocks[: max(1, entry.capacity)])  # a long prompt keeps its head
        matched, key = self._lookup(entry, prompt)
        if key is not None and MOVE_ON_LOAD and not entry.in_slots(key, slots):
            entry.remove(key)
        entries = entry.entries
        for block in prompt[:-1]:
            if block in entries:  # an entry that is a prefix of the prompt
                entry.remove(block)
        entry.add(prompt)
        entry.fit()

    def verify(
        self, upstream_id: Hashable, blocks: Sequence[int], predicted_blocks: int, cache_n: int
    ) -> bool:
        """Check a prediction against the server's ``timings.cache_n``.

        @param blocks: the request's block hashes.
        @param predicted_blocks: what L{match} said before dispatching.
        @param cache_n: the prompt tokens the server reported reused.
        @return: True when the prediction held (or there was none), False
            when the server reused much less: then the upstream's capacity
            shrinks and the oldest entries beyond it go (the prompt itself,
            just evaluated there, stays).
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
            blocks=entry.held, capacity=entry.capacity, recorded=stats.recorded,
            verified_hits=stats.verified_hits, verified_misses=stats.verified_misses,
            tokens_saved=stats.tokens_saved,
        )
