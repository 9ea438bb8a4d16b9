"""End to end: the balancer as a real process in front of two real llama-servers.

The servers are the llama-server built from the llama-cpp-python sdist
(``start_llama_server``), the balancer is ``python -m paddler balancer``
(``tests.processes``). Slots are kept busy with long streaming requests that
the test ends by disconnecting; every wait has a deadline.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.llamacpp.clients import (
    Background,
    Stream,
    Streams,
    busy_slots,
    drop,
    get,
    get_json,
    metric,
    post,
    send_unread,
    wait_for,
)
from tests.processes import Processes

if TYPE_CHECKING:
    from tests.llamacpp.conftest import LlamaServers

pytestmark = pytest.mark.llamacpp

#: Context of each slot; see test_contract.py for the --override-kv.
SLOT_CTX = 16384
HOLD_TOKENS = 16000


@dataclass
class Fleet:
    """Two real llama-servers and a balancer in front of them."""

    servers: list[str]
    proxy: str
    llama: LlamaServers

    def health(self) -> dict[str, Any]:
        reply = get(self.proxy, "/health")
        assert reply.status == 200, reply
        return reply.json()

    def busy(self) -> list[int]:
        """Busy slots per server, in server order."""
        return [len(busy_slots(url)) for url in self.servers]


StartFleet = Callable[..., Fleet]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def fleet(start_llama_server: LlamaServers, processes: Processes) -> StartFleet:
    """Factory: ``fleet(3, 1)`` starts one real server per slot count and a balancer
    (probing every 0.2 s), and returns once the balancer has seen every slot."""

    def start(*slots: int, balancer_args: tuple[str, ...] = ()) -> Fleet:
        servers = [
            start_llama_server(
                slots=n,
                ctx=n * SLOT_CTX,
                extra_args=["--override-kv", f"llama.context_length=int:{SLOT_CTX}"],
            )
            for n in slots
        ]
        upstreams = [arg for url in servers for arg in ("--upstream", url)]
        _, proxy, _ = processes.balancer(*upstreams, "--probe-interval", "0.2", *balancer_args)
        result = Fleet(servers, proxy, start_llama_server)
        wait_for(
            lambda: result.health()["slots_idle"] == sum(slots)
            and result.health()["upstreams"]["healthy"] == len(slots),
            20,
            "balancer sees every slot",
        )
        return result

    return start


def hold(open_stream: Streams, proxy: str, read: bool = False) -> Stream:
    """A long streaming request through the balancer that keeps one slot busy."""
    return open_stream(
        proxy,
        "/completion",
        {"prompt": "Keep a slot busy", "n_predict": HOLD_TOKENS, "ignore_eos": True},
        read=read,
    )


def test_requests_spread_by_free_slots_and_the_rest_wait_in_the_balancer(
    fleet: StartFleet, open_stream: Streams
) -> None:
    """A 3-slot and a 1-slot server: 4 long requests fill 3 + 1 slots (round robin would
    queue one inside the small server); a 5th waits in the balancer's buffer, not inside a
    server, and runs as soon as a slot frees."""
    f = fleet(3, 1)
    holders = []
    for _ in range(4):
        holder = hold(open_stream, f.proxy)
        holder.wait_first_event()
        holders.append(holder)
    wait_for(lambda: f.busy() == [3, 1], 10, "3 + 1 slots busy")
    assert [metric(url, "requests_deferred") for url in f.servers] == [0, 0]

    fifth = Background(lambda: post(f.proxy, "/completion", {"prompt": "fifth", "n_predict": 4}))
    wait_for(lambda: f.health()["requests_buffered"] == 1, 10, "fifth request buffered")
    assert [metric(url, "requests_deferred") for url in f.servers] == [0, 0]
    assert not fifth.done
    holders[0].close()
    reply = fifth.result(10)
    assert reply.status == 200 and reply.json()["tokens_predicted"] == 4
    assert f.health()["requests_buffered"] == 0


def test_aggregated_health_counts_the_slots_of_healthy_servers(
    fleet: StartFleet, open_stream: Streams
) -> None:
    """The balancer's /health sums idle and busy slots over healthy upstreams, and drops a
    server that dies from both the slot count and the healthy count."""
    f = fleet(2, 2)
    health = f.health()
    assert health["status"] == "ok"
    assert (health["slots_idle"], health["slots_processing"]) == (4, 0)
    assert health["upstreams"] == {"healthy": 2, "total": 2}

    for _ in range(3):
        hold(open_stream, f.proxy).wait_first_event()
    wait_for(lambda: sorted(f.busy()) == [1, 2], 10, "2 + 1 slots busy")
    wait_for(
        lambda: (lambda h: (h["slots_idle"], h["slots_processing"]) == (1, 3))(f.health()),
        10, "3 busy and 1 idle in /health",
    )

    victim = f.servers[f.busy().index(1)]
    f.llama.process(victim).kill()
    health = wait_for(
        lambda: (lambda h: h if h["upstreams"] == {"healthy": 1, "total": 2} else None)(f.health()),
        10, "one upstream healthy",
    )
    assert health["status"] == "ok"
    assert (health["slots_idle"], health["slots_processing"]) == (0, 2)


def test_streams_pass_through_the_balancer_event_by_event(
    fleet: StartFleet, open_stream: Streams
) -> None:
    """SSE from llama-server reaches the client while the slot is still generating, and the
    three stream formats arrive whole: /completion's final stop chunk, /v1/completions' and
    /v1/chat/completions' usage chunk and [DONE]."""
    f = fleet(2, 2)
    long = hold(open_stream, f.proxy, read=True)
    long.wait_first_event()
    assert sum(f.busy()) == 1  # the first event came while the generation goes on
    seen = len(long.events)
    wait_for(lambda: len(long.events) > seen + 10 and not long.ended, 10, "more events, same stream")
    assert long.headers["content-type"] == "text/event-stream"
    long.close()

    completion = open_stream(f.proxy, "/completion", {"prompt": "Once", "n_predict": 5,
                                                      "ignore_eos": True})
    events = completion.wait_end(30)
    final = json.loads(events[-1])
    assert final["stop"] is True and final["tokens_predicted"] == 5 and "timings" in final
    assert "[DONE]" not in events

    for path, body in (
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 5}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                                  "stream_options": {"include_usage": True}}),
    ):
        stream = open_stream(f.proxy, path, {**body, "ignore_eos": True})
        payloads = stream.wait_end(30)
        assert stream.status == 200 and payloads[-1] == "[DONE]", (path, payloads)
        last = json.loads(payloads[-2])
        assert last["usage"]["completion_tokens"] == 5 and last["timings"]["predicted_n"] == 5


def test_client_disconnect_through_the_balancer_frees_the_real_slot(
    fleet: StartFleet, open_stream: Streams
) -> None:
    """A streaming client that leaves the balancer mid-generation makes the balancer abort
    its upstream request: the real server frees the slot long before the generation would
    end, and the balancer counts it idle again."""
    f = fleet(1, 1)
    holder = hold(open_stream, f.proxy, read=True)
    holder.wait_first_event()
    wait_for(lambda: sum(f.busy()) == 1, 10, "one slot busy")
    server = f.servers[f.busy().index(1)]
    remaining = get_json(server, "/slots")[0]["next_token"][0]["n_remain"]
    assert remaining > HOLD_TOKENS // 2  # seconds of generation left
    holder.close()
    wait_for(lambda: busy_slots(server) == [], 3, "real slot freed")
    wait_for(lambda: f.health()["slots_idle"] == 2, 5, "balancer sees both slots idle")


def test_whole_response_client_disconnect_leaves_the_real_slot_busy_and_probes_see_it(
    fleet: StartFleet,
) -> None:
    """llama-server does not cancel a non-streaming request whose client left: when a
    client leaves the balancer mid-request, the slot stays busy upstream even though the
    balancer gave its lease back. The next probe counts it as busy, so a new request waits
    in the balancer instead of queueing inside the server."""
    f = fleet(1)
    conn = send_unread(
        f.proxy, "/completion", {"prompt": "whole", "n_predict": HOLD_TOKENS, "ignore_eos": True}
    )
    wait_for(lambda: f.busy() == [1], 10, "slot busy")
    drop(conn)
    wait_for(lambda: f.health()["slots_idle"] == 0, 5, "probe sees the slot still busy")
    assert f.busy() == [1]
    waiting = Background(lambda: post(f.proxy, "/completion", {"prompt": "next", "n_predict": 2}))
    wait_for(lambda: f.health()["requests_buffered"] == 1, 5, "new request buffered")
    assert metric(f.servers[0], "requests_deferred") == 0
    assert not waiting.done


def test_a_server_killed_mid_run_is_routed_around(
    fleet: StartFleet, open_stream: Streams
) -> None:
    """SIGKILL one of two servers while requests run on it: a stream on it ends instead of
    hanging, the whole-response request in flight on the dead server is a 502 (it had been
    written: sent again elsewhere it could run twice), every other one completes with 200 on
    the other server, and /health shows one healthy upstream."""
    f = fleet(2, 2)
    victim_stream = hold(open_stream, f.proxy, read=True)
    victim_stream.wait_first_event()
    wait_for(lambda: sum(f.busy()) == 1, 10, "one slot busy")
    victim = f.servers[f.busy().index(1)]

    statuses: list[int] = []
    stop = threading.Event()

    def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            body = {"prompt": f"request {n}.{i}", "n_predict": 32, "ignore_eos": True}
            statuses.append(post(f.proxy, "/completion", body, timeout=60).status)
            i += 1

    workers = [Background(lambda n=n: worker(n)) for n in range(3)]
    wait_for(lambda: statuses and len(busy_slots(victim)) == 2, 20,
             "a short request running on the victim")
    f.llama.process(victim).kill()  # that request never gets its answer: a 502, not a second run
    at_kill = len(statuses)

    victim_stream.wait_closed(10)
    wait_for(lambda: len(statuses) >= at_kill + 12, 30, "a dozen requests after the kill")
    stop.set()
    for w in workers:
        w.result(60)
    assert set(statuses) <= {200, 502} and statuses.count(502) <= 1, statuses
    wait_for(lambda: f.health()["upstreams"] == {"healthy": 1, "total": 2}, 10, "one healthy")
    after = post(f.proxy, "/completion", {"prompt": "after", "n_predict": 4})
    assert after.status == 200


def test_a_whole_response_client_leaving_does_not_disturb_the_other_client_on_the_other_server(
    fleet: StartFleet,
) -> None:
    """Two servers, two non-streaming clients (issue 24's ``test_cancel_request``): the
    client that leaves has its upstream connection closed by the balancer, llama-server
    keeps generating for it all the same (it only notices a closed connection while it
    streams), and the client that stays is answered by the other server, at once."""
    f = fleet(1, 1)
    leaving = send_unread(
        f.proxy, "/completion", {"prompt": "leaves", "n_predict": HOLD_TOKENS, "ignore_eos": True}
    )
    wait_for(lambda: sum(f.busy()) == 1, 10, "one slot busy")
    generating = f.busy().index(1)
    drop(leaving)
    wait_for(lambda: f.health()["slots_idle"] == 1, 5, "probe sees the left request still running")
    staying = Background(lambda: post(f.proxy, "/completion", {"prompt": "stays", "n_predict": 8}))
    reply = staying.result(20.0)
    assert reply.status == 200 and reply.json()["tokens_predicted"] == 8
    assert f.busy()[generating] == 1  # llama-server did not stop the abandoned generation
    assert f.busy()[1 - generating] == 0
