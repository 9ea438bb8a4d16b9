"""The relay, both modes (pass-through and decode), against the simulator: real processes on 127.0.0.1.

Streaming and non-streaming answers, errors, an HTTP/1.0 client, a client
that leaves, keep-alive on the client side; the same checks run against a
real llama-server in tests/llamacpp/test_relay_real.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.llamacpp.clients import Streams, get_json, post, wait_for

from .relay_checks import (
    MODES,
    check_client_leaving_stops_the_generation,
    check_error_is_relayed_as_the_server_said_it,
    check_http10_client_gets_a_plain_body,
    check_stream_framing_and_keep_alive,
    check_two_streams_at_once,
    check_unknown_path_is_relayed,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def streams() -> Iterator[Streams]:
    opened = Streams()
    try:
        yield opened
    finally:
        opened.close_all()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """One 2-slot simulator (fast tokens) and a balancer in front of it per relay mode, for the module."""
    from .processes import Processes

    procs = Processes(tmp_path_factory.mktemp("relay"))
    try:
        _, upstream = procs.simulator(2, 400.0)
        proxies = {}
        for mode, flags in MODES.items():
            _, proxies[mode], _ = procs.balancer("--upstream", upstream, "--probe-interval", "0.2", *flags)
        yield upstream, proxies
    finally:
        procs.stop_all()


@pytest.fixture(params=list(MODES), ids=list(MODES))
def fleet(request: pytest.FixtureRequest, servers) -> tuple[str, str, str]:
    """The simulator and the balancer of the relay mode of the parameter, both slots idle."""
    upstream, proxies = servers
    proxy = proxies[request.param]
    wait_for(lambda: get_json(proxy, "/health")["slots_idle"] == 2, 20, "the balancer sees both slots idle")
    return request.param, upstream, proxy


def test_streams_are_well_framed_and_the_connection_is_kept(fleet):
    """Chunked framing is exact, the final event carries timings, and the client connection is reused."""
    mode, _, proxy = fleet
    payloads = check_stream_framing_and_keep_alive(proxy, {"prompt": "hello", "n_predict": 8}, mode)
    final = json.loads(payloads[-1])
    assert final["stop"] is True and final["tokens_predicted"] == 8 and "timings" in final
    assert len(payloads) == 9


def test_non_streaming_answers_arrive_whole(fleet):
    """A non-streaming completion is the simulator's JSON, whole."""
    _, _, proxy = fleet
    reply = post(proxy, "/completion", {"prompt": "hello", "n_predict": 5})
    assert reply.status == 200
    body = reply.json()
    assert body["tokens_predicted"] == 5 and body["timings"]["predicted_n"] == 5


def test_openai_streams_end_with_done(fleet, streams):
    """/v1/chat/completions streams end with [DONE] in both modes."""
    _, _, proxy = fleet
    stream = streams(proxy, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 4})
    payloads = stream.wait_end(30)
    assert stream.status == 200 and payloads[-1] == "[DONE]"


def test_http10_clients_get_the_stream_without_chunks(fleet):
    """HTTP/1.0: no chunk framing, the connection closes at the end, every event there."""
    _, _, proxy = fleet
    payloads = check_http10_client_gets_a_plain_body(proxy, {"prompt": "hello", "n_predict": 4})
    assert len(payloads) == 5 and json.loads(payloads[-1])["stop"] is True


def test_errors_are_relayed_as_the_server_said_them(fleet):
    """A request the simulator refuses gets the simulator's status and JSON error."""
    _, upstream, proxy = fleet
    check_error_is_relayed_as_the_server_said_it(upstream, proxy, "/v1/chat/completions", {"messages": "nope"})
    check_unknown_path_is_relayed(upstream, proxy)


def test_a_client_leaving_stops_the_generation(fleet, streams):
    """Dropping a stream mid-way frees the simulator's slot: the upstream request was cancelled."""
    _, upstream, proxy = fleet
    check_client_leaving_stops_the_generation(
        upstream, proxy, streams, {"prompt": "long", "n_predict": 100000, "ignore_eos": True}
    )


def test_two_streams_at_once(fleet, streams):
    """Two concurrent streams both arrive whole."""
    _, _, proxy = fleet
    check_two_streams_at_once(proxy, streams, {"prompt": "two", "n_predict": 20})
