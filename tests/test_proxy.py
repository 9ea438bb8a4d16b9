"""The streaming reverse proxy against fake upstreams, all in memory (L{tests.proxy_harness})."""

from __future__ import annotations

import json

import pytest

from paddler.balancer.proxy import ProxyConfig
from paddler.fleet.upstream import UpstreamState

from .helpers import FakeUpstreamBody
from .proxy_harness import Chunks, Harness, make_harness

#: every test here runs with each request parser of the proxy port (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("both_parsers")

#: HostnameEndpoint notices a refused attempt at its next attempt tick (0.3 s on the clock).
REFUSAL_NOTICED = 0.3


class FakeClientRequest:
    """The client's request as a L{Relay} sees it: a consumer that takes a producer."""

    producer = None
    channel = object()

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        pass


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.stop()


def test_stream_chunks_reach_the_client_as_the_upstream_sends_them(harness):
    fake, upstream = harness.add_fake(hold=True)
    response_d = harness.post("/completion", {"prompt": "hi", "stream": True})
    held = harness.held(fake)
    held.start_stream()
    held.send(b'data: {"content":"one"}\n\n')
    response = harness.result(response_d)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    chunks = Chunks()
    response.deliverBody(chunks)
    harness.flush()
    assert chunks.chunks == [b'data: {"content":"one"}\n\n']  # before the upstream has sent anything else
    assert upstream.in_flight == 1
    held.send(b'data: {"content":"two"}\n\n')
    harness.flush()
    assert b"two" in chunks.chunks[-1] and len(chunks.chunks) == 2
    held.finish(b'data: {"stop":true}\n\n')
    body = harness.result(chunks.done)
    assert body.count(b"data:") == 3
    assert upstream.in_flight == 0
    assert harness.proxy.stats.by_status == {"2xx": 1}


def test_client_disconnect_aborts_the_upstream_request_and_frees_the_slot(harness):
    fake, upstream = harness.add_fake(hold=True)
    held, response, chunks = harness.open_stream(fake)
    chunks.done.addErrback(lambda _: None)
    chunks.transport.stopProducing()  # the client goes away mid-stream
    harness.flush()
    assert held.gone
    assert upstream.in_flight == 0
    assert upstream.slots_idle == 4


def test_client_disconnect_before_the_upstream_answers_aborts_it_too(harness):
    fake, upstream = harness.add_fake(hold=True)
    response_d = harness.raw_post("/completion")
    held = harness.held(fake)
    response_d.addErrback(lambda _: None)
    response_d.cancel()
    harness.flush()
    assert held.gone
    assert upstream.in_flight == 0


def test_refused_connection_marks_the_upstream_unreachable_and_retries_elsewhere(harness):
    dead = harness.add_dead(slots=8)  # most idle: chosen first
    fake, live = harness.add_fake(slots=2)
    response_d = harness.post("/completion", {"prompt": "hi"})
    harness.run(REFUSAL_NOTICED)
    response = harness.result(response_d)
    assert response.code == 200
    assert harness.json(response)["upstream"] == "fake"
    assert dead.state is UpstreamState.UNREACHABLE
    assert dead.last_error == "connection refused"
    assert dead.in_flight == 0 and live.in_flight == 0


def test_every_upstream_failing_gives_502_in_openai_error_shape(harness):
    harness.add_dead("d1")
    harness.add_dead("d2")
    response_d = harness.post("/v1/chat/completions", {"messages": []})
    harness.run(2 * REFUSAL_NOTICED)
    response = harness.result(response_d)
    assert response.code == 502
    error = harness.json(response)["error"]
    assert error["type"] == "upstream_error" and error["code"] == 502
    assert "connection refused" in error["message"]


def test_upstream_answering_503_loading_is_skipped_and_marked_loading(harness):
    loading, loading_up = harness.add_fake("loading", slots=8)
    loading.answer_status = 503
    harness.add_fake("ready", slots=2)
    response = harness.result(harness.post("/completion", {"prompt": "hi"}))
    assert harness.json(response)["upstream"] == "ready"
    assert loading_up.state is UpstreamState.LOADING


def test_oversized_body_gets_413_and_never_reaches_an_upstream(request):
    h = make_harness(request, config=ProxyConfig(max_request_body=100))
    fake, _ = h.add_fake()
    response = h.result(h.post("/completion", {"prompt": "x" * 200}))
    assert response.code == 413
    error = h.json(response)["error"]
    assert "--max-request-body" in error["message"] and error["type"] == "invalid_request_error"
    assert fake.seen == []
    ok = h.result(h.post("/completion", {"prompt": "x"}))
    assert ok.code == 200


def test_invalid_json_gets_400_without_taking_a_slot(harness):
    fake, upstream = harness.add_fake()
    response = harness.result(harness.post("/v1/chat/completions", b"{not json"))
    assert response.code == 400
    assert "not valid JSON" in harness.json(response)["error"]["message"]
    assert fake.seen == [] and upstream.in_flight == 0


def test_forwarding_headers_and_hop_by_hop_handling(request):
    h = make_harness(request, config=ProxyConfig(api_key="sekrit"))
    fake, upstream = h.add_fake()
    response = h.result(h.post(
        "/completion",
        {"prompt": "hi"},
        headers={b"Connection": [b"keep-alive, X-Private"], b"X-Private": [b"1"], b"X-Forwarded-For": [b"10.1.1.1"], b"Host": [b"llm.example"]},
    ))
    assert response.code == 200
    method, uri, headers, body = fake.seen[-1]
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower[b"x-forwarded-for"] == [b"127.0.0.1"]  # --forwarded-headers replace (the default)
    assert lower[b"x-forwarded-proto"] == [b"http"]
    assert lower[b"x-forwarded-host"] == [b"llm.example"]
    assert lower[b"host"] == [b"llm.example"]
    assert b"authorization" not in lower  # the probes' key is not lent (--lend-api-key)
    assert b"x-private" not in lower
    assert json.loads(body) == {"prompt": "hi"}


def test_client_authorization_is_kept_and_host_rewritten_when_asked(request):
    h = make_harness(request, config=ProxyConfig(api_key="sekrit", rewrite_host_header=True))
    fake, upstream = h.add_fake()
    h.result(h.post("/completion", {"prompt": "hi"}, headers={b"Authorization": [b"Bearer mine"]}))
    lower = {k.lower(): v for k, v in fake.seen[-1][2].items()}
    assert lower[b"authorization"] == [b"Bearer mine"]
    assert lower[b"host"] == [upstream.url.split("//")[1].encode()]


def test_non_slot_paths_are_proxied_without_a_slot(harness):
    fake, upstream = harness.add_fake()
    response = harness.result(harness.get("/v1/models?x=1"))
    assert response.code == 200
    assert fake.seen[-1][1] == b"/v1/models?x=1"
    assert upstream.in_flight == 0


def test_health_answers_for_the_fleet(harness):
    harness.add_fake(slots=4)
    harness.add_fake("two", slots=2)
    response = harness.result(harness.get("/health"))
    assert response.code == 200
    assert harness.json(response) == {
        "status": "ok",
        "slots_idle": 6,
        "slots_processing": 0,
        "requests_buffered": 0,
        "upstreams": {"healthy": 2, "total": 2},
    }


def test_slots_endpoint_enable_answers_with_every_upstreams_slots_tagged(request):
    h = make_harness(request, config=ProxyConfig(slots_endpoint_enable=True))
    _, upstream = h.add_fake(slots=2)
    upstream.raw_slots = [{"id": 0, "is_processing": False}, {"id": 1, "is_processing": True}]
    slots = h.json(h.result(h.get("/slots")))
    assert [s["upstream"] for s in slots] == ["fake", "fake"]
    assert [s["id"] for s in slots] == [0, 1]


def test_upstream_silent_past_the_deadline_gives_504(request):
    h = make_harness(request, config=ProxyConfig(upstream_timeout=5))
    fake, upstream = h.add_fake(hold=True)
    response_d = h.post("/completion", {"prompt": "hi"})
    held = h.held(fake)
    h.run(4.9)
    h.pending(response_d)
    h.run(0.1)
    response = h.result(response_d)
    assert response.code == 504
    assert "--upstream-timeout" in h.json(response)["error"]["message"]
    assert held.gone and upstream.in_flight == 0


def test_stream_silent_past_the_idle_deadline_is_closed(request):
    h = make_harness(request, config=ProxyConfig(idle_timeout=10))
    fake, upstream = h.add_fake(hold=True)
    held, response, chunks = h.open_stream(fake)
    h.run(9)
    held.send(b"data: {}\n\n")
    h.flush()
    assert len(chunks.chunks) == 2
    h.run(9.9)
    assert not chunks.done.called
    h.run(0.1)
    with pytest.raises(Exception):
        h.result(chunks.done)
    assert held.gone
    assert upstream.in_flight == 0


def test_buffered_request_waits_for_a_slot_and_never_overfills(harness):
    fake, upstream = harness.add_fake(slots=1, hold=True)
    first_d = harness.post("/completion", {"prompt": "a"})
    first = harness.held(fake)
    second_d = harness.post("/completion", {"prompt": "b"})
    harness.flush()
    assert harness.pool.requests_buffered == 1
    assert len(fake.held) == 1 and upstream.in_flight == 1
    first.finish(b'{"n":1}')
    assert harness.json(harness.result(first_d)) == {"n": 1}
    second = harness.held(fake)
    assert second.json == {"prompt": "b"}
    second.finish(b'{"n":2}')
    assert harness.json(harness.result(second_d)) == {"n": 2}


def test_buffer_timeout_gives_504_and_a_running_stream_is_never_cut(request):
    h = make_harness(request, buffer_timeout=5, config=ProxyConfig(idle_timeout=1000))
    fake, upstream = h.add_fake(slots=1, hold=True)
    stream_d = h.post("/completion", {"prompt": "long", "stream": True})
    held = h.held(fake)
    held.start_stream()
    waiting_d = h.post("/completion", {"prompt": "waits"})
    h.flush()
    assert h.pool.requests_buffered == 1
    h.run(5)
    waiting = h.result(waiting_d)
    assert waiting.code == 504
    assert "no slot became free" in h.json(waiting)["error"]["message"]
    h.run(60)  # the stream goes on far past the buffer timeout
    held.send(b"data: 1\n\n")
    held.finish(b"data: 2\n\n")
    stream = h.result(stream_d)
    assert stream.code == 200
    assert h.content(stream) == b"data: 1\n\ndata: 2\n\n"


def test_client_leaving_while_buffered_never_reaches_an_upstream(harness):
    fake, upstream = harness.add_fake(slots=1, hold=True)
    first_d = harness.post("/completion", {"prompt": "a"})
    first = harness.held(fake)
    waiting_d = harness.raw_post("/completion")
    harness.flush()
    assert harness.pool.requests_buffered == 1
    waiting_d.addErrback(lambda _: None)
    waiting_d.cancel()
    harness.flush()
    assert harness.pool.requests_buffered == 0
    first.finish(b"{}")
    harness.result(first_d)
    assert len(fake.held) == 1 and upstream.in_flight == 0


def test_full_buffer_gives_503_with_retry_after(request):
    h = make_harness(request, max_buffered=1)
    fake, _ = h.add_fake(slots=1, hold=True)
    first_d = h.post("/completion", {"prompt": "a"})
    h.held(fake)
    second_d = h.post("/completion", {"prompt": "b"})
    h.flush()
    assert h.pool.requests_buffered == 1
    third = h.result(h.post("/completion", {"prompt": "c"}))
    assert third.code == 503
    assert third.headers.getRawHeaders(b"retry-after") == [b"1"]
    assert "buffer is full" in h.json(third)["error"]["message"]
    for d in (first_d, second_d):
        d.addErrback(lambda _: None)


def test_idle_timer_is_suspended_while_the_client_applies_backpressure():
    """A slow client pauses the upstream; that silence must not count as upstream idleness."""
    from twisted.internet.task import Clock

    from paddler.balancer.relay import Relay


    clock = Clock()
    request = FakeClientRequest()
    relay = Relay(request, clock, idle_timeout=10)
    body = FakeUpstreamBody()
    relay.start(body)
    assert request.producer is relay and body.consumer is relay
    relay.pauseProducing()
    assert body.paused and clock.getDelayedCalls() == []
    clock.advance(100)
    assert not relay.done.called
    relay.resumeProducing()
    clock.advance(9.9)
    assert not relay.done.called
    clock.advance(0.1)
    assert relay.done.called and body.stopped
    relay.done.addErrback(lambda _: None)


def test_no_retries_once_the_balancer_is_stopping(harness):
    """Upstream connections dropped during shutdown end the request with a 503, not a retry storm."""
    dead = harness.add_dead("dead", slots=8)
    harness.add_fake("live", slots=2)
    harness.proxy.stopping = True
    response = harness.result(harness.post("/completion", {"prompt": "hi"}))
    assert response.code == 503
    assert "shutting down" in harness.json(response)["error"]["message"]
    assert dead.in_flight == 0 and harness.fakes[0].seen == []


def test_idle_deadline_moves_with_every_chunk_without_rescheduling_the_timer():
    """Chunks push the idle deadline back; the timer is not rescheduled per chunk, and it still
    fires exactly idle_timeout after the last chunk."""
    from twisted.internet.task import Clock

    from paddler.balancer.relay import Relay


    clock = Clock()
    relay = Relay(FakeClientRequest(), clock, idle_timeout=10)
    body = FakeUpstreamBody()
    relay.start(body)
    [timer] = clock.getDelayedCalls()
    for _ in range(5):
        clock.advance(1)
        relay.body_data(b"data: x\n\n")
    assert clock.getDelayedCalls() == [timer]  # same timer, not rescheduled by the chunks
    clock.advance(9.9)  # last chunk at 5 s: the deadline is 15 s
    assert not relay.done.called
    clock.advance(0.1)
    assert relay.done.called and body.stopped
    relay.done.addErrback(lambda _: None)
    assert clock.getDelayedCalls() == []


def test_anthropic_messages_take_a_slot_and_wait_in_the_buffer_like_chat(request):
    """POST /v1/messages (llama-server's Anthropic API) runs in a slot: with two upstreams of one
    slot each, two requests take both slots, a third waits in the buffer until one is freed."""
    h = make_harness(request)
    first, a = h.add_fake("a", slots=1, hold=True)
    second, b = h.add_fake("b", slots=1, hold=True)
    message = {"model": "fake.gguf", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    responses = [h.post("/v1/messages", message) for _ in range(3)]
    h.flush()
    assert (a.in_flight, b.in_flight) == (1, 1)
    assert h.pool.requests_buffered == 1
    assert len(first.held) + len(second.held) == 2
    for held in [*first.held, *second.held]:
        held.request.finish()
    h.flush()
    assert h.pool.requests_buffered == 0 and a.in_flight + b.in_flight == 1
    for held in [*first.held, *second.held]:
        if not held.request.finished:
            held.request.finish()
    assert [h.result(d).code for d in responses] == [200, 200, 200]
    assert a.in_flight == b.in_flight == 0


def test_an_event_stream_that_takes_no_slot_gets_its_head_before_any_event(harness):
    """GET /models/sse (llama-server's router mode) answers its head and then nothing until a model
    changes state: two clients through the proxy each get the 200 head at once, then the events as
    they come; a generation stream still waits for its first byte (tested above)."""
    fake, upstream = harness.add_fake(hold=True)
    responses = [harness.get("/models/sse"), harness.get("/models/sse")]
    helds = [harness.held(fake), harness.held(fake)]
    for held in helds:
        held.start_stream()  # the head only
    answers = [harness.result(d) for d in responses]
    for response in answers:
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    chunks = [Chunks(), Chunks()]
    for response, sink in zip(answers, chunks):
        response.deliverBody(sink)
    helds[1].send(b'data: {"event":"model_status"}\n\n')
    harness.flush()
    assert chunks[0].chunks == [] and chunks[1].chunks == [b'data: {"event":"model_status"}\n\n']
    for held in helds:
        held.finish()
    assert [harness.result(sink.done) for sink in chunks] == [b"", b'data: {"event":"model_status"}\n\n']
