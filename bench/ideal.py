"""The ideal schedule: one central FIFO queue with perfect knowledge of free slots.

A pure discrete-event simulation of a trace on a fleet of simulated
llama-servers, with the simulator's timing model (``docs/simulator.md``): a
request on a slot of server *s* spends ``prompt_tokens / pps_s`` on its
prompt, its first token comes ``1 / tps_s`` after that and its last
``n_predict / tps_s`` after the prompt. Requests start in arrival order, each
at the first moment a slot is free, on the free slot that gives it the
earliest first token. There is no network, no probe delay and no queue
inside a server: no FIFO balancer that must commit a request on arrival or
on a freed slot can give a better time to first token to the request at the
head of the queue. (A scheduler that reorders requests or holds a request
back for a faster slot could beat it on some percentiles; none of the
balancers measured does either.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Server:
    slots: int
    tokens_per_second: float
    prompt_tokens_per_second: float = 2000.0


@dataclass(frozen=True)
class Request:
    at: float
    prompt_tokens: int
    n_predict: int


@dataclass(frozen=True)
class Outcome:
    start: float
    server: int
    ttft: float  # from arrival
    e2e: float  # from arrival


def simulate(servers: Sequence[Server], requests: Sequence[Request]) -> list[Outcome]:
    """Schedule C{requests} (in arrival order) on C{servers}; one L{Outcome} each, in input order."""
    slots = [i for i, server in enumerate(servers) for _ in range(server.slots)]
    if not slots:
        raise ValueError("the fleet has no slot")
    free_at = [0.0] * len(slots)
    order = sorted(range(len(requests)), key=lambda k: (requests[k].at, k))
    outcomes: list[Outcome | None] = [None] * len(requests)
    for k in order:
        request = requests[k]
        start = max(request.at, min(free_at))
        best = -1
        best_first = 0.0
        for slot, server_index in enumerate(slots):
            if free_at[slot] > start:
                continue
            server = servers[server_index]
            first = request.prompt_tokens / server.prompt_tokens_per_second + 1.0 / server.tokens_per_second
            if best < 0 or first < best_first:
                best, best_first = slot, first
        server = servers[slots[best]]
        prompt = request.prompt_tokens / server.prompt_tokens_per_second
        done = start + prompt + request.n_predict / server.tokens_per_second
        free_at[best] = done
        outcomes[k] = Outcome(
            start=start,
            server=slots[best],
            ttft=start + best_first - request.at,
            e2e=done - request.at,
        )
    return [o for o in outcomes if o is not None]


def capacity(servers: Sequence[Server], mean_prompt: float, mean_output: float) -> float:
    """Requests per second the fleet completes at full load (every slot always busy)."""
    return sum(
        server.slots / (mean_prompt / server.prompt_tokens_per_second + mean_output / server.tokens_per_second)
        for server in servers
    )
