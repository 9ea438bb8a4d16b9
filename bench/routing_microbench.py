"""What routing costs per request: ``python -m bench.routing_microbench``.

Times, with C{timeit}, the steps the pool runs for one request with a 20 KB
prompt (a chat with a long system prompt, and a plain completion): deriving
the prompt, hashing its blocks, matching them against every upstream's
index (each holding its share of 64 earlier conversations), ranking, and
all of it through L{Router}. Prints microseconds per request for 8 and 64
upstreams. A report, not a test: the figures depend on the machine.
"""

from __future__ import annotations

import random
import timeit
from collections.abc import Callable

from twisted.internet.task import Clock

from paddler.routing.cost import rank
from paddler.routing.prefix import block_hashes
from paddler.routing.prompt import prompt_info
from paddler.routing.router import Router, UpstreamView

_WORDS = "river boat water slot token queue prompt cache model server fleet paddle".split()


def _text(seed: int, chars: int) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(_WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


def _per_call(function: Callable[[], object], budget: float = 0.3) -> float:
    """Microseconds per call, the best of 5 runs of about C{budget} / 5 seconds each."""
    number = 1
    while True:
        elapsed = timeit.timeit(function, number=number)
        if elapsed > budget / 5 or number > 1_000_000:
            break
        number *= 4
    best = min(timeit.repeat(function, number=number, repeat=5))
    return best / number * 1e6


def measure(upstreams: int) -> dict[str, float]:
    """Microseconds per step for one 20 KB request over C{upstreams} upstreams."""
    system = _text(1, 16_000)
    chat = {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": _text(2, 4_000)}]}
    completion = {"prompt": system + _text(3, 4_000)}
    router = Router(Clock())
    ids = [f"u{i}" for i in range(upstreams)]
    for conversation in range(64):
        body = {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": _text(100 + conversation, 4_000)}]}
        router.dispatched(router.prepare(body, "/v1/chat/completions"), ids[conversation % upstreams])
    views = [UpstreamView(id=name, slots_idle=n % 3, slots_total=4, in_flight=4 - n % 3)
             for n, name in enumerate(ids)]
    request = router.prepare(chat, "/v1/chat/completions")
    candidates = router.candidates(request, views)
    info = prompt_info(chat, "/v1/chat/completions")
    blocks = request.blocks
    index = router.index
    figures = {
        "prompt_info (chat)": _per_call(lambda: prompt_info(chat, "/v1/chat/completions")),
        "prompt_info (completion)": _per_call(lambda: prompt_info(completion, "/completion")),
        "block_hashes": _per_call(lambda: block_hashes(info.text)),
        "match (all upstreams)": _per_call(lambda: [index.match(i, blocks) for i in ids]),
        "rank": _per_call(lambda: rank(candidates, info.tokens)),
        "candidates (match + speeds + waits)": _per_call(lambda: router.candidates(request, views)),
        "total: prepare + rank": _per_call(
            lambda: router.rank(router.prepare(chat, "/v1/chat/completions"), views)
        ),
    }
    return figures


def main() -> None:
    """Print the figures for 8 and 64 upstreams."""
    results = {n: measure(n) for n in (8, 64)}
    steps = list(results[8])
    width = max(len(step) for step in steps)
    print(f"{'step (20 KB prompt)':<{width}}  {'8 upstreams':>12}  {'64 upstreams':>12}")  # noqa: T201
    for step in steps:
        print(f"{step:<{width}}  {results[8][step]:>10.1f}us  {results[64][step]:>10.1f}us")  # noqa: T201


if __name__ == "__main__":
    main()
