"""Contract tests of the prompt cache: the simulator's accounting against a real llama-server.

Each case replays one sequence of the reference's experiment table
(prompt-aware routing, section 1) against a ``paddler simulate`` subprocess
and against the real server built from the llama-cpp-python sdist (marked
``llamacpp``), and checks ``timings.cache_n`` / ``prompt_n``. The two
tokenizers differ (the real vocabulary splits some words), so the checks
are exact where they do not depend on it (a hit evaluates exactly one token;
``cache_n`` equals an earlier request's ``tokens_evaluated``) and otherwise
by relation (a miss shares at most BOS and a token or two; a shared prefix
reuses about as many tokens as the server's own ``/tokenize`` counts).

Cases that need the simulator's prompt-cache flags (``--cache-ram``,
``--cache-bytes-per-token``) skip on the simulator while ``paddler simulate``
does not offer them.
"""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tests.llamacpp.clients import get_json, metric, post
from tests.llamacpp.conftest import ROOT

#: Context of each slot on both servers (the tiny model's trained context).
SLOT_CTX = 2048
#: A miss still shares BOS, and a word or two by chance.
MISS = 3
#: Common English words; most are one token in llama's vocabulary and in the simulator's.
WORDS = (
    "the slot model token server queue prompt cache of and a to in is that for it with "
    "balance load stream reply quick brown fox over lazy dog river boat water"
).split()
#: The simulator's flags for the real tiny model's KV state (about 1 KiB per token).
SIM_TINY_KV = ["--cache-bytes-per-token", "1024"]


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


A, B, C, D, X = (words(seed, 1100) for seed in (1, 2, 3, 4, 7))


@functools.cache
def simulator_flags() -> str:
    """``paddler simulate --help`` of this checkout, to see which flags it offers."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "paddler", "simulate", "--help"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    return result.stdout + result.stderr


@dataclass
class Server:
    """One server under contract."""

    kind: str
    url: str

    def run(self, prompt: str, **fields: Any) -> dict[str, Any]:
        """One /completion with one generated token; the fields llama-server reports."""
        reply = post(self.url, "/completion", {"prompt": prompt, "n_predict": 1, **fields})
        assert reply.status == 200, reply
        body = reply.json()
        return {
            "id_slot": body["id_slot"],
            "evaluated": body["tokens_evaluated"],
            "cached": body["tokens_cached"],
            "cache_n": body["timings"]["cache_n"],
            "prompt_n": body["timings"]["prompt_n"],
        }

    def count(self, text: str) -> int:
        """Tokens of C{text} with BOS, by the server's own tokenizer."""
        reply = post(self.url, "/tokenize", {"content": text, "add_special": True})
        return len(reply.json()["tokens"])


StartServer = Callable[..., Server]


@pytest.fixture(params=["simulator", pytest.param("llama-server", marks=pytest.mark.llamacpp)])
def server(request: pytest.FixtureRequest) -> StartServer:
    """Factory: ``server(slots, real=[...], sim=[...])`` starts the parametrised kind with
    ``SLOT_CTX`` per slot; C{real} and C{sim} are extra flags for each kind."""
    kind = request.param
    processes = request.getfixturevalue(
        "start_simulator" if kind == "simulator" else "start_llama_server"
    )

    def start(slots: int = 1, real: Sequence[str] = (), sim: Sequence[str] = ()) -> Server:
        if kind == "simulator":
            missing = [flag for flag in sim if flag.startswith("--") and flag not in simulator_flags()]
            if missing:
                pytest.skip(f"paddler simulate does not offer {', '.join(missing)} yet")
            url = processes(slots=slots, n_ctx=SLOT_CTX, tokens_per_second=1000, extra_args=list(sim))
        else:
            url = processes(slots=slots, ctx=slots * SLOT_CTX, extra_args=list(real))
        return Server(kind, url)

    return start


def test_a_b_c_then_a_is_restored_from_host_memory(server: StartServer) -> None:
    """-np 1: A, B, C are misses; A again evaluates one token (its entry moved back from RAM);
    B plus 8 words reuses exactly B's tokens."""
    s = server(slots=1)
    first = s.run(A)
    assert (first["cache_n"], first["prompt_n"]) == (0, first["evaluated"])
    assert first["cached"] == first["evaluated"]  # n_predict 1: prompt + 1 - 1
    b = s.run(B)
    assert b["cache_n"] <= MISS and s.run(C)["cache_n"] <= MISS
    again = s.run(A)
    assert (again["cache_n"], again["prompt_n"]) == (first["evaluated"] - 1, 1)
    longer = s.run(B + " " + words(9, 8))
    assert longer["cache_n"] == b["evaluated"]
    assert longer["prompt_n"] == longer["evaluated"] - b["evaluated"]


def test_without_host_memory_only_the_slot_is_reused(server: StartServer) -> None:
    """--cache-ram 0: A after B and C on one slot is a miss."""
    s = server(slots=1, real=["--cache-ram", "0"], sim=["--cache-ram", "0"])
    for text in (A, B, C):
        s.run(text)
    assert s.run(A)["cache_n"] <= MISS


def test_the_oldest_host_memory_entry_is_evicted_first(server: StartServer) -> None:
    """--cache-ram 3 holds two ~1.1 MiB entries. After A, B, C, D the cache holds B and C:
    A is a miss, and saving D (before A's lookup) pushed B out, so C is a miss as well; a
    server that then repeats its last two prompts finds them."""
    s = server(slots=1, real=["--cache-ram", "3"], sim=["--cache-ram", "3", *SIM_TINY_KV])
    for text in (A, B, C, D):
        s.run(text)
    assert s.run(A)["cache_n"] <= MISS
    assert s.run(C)["cache_n"] <= MISS
    t = server(slots=1, real=["--cache-ram", "3"], sim=["--cache-ram", "3", *SIM_TINY_KV])
    for text in (A, B, C, D):
        t.run(text)
    assert t.run(C)["prompt_n"] == 1


def test_a_shared_prefix_is_reused_once_and_its_entry_moves(server: StartServer) -> None:
    """S+a, X, S+b, X, S+a with a 550-word S: S+b reuses S; X is a hit; the last S+a reuses
    only S, because S+b took S+a's entry (loading is a move)."""
    s = server(slots=1)
    shared = words(5, 550)
    s_a, s_b = shared + " " + words(6, 550), shared + " " + words(8, 550)
    n_shared = s.count(shared)
    s.run(s_a)
    s.run(X)
    reuse = s.run(s_b)["cache_n"]
    assert abs(reuse - n_shared) <= 2
    assert s.run(X)["prompt_n"] == 1
    last = s.run(s_a)
    assert abs(last["cache_n"] - n_shared) <= 2 and last["prompt_n"] > last["evaluated"] // 3


def test_an_entry_keeping_under_a_quarter_is_never_loaded(server: StartServer) -> None:
    """T+a (220 + 1100 words), X, T+q: T is under 25 % of T+a's entry: a miss."""
    s = server(slots=1)
    prefix = words(9, 220)
    s.run(prefix + " " + words(10, 1100))
    s.run(X)
    assert s.run(prefix + " " + words(11, 30))["cache_n"] <= MISS


def test_pinning_to_an_empty_slot_skips_host_memory_but_a_used_slot_loads(server: StartServer) -> None:
    """-np 2: A and X pinned to slot 0, then A pinned to the never used slot 1 is evaluated in
    full (cache_n 0); on another server whose slot 1 ran Y first, A is restored there."""
    s = server(slots=2)
    s.run(A, id_slot=0)
    s.run(X, id_slot=0)
    assert s.run(A, id_slot=1)["cache_n"] == 0
    t = server(slots=2)
    t.run(A, id_slot=0)
    t.run(words(12, 1100), id_slot=1)
    t.run(X, id_slot=0)
    assert t.run(A, id_slot=1)["prompt_n"] == 1


def test_an_empty_slot_picked_by_lru_loads_from_host_memory(server: StartServer) -> None:
    """-np 3: A then X pinned to slot 2; A unpinned goes to slot 1 (LRU, last id first) and
    is restored from RAM."""
    s = server(slots=3)
    s.run(A, id_slot=2)
    s.run(X, id_slot=2)
    again = s.run(A)
    assert again["id_slot"] == 1 and again["prompt_n"] == 1


def test_idle_slots_are_copied_to_host_memory(server: StartServer) -> None:
    """-np 3: A, B, C take slots 2, 1, 0; A' (70 % of A) overwrites slot 2 without saving it;
    A pinned to B's slot is restored all the same: A was copied while idle."""
    s = server(slots=3)
    assert [s.run(text)["id_slot"] for text in (A, B, C)] == [2, 1, 0]
    changed = s.run(A[: int(len(A) * 0.7)] + " " + words(20, 330))
    assert changed["id_slot"] == 2 and changed["cache_n"] > changed["evaluated"] // 2
    assert s.run(A, id_slot=1)["prompt_n"] == 1


def test_cache_prompt_false_evaluates_everything_then_the_prompt_is_cached(server: StartServer) -> None:
    """cache_prompt false: the slot holding the prompt is chosen, all of it is evaluated,
    and the next request with the cache on evaluates one token."""
    s = server(slots=2)
    first = s.run(A)
    uncached = s.run(A, cache_prompt=False)
    assert uncached["id_slot"] == first["id_slot"]
    assert (uncached["cache_n"], uncached["prompt_n"]) == (0, first["evaluated"])
    assert s.run(A)["prompt_n"] == 1


def test_prompt_tokens_total_counts_only_evaluated_tokens(server: StartServer) -> None:
    """llamacpp:prompt_tokens_total grows by prompt_n, prompt_tokens_cached_total by cache_n."""
    s = server(slots=1)
    results = [s.run(text) for text in (A, B, A)]
    assert metric(s.url, "prompt_tokens_total") == sum(r["prompt_n"] for r in results)
    assert metric(s.url, "prompt_tokens_cached_total") == sum(r["cache_n"] for r in results)


def test_an_idle_slot_shows_the_tokens_it_holds(server: StartServer) -> None:
    """/slots: a used idle slot shows its last task, n_prompt_tokens = tokens_cached of that
    task, zero prompt counters and a finished next_token; an unused one stays minimal."""
    s = server(slots=2)
    reply = post(s.url, "/completion", {"prompt": A, "n_predict": 5}).json()
    slots = get_json(s.url, "/slots")
    used = slots[reply["id_slot"]]
    assert list(used) == [
        "id", "n_ctx", "speculative", "is_processing", "id_task", "n_prompt_tokens",
        "n_prompt_tokens_processed", "n_prompt_tokens_cache", "params", "next_token",
    ]
    assert used["n_prompt_tokens"] == reply["tokens_cached"] == reply["tokens_evaluated"] + 4
    assert (used["n_prompt_tokens_processed"], used["n_prompt_tokens_cache"]) == (0, 0)
    assert used["next_token"][0]["has_next_token"] is False
    assert set(slots[1 - reply["id_slot"]]) == {"id", "n_ctx", "speculative", "is_processing"}


def test_a_second_chat_turn_reuses_the_first_turns_prompt(server: StartServer) -> None:
    """Chat turn 2 (turn 1 + the reply + a question) reuses at least turn 1's prompt but its
    last couple of tokens (the template's boundary), and reports it as cached_tokens."""
    s = server(slots=2)
    system = {"role": "system", "content": words(30, 300)}
    turn1 = [system, {"role": "user", "content": words(31, 20)}]
    first = post(s.url, "/v1/chat/completions", {"messages": turn1, "max_tokens": 8}).json()
    turn2 = turn1 + [first["choices"][0]["message"], {"role": "user", "content": words(32, 20)}]
    second = post(s.url, "/v1/chat/completions", {"messages": turn2, "max_tokens": 8}).json()
    cached = second["timings"]["cache_n"]
    assert first["usage"]["prompt_tokens"] - 3 <= cached < second["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == cached


def test_a_prompt_cached_on_a_server_is_warm_for_its_other_slot(server: StartServer) -> None:
    """-np 2: A and B take the two slots and come back to them; C then overwrites A's slot
    (A goes to RAM); A again lands on B's slot (LRU) and is restored there in full: a prompt
    cached on a server is warm for every slot of it (what paddler's prefix index assumes)."""
    s = server(slots=2)
    first = s.run(A)
    s.run(B)
    assert s.run(A)["id_slot"] == first["id_slot"]
    s.run(B)
    assert s.run(C)["id_slot"] == first["id_slot"]
    again = s.run(A)
    assert again["id_slot"] != first["id_slot"]
    assert (again["cache_n"], again["prompt_n"]) == (first["evaluated"] - 1, 1)
