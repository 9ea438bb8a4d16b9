"""llama-server's prompt cache, as the simulator models it.

What a real llama-server (0c1e57098, the build the contract tests use) keeps
between requests, and how it picks a slot for a new one:

1. **Slot contents.** Each slot holds the tokens of its last task (prompt
   plus generated tokens but the last) after the task ends; an idle slot
   keeps them. A task reuses the longest common prefix (LCP) of the slot's
   tokens and its prompt (``cache_prompt``, default true) and always
   evaluates at least one prompt token again.
2. **Slot choice** (L{choose_slot}): a pinned ``id_slot`` first; else the
   idle, non-empty slot with the largest LCP / len(prompt) above
   ``--slot-prompt-similarity`` (default 0.10, 0 = off); else the least
   recently used idle slot (ties: the highest id, so a fresh server starts
   with its last slot).
3. **Host-memory cache** (L{PromptCache}, ``--cache-ram`` MiB, default
   8192, -1 = no byte limit, 0 = off). When the slot came from LRU, or from
   the similarity rule or a pin but would keep less than half of its tokens,
   the slot's tokens are saved to RAM (unless an entry already holds them)
   and the entry that beats the slot on both f_keep = LCP / len(entry) and
   f_sim = LCP / len(prompt) is moved into it; entries with f_keep < 0.25
   are never used. A pinned slot that is empty never loads (llama.cpp issue
   28139: its f_keep is NaN); an empty slot picked by LRU loads any entry.
   **Loading is a move**: the entry leaves RAM.
4. **Idle slots** (``--cache-idle-slots``, default on while the RAM cache is
   on): at each task launch every other idle slot is copied to RAM; with a
   unified KV pool (``-kvu``) it is then cleared.
5. **Limits.** Entries cost ``bytes_per_token`` each per token; the oldest
   entries go first once the bytes exceed the budget or the tokens exceed
   max(total context, budget / bytes per token); at least one entry stays.
   The limits apply right after a save, before the load: with room for two
   entries, A, B, C, D, A leaves C a miss too (measured on the real server).

The cache lives in the server's memory: a restart loses all of it.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

#: llama-server's default ``--slot-prompt-similarity``.
DEFAULT_SLOT_PROMPT_SIMILARITY = 0.1
#: llama-server's default ``--cache-ram`` in MiB.
DEFAULT_CACHE_RAM_MIB = 8192
#: KV bytes per token of a Llama-3-8B-class model in f16 (32 layers x 8 KV
#: heads x 128 dims x K and V x 2 bytes): 8 GiB hold about 65k tokens.
DEFAULT_CACHE_BYTES_PER_TOKEN = 131072
#: A slot that would keep less than this share of its tokens is saved to RAM first.
SAVE_BELOW_F_KEEP = 0.5
#: A RAM entry that would keep less than this share of its tokens is never loaded.
MIN_ENTRY_F_KEEP = 0.25

def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the common prefix of two token sequences.

    Compares 512-, then 64-token slices (C speed), then token by token inside
    the first slice that differs.
    """
    n = min(len(a), len(b))
    i = 0
    for chunk in (512, 64):
        while i + chunk <= n and a[i : i + chunk] == b[i : i + chunk]:
            i += chunk
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _pack(tokens: Sequence[int]) -> bytes | None:
    """Tokens as bytes (4 per token) for fast prefix comparison; None if they do not fit."""
    try:
        return array("I", tokens).tobytes()
    except (OverflowError, TypeError):
        return None


def _packed_prefix(a: bytes, b: bytes) -> int:
    """The common prefix of two packed sequences, in tokens (slice compares are memcmp)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n // 4
    low, high = 0, n  # a[:low] == b[:low]; a[:high] != b[:high]
    while high - low > 64:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    while low < high and a[low] == b[low]:
        low += 1
    return low // 4


class CachedSlot(Protocol):
    """What the cache model needs to know about a slot."""

    id: int
    tokens: list[int]
    t_last_used: float


@dataclass(frozen=True)
class Choice:
    """A slot for a task and whether the RAM cache is consulted for it.

    @ivar slot: the chosen slot.
    @ivar update_cache: save the slot to RAM and load the best entry into it.
    @ivar empty_loads: an empty slot may load an entry (not when pinned).
    @ivar reason: C{"pinned"}, C{"similarity"} or C{"lru"} (for logs and tests).
    """

    slot: CachedSlot
    update_cache: bool
    empty_loads: bool
    reason: str


def choose_slot(
    idle: Sequence[CachedSlot], prompt: Sequence[int], similarity: float
) -> Choice | None:
    """llama-server's choice among idle slots for an unpinned task (None: none idle).

    @param idle: the idle slots, in id order.
    @param similarity: ``--slot-prompt-similarity`` (0 turns the rule off).
    """
    if not idle:
        return None
    if similarity > 0 and prompt:
        best: CachedSlot | None = None
        best_sim = 0.0
        best_lcp = 0
        for slot in idle:
            if not slot.tokens:
                continue
            lcp = common_prefix(slot.tokens, prompt)
            sim = lcp / len(prompt)
            if sim > best_sim and sim > similarity:
                best, best_sim, best_lcp = slot, sim, lcp
        if best is not None:
            f_keep = best_lcp / len(best.tokens)
            return Choice(best, f_keep < SAVE_BELOW_F_KEEP, True, "similarity")
    lru = idle[0]
    for slot in idle[1:]:
        if slot.t_last_used <= lru.t_last_used:
            lru = slot
    return Choice(lru, True, True, "lru")


def pinned_choice(slot: CachedSlot, prompt: Sequence[int]) -> Choice:
    """The choice for a task pinned to C{slot} (``id_slot``): the RAM cache is
    consulted only when the slot would keep less than half of its tokens, and
    never for an empty slot."""
    if not slot.tokens:
        return Choice(slot, False, False, "pinned")
    f_keep = common_prefix(slot.tokens, prompt) / len(slot.tokens)
    return Choice(slot, f_keep < SAVE_BELOW_F_KEEP, False, "pinned")


class PromptCache:
    """One server's host-memory prompt cache: a FIFO list of token sequences.

    @param limit_bytes: the byte budget (``--cache-ram`` MiB x 2^20); 0 means
        no byte limit.
    @param n_ctx_total: the server's total context, the least token limit.
    @param bytes_per_token: what one cached token costs.
    """

    def __init__(self, limit_bytes: int, n_ctx_total: int, bytes_per_token: int) -> None:
        self.limit_bytes = max(0, limit_bytes)
        self.n_ctx_total = max(1, n_ctx_total)
        self.bytes_per_token = max(1, bytes_per_token)
        self.entries: deque[list[int]] = deque()
        self._live: set[int] = set()  # id() of every entry, for L{holds}
        self._packed: dict[int, bytes | None] = {}  # id() of an entry -> its tokens packed

    @property
    def n_tokens(self) -> int:
        """Tokens held in all entries."""
        return sum(len(entry) for entry in self.entries)

    @property
    def size_bytes(self) -> int:
        """Bytes held in all entries."""
        return self.n_tokens * self.bytes_per_token

    @property
    def limit_tokens(self) -> int:
        """The token limit: the total context, raised to what the byte budget holds."""
        if self.limit_bytes:
            return max(self.n_ctx_total, self.limit_bytes // self.bytes_per_token)
        return self.n_ctx_total

    def clear(self) -> None:
        """Forget every entry (the server restarted)."""
        self.entries.clear()
        self._live.clear()
        self._packed.clear()

    def holds(self, entry: list[int] | None) -> bool:
        """Whether C{entry} (as returned by L{save_entry}) is still in the cache."""
        return entry is not None and id(entry) in self._live

    def _remove(self, doomed: list[list[int]]) -> None:
        ids = {id(entry) for entry in doomed}
        self.entries = deque(entry for entry in self.entries if id(entry) not in ids)
        self._live -= ids
        for key in ids:
            self._packed.pop(key, None)

    def _prefixes(self, tokens: Sequence[int]) -> list[tuple[list[int], int]]:
        """Every entry with its common prefix with C{tokens}."""
        packed = _pack(tokens) if self.entries else None
        out = []
        for entry in self.entries:
            other = self._packed.get(id(entry))
            if packed is not None and other is not None:
                out.append((entry, _packed_prefix(other, packed)))
            else:
                out.append((entry, common_prefix(entry, tokens)))
        return out

    def save_entry(self, tokens: Sequence[int]) -> tuple[list[int] | None, bool]:
        """Copy a slot's tokens into the cache, as llama-server's ``alloc``.

        Nothing is saved when an entry already holds all of C{tokens}; entries
        that C{tokens} holds entirely are dropped. Call L{update} afterwards.

        @return: the entry holding C{tokens} now (None for no tokens), and
            whether it is a new one.
        """
        if not tokens:
            return None, False
        n = len(tokens)
        contained = []
        for entry, lcp in self._prefixes(tokens):
            if lcp == n:
                return entry, False
            if lcp == len(entry):
                contained.append(entry)
        if contained:
            self._remove(contained)
        entry = list(tokens)
        self.entries.append(entry)
        self._live.add(id(entry))
        self._packed[id(entry)] = _pack(entry)
        return entry, True

    def save(self, tokens: Sequence[int]) -> bool:
        """L{save_entry}; whether a new entry was added."""
        return self.save_entry(tokens)[1]

    def load(
        self, slot_tokens: Sequence[int], prompt: Sequence[int], empty_loads: bool = True
    ) -> list[int] | None:
        """Move the entry that suits C{prompt} better than the slot out of the cache.

        @param slot_tokens: what the slot holds now.
        @param empty_loads: whether an empty slot may load (False when pinned).
        @return: the entry's tokens (now removed from the cache), or None.
        """
        if not prompt:
            return None
        lcp_slot = common_prefix(slot_tokens, prompt)
        if slot_tokens:
            f_keep_best = lcp_slot / len(slot_tokens)
        else:
            f_keep_best = -1.0 if empty_loads else math.nan
        sim_best = lcp_slot / len(prompt)
        best: list[int] | None = None
        for entry, lcp in self._prefixes(prompt):
            f_keep = lcp / len(entry)
            if f_keep < MIN_ENTRY_F_KEEP:
                continue
            sim = lcp / len(prompt)
            if f_keep_best < f_keep and sim_best < sim:
                best, f_keep_best, sim_best = entry, f_keep, sim
        if best is None:
            return None
        self._remove([best])
        return best

    def update(self) -> int:
        """Drop the oldest entries beyond the limits (at least one entry stays).

        @return: how many entries were dropped.
        """
        dropped = 0
        n_tokens = self.n_tokens
        if self.limit_bytes:
            while len(self.entries) > 1 and n_tokens * self.bytes_per_token > self.limit_bytes:
                n_tokens -= len(self._pop_oldest())
                dropped += 1
        limit = self.limit_tokens
        while len(self.entries) > 1 and n_tokens > limit:
            n_tokens -= len(self._pop_oldest())
            dropped += 1
        return dropped

    def _pop_oldest(self) -> list[int]:
        entry = self.entries.popleft()
        self._live.discard(id(entry))
        self._packed.pop(id(entry), None)
        return entry
