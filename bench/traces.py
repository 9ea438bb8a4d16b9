"""Seeded conversation traces for the routing benchmarks.

A trace is a list of conversations; each has a start time, a system prompt
and turns. A turn is a user message, the number of tokens the assistant
replies with (``max_tokens`` + ``ignore_eos``, so lengths are exact) and the
think time before the user sends it (after the previous reply ended). The
client (L{bench.chatclient}) sends each turn as a chat completion carrying
the whole history so far, **with the assistant's real replies**: so turn *k*
shares with turn *k - 1* everything but the new user message, exactly as a
chat UI resends it.

Text is made of pseudo-words from a seeded vocabulary (2-9 letters, about
5.6 characters per word with its space): the simulator counts one token per
word, paddler's estimate assumes 4 characters per token, so estimates are
about 1.4x the simulator's counts, as they would be on real text with a
different tokenizer.

- L{multiturn}: conversations of several turns with growing histories; a
  share of them use one of a few shared system prompts, the rest a private
  one; Poisson conversation starts, exponential think times.
- L{shared_prefix}: many users, few long system prompts (Zipf-popular:
  one is hot), one or two turns each, Poisson arrivals.

Everything is a pure function of its arguments and seed.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import asdict, dataclass, field
from typing import Any

#: Pseudo-words in the vocabulary.
VOCABULARY_SIZE = 4000


def vocabulary(seed: int = 1234, size: int = VOCABULARY_SIZE) -> list[str]:
    """A seeded list of distinct pseudo-words (2-9 lower-case letters)."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < size:
        length = max(2, min(9, round(rng.gauss(4.6, 1.6))))
        words["".join(rng.choice(string.ascii_lowercase) for _ in range(length))] = None
    return list(words)


_VOCABULARY = vocabulary()


def text(rng: random.Random, words: int) -> str:
    """C{words} pseudo-words with a full stop every 8-20 words."""
    out: list[str] = []
    until_stop = rng.randint(8, 20)
    for _ in range(words):
        out.append(rng.choice(_VOCABULARY))
        until_stop -= 1
        if until_stop == 0:
            out[-1] += "."
            until_stop = rng.randint(8, 20)
    return " ".join(out)


def lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """A clipped log-normal integer with the given median."""
    return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))


@dataclass
class Turn:
    """One user message and the reply it asks for."""

    user: str
    max_tokens: int
    think: float  # seconds after the previous reply ended (0 for the first turn)


@dataclass
class Conversation:
    """A conversation: when it starts, its system prompt, its turns."""

    id: int
    start: float
    system: str
    system_key: str  # "shared-N" or "private-ID": which prompt it is, for reports
    turns: list[Turn] = field(default_factory=list)


@dataclass(frozen=True)
class MultiturnSpec:
    """The shape of a multi-turn trace (defaults: issue 13's 40 x 6, 1,500-token system prompts)."""

    conversations: int = 40
    turns: int = 6
    window: float = 30.0  # conversations start over this many seconds (Poisson)
    shared_prompts: int = 4
    shared_share: float = 0.5  # share of conversations that use a shared system prompt
    system_tokens: int = 1500
    user_median: float = 60.0
    reply_median: float = 120.0
    think_mean: float = 4.0


def multiturn(spec: MultiturnSpec, seed: int) -> list[Conversation]:
    """A seeded multi-turn trace (see the module docstring)."""
    rng = random.Random(seed)
    shared = [text(rng, spec.system_tokens) for _ in range(spec.shared_prompts)]
    rate = spec.conversations / spec.window if spec.window > 0 else math.inf
    t = 0.0
    out = []
    for index in range(spec.conversations):
        if index:
            t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
        if shared and rng.random() < spec.shared_share:
            which = rng.randrange(len(shared))
            system, key = shared[which], f"shared-{which}"
        else:
            system = text(rng, lognormal(rng, spec.system_tokens, 0.25, 200, 3 * spec.system_tokens))
            key = f"private-{index}"
        turns = []
        for k in range(spec.turns):
            turns.append(Turn(
                user=text(rng, lognormal(rng, spec.user_median, 0.7, 5, 400)),
                max_tokens=lognormal(rng, spec.reply_median, 0.6, 16, 400),
                think=0.0 if k == 0 else min(30.0, max(0.5, rng.expovariate(1.0 / spec.think_mean))),
            ))
        out.append(Conversation(index, t, system, key, turns))
    return out


@dataclass(frozen=True)
class SharedPrefixSpec:
    """The shape of a shared-prefix trace: many users, few long system prompts."""

    users: int = 150
    window: float = 30.0
    prompts: int = 3
    zipf: float = 1.2  # popularity of prompt i is proportional to 1 / (i + 1) ** zipf
    system_tokens: int = 2000
    user_median: float = 80.0
    reply_median: float = 60.0
    second_turn: float = 0.3  # share of users who ask a follow-up
    think_mean: float = 3.0


def shared_prefix(spec: SharedPrefixSpec, seed: int) -> list[Conversation]:
    """A seeded shared-prefix trace (see the module docstring)."""
    rng = random.Random(seed)
    prompts = [text(rng, spec.system_tokens) for _ in range(spec.prompts)]
    weights = [1.0 / (i + 1) ** spec.zipf for i in range(spec.prompts)]
    rate = spec.users / spec.window if spec.window > 0 else math.inf
    t = 0.0
    out = []
    for index in range(spec.users):
        if index:
            t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
        which = rng.choices(range(spec.prompts), weights)[0]
        turns = [Turn(text(rng, lognormal(rng, spec.user_median, 0.7, 5, 500)),
                      lognormal(rng, spec.reply_median, 0.6, 8, 300), 0.0)]
        if rng.random() < spec.second_turn:
            turns.append(Turn(text(rng, lognormal(rng, spec.user_median, 0.7, 5, 500)),
                              lognormal(rng, spec.reply_median, 0.6, 8, 300),
                              min(30.0, max(0.5, rng.expovariate(1.0 / spec.think_mean)))))
        out.append(Conversation(index, t, prompts[which], f"shared-{which}", turns))
    return out


def to_json(conversations: list[Conversation], **meta: Any) -> dict[str, Any]:
    """A trace as the client reads it."""
    return {**meta, "conversations": [asdict(c) for c in conversations]}


def sticky_assignment(conversations: int, slots: list[int]) -> list[int]:
    """The sticky ideal's server for each conversation, in start order: smooth
    weighted round robin by slots, so each server gets conversations in
    proportion to its slots and keeps them."""
    total = sum(slots)
    current = [0] * len(slots)
    out = []
    for _ in range(conversations):
        for i, weight in enumerate(slots):
            current[i] += weight
        best = max(range(len(slots)), key=lambda i: current[i])
        current[best] -= total
        out.append(best)
    return out


def totals(conversations: list[Conversation]) -> dict[str, Any]:
    """Sizes of a trace: requests, words sent and generated (for reports)."""
    requests = sum(len(c.turns) for c in conversations)
    generated = sum(t.max_tokens for c in conversations for t in c.turns)
    return {"conversations": len(conversations), "requests": requests, "generated_tokens": generated,
            "distinct_system_prompts": len({c.system_key for c in conversations})}
