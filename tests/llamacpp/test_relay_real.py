"""The relay, both modes (pass-through and decode), against a real llama-server.

One llama-server (2 slots, the tiny model) and one balancer per relay mode
for the module. Greedy decoding makes llama-server's text repeatable, so
what the balancer relays is compared with what the server says directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.llamacpp.clients import Streams, get_json, post, sse_payloads, wait_for
from tests.llamacpp.conftest import LlamaServers
from tests.processes import Processes
from tests.relay_checks import (
    MODES,
    check_client_leaving_stops_the_generation,
    check_error_is_relayed_as_the_server_said_it,
    check_http10_client_gets_a_plain_body,
    check_stream_framing_and_keep_alive,
    check_two_streams_at_once,
    check_unknown_path_is_relayed,
    wait_idle,
)

pytestmark = pytest.mark.llamacpp

GREEDY = {"temperature": 0, "top_k": 1, "seed": 7}


@pytest.fixture(scope="module")
def servers(
    llama_server_binary: Path, llama_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    """A 2-slot llama-server and one balancer per relay mode in front of it."""
    tmp = tmp_path_factory.mktemp("relay-real")
    llama = LlamaServers(llama_server_binary, llama_tiny_model, tmp)
    procs = Processes(tmp)
    try:
        upstream = llama(slots=2, ctx=4096)
        proxies = {}
        for mode, flags in MODES.items():
            _, proxies[mode], _ = procs.balancer("--upstream", upstream, "--probe-interval", "0.2", *flags)
        yield upstream, proxies
    finally:
        procs.stop_all()
        llama.stop_all()


@pytest.fixture
def streams() -> Iterator[Streams]:
    opened = Streams()
    try:
        yield opened
    finally:
        opened.close_all()


@pytest.fixture(params=list(MODES), ids=list(MODES))
def fleet(request: pytest.FixtureRequest, servers: tuple[str, dict[str, str]]) -> tuple[str, str, str]:
    upstream, proxies = servers
    proxy = proxies[request.param]
    wait_idle(upstream)
    wait_for(lambda: get_json(proxy, "/health")["slots_idle"] == 2, 20, "the balancer sees both slots idle")
    return request.param, upstream, proxy


def _text(payloads: list[str]) -> str:
    return "".join(json.loads(p).get("content", "") for p in payloads)


def test_streamed_text_is_what_the_server_streams(fleet):
    """Greedy /completion through the balancer: well-framed chunks, the same text as directly, the
    final event with timings; the client connection carries a second request."""
    mode, upstream, proxy = fleet
    body = {"prompt": "The relay", "n_predict": 12, "ignore_eos": True, **GREEDY}
    relayed = check_stream_framing_and_keep_alive(proxy, body, mode)
    direct = sse_payloads(post(upstream, "/completion", {**body, "stream": True}).body)
    assert _text(relayed) == _text(direct)
    final = json.loads(relayed[-1])
    assert final["stop"] is True and final["timings"]["predicted_n"] == 12


def test_non_streamed_answer_is_what_the_server_answers(fleet):
    """A non-streaming greedy completion: the same text as directly."""
    _, upstream, proxy = fleet
    body = {"prompt": "Non streaming", "n_predict": 6, "ignore_eos": True, **GREEDY}
    relayed = post(proxy, "/completion", body)
    direct = post(upstream, "/completion", body)
    assert relayed.status == direct.status == 200
    assert relayed.json()["content"] == direct.json()["content"]


def test_openai_chat_stream_ends_with_usage_and_done(fleet, streams):
    """/v1/chat/completions: the usage chunk and [DONE] arrive in both modes."""
    _, _, proxy = fleet
    stream = streams(proxy, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "ignore_eos": True,
        "stream_options": {"include_usage": True},
    })
    payloads = stream.wait_end(60)
    assert stream.status == 200 and payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["usage"]["completion_tokens"] == 4


def test_http10_client_gets_the_stream_without_chunks(fleet):
    """An HTTP/1.0 client gets the events unframed, then the connection closes."""
    _, _, proxy = fleet
    payloads = check_http10_client_gets_a_plain_body(proxy, {"prompt": "Old client", "n_predict": 3,
                                                             "ignore_eos": True})
    assert json.loads(payloads[-1])["stop"] is True


def test_errors_are_relayed_as_the_server_said_them(fleet):
    """llama-server's own errors (status and JSON) reach the client unchanged."""
    _, upstream, proxy = fleet
    check_error_is_relayed_as_the_server_said_it(upstream, proxy, "/v1/chat/completions", {"messages": "nope"})
    check_unknown_path_is_relayed(upstream, proxy)


def test_a_client_leaving_stops_llama_server(fleet, streams):
    """A client dropping a long stream: llama-server stops generating and frees the slot."""
    _, upstream, proxy = fleet
    check_client_leaving_stops_the_generation(
        upstream, proxy, streams, {"prompt": "Long", "n_predict": 3000, "ignore_eos": True}
    )


def test_two_streams_at_once(fleet, streams):
    """Two concurrent streams on the two slots both arrive whole."""
    _, _, proxy = fleet
    check_two_streams_at_once(proxy, streams, {"prompt": "Two", "n_predict": 16, "ignore_eos": True})
