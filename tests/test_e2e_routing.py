"""End to end, real processes: ``paddler simulate --fleet 2`` (prompt cache on) behind
``paddler balancer`` with its default policy (``cache-aware``, no ``--policy``). A multi-turn
conversation stays where its history is
cached, ``X-Session-ID`` pins, and a hot shared prefix never puts a server above its slots."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from typing import Any

import pytest

from .processes import Processes, get_json, wait_for

pytestmark = pytest.mark.integration

WORDS = ("river", "boat", "paddle", "current", "water", "stone", "bank", "bridge", "fish", "reed")


def words(seed: int, count: int) -> str:
    return " ".join(f"{WORDS[(seed * 7 + i * 3) % len(WORDS)]}{(seed * 31 + i) % 97}" for i in range(count))


def fleet(procs: Processes, slots: int = 2, tokens_per_second: float = 200.0) -> list[str]:
    """Two simulated servers from one ``paddler simulate --fleet 2`` process."""
    process = procs.start(
        "simulate", "--fleet", "2", "--listen", "tcp:0:interface=127.0.0.1", "--slots", str(slots),
        "--tokens-per-second", str(tokens_per_second), "--n-ctx", "8192", name="simulate",
    )

    def announced() -> list[str]:
        if process.process.poll() is not None:
            raise AssertionError(f"simulator exited:\n{process.log()}")
        found = list(dict.fromkeys(re.findall(r"listening on (http://127\.0\.0\.1:\d+)", process.log())))
        return found if len(found) == 2 else []

    return wait_for(announced, 30, "two simulated servers")


def balancer(procs: Processes, servers: list[str]) -> str:
    args = ["--probe-interval", "0.2"]  # no --policy: the default, as the README runs it
    for url in servers:
        args += ["--upstream", url]
    _, proxy, _ = procs.balancer(*args)

    def healthy() -> bool:
        status, body = get_json(proxy + "/health")
        return status == 200 and body["upstreams"]["healthy"] == 2

    wait_for(healthy, 30, "both upstreams healthy")
    return proxy


def chat(proxy: str, messages: list[dict[str, str]], max_tokens: int = 8,
         headers: dict[str, str] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        proxy + "/v1/chat/completions",
        data=json.dumps({"messages": messages, "max_tokens": max_tokens, "ignore_eos": True}).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


def evaluated(server: str) -> float:
    """The server's ``llamacpp:prompt_tokens_total`` (prompt tokens it evaluated)."""
    with urllib.request.urlopen(server + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return float(re.search(r"^llamacpp:prompt_tokens_total (\S+)$", text, re.M).group(1))


def deferred(server: str) -> float:
    with urllib.request.urlopen(server + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return float(re.search(r"^llamacpp:requests_deferred (\S+)$", text, re.M).group(1))


def test_a_six_turn_conversation_stays_on_the_server_that_holds_its_history(procs: Processes) -> None:
    """Each turn resends the history with the real reply; with both servers idle, every turn
    after the first goes where the history is cached: only that server evaluates prompt tokens,
    and each turn reuses the previous turn's prompt (all but its last token)."""
    servers = fleet(procs)
    proxy = balancer(procs, servers)
    messages = [{"role": "system", "content": words(1, 400)}]
    previous_prompt = 0
    for turn in range(6):
        messages.append({"role": "user", "content": words(10 + turn, 30)})
        answer = chat(proxy, messages)
        timings = answer["timings"]
        if turn:
            # the template's newline before the reply joins the reply's first token: all but one
            assert timings["cache_n"] >= previous_prompt - 1, (turn, timings, previous_prompt)
        previous_prompt = timings["cache_n"] + timings["prompt_n"]
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
    counts = sorted(evaluated(server) for server in servers)
    assert counts[0] == 0 and counts[1] > 0


def test_x_session_id_pins_requests_without_a_shared_prefix(procs: Processes) -> None:
    """Requests of one session share no prefix at all, yet all go to the server of the first;
    the same holds for a second session (wherever it starts)."""
    servers = fleet(procs)
    proxy = balancer(procs, servers)
    for session in ("alpha", "beta"):
        before = [evaluated(server) for server in servers]
        for i in range(5):
            chat(proxy, [{"role": "user", "content": words(100 + i * 13 + len(session), 60)}],
                 headers={"X-Session-ID": session})
        grew = [evaluated(server) > b for server, b in zip(servers, before)]
        assert grew.count(True) == 1, (session, grew)


def test_a_hot_shared_prefix_never_puts_a_server_above_its_slots(procs: Processes) -> None:
    """Ten concurrent requests share one long system prompt, cached on one server after a warm-up:
    all succeed and neither server ever queues a request inside itself (``requests_deferred``
    stays 0 while they run): the warm server gets at most its slots, the rest wait in the
    balancer or go to the other server."""
    servers = fleet(procs, slots=2, tokens_per_second=40.0)
    proxy = balancer(procs, servers)
    system = {"role": "system", "content": words(7, 800)}
    chat(proxy, [system, {"role": "user", "content": "warm up"}])
    seen: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.extend(deferred(server) for server in servers)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            chat(proxy, [system, {"role": "user", "content": words(200 + i, 10)}], max_tokens=20)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    done.set()
    sampler.join(5)
    assert not errors
    assert seen and max(seen) == 0
