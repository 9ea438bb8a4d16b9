"""The one table of llama-server endpoints (paddler.llamacpp.endpoints), as the proxy, the router
and the simulator read it."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from paddler.llamacpp.endpoints import ENDPOINTS, SLOT_PATHS, addresses_slots, endpoint_for, prompt_shape
from paddler.routing.prompt import prompt_info
from paddler.simulator.engine import SimulatedServerEngine, SimulatorConfig
from paddler.simulator.web import SimulatorResource

from .proxy_harness import make_harness

SLOT_TAKING = sorted(path for path, e in ENDPOINTS.items() if e.takes_slot)


def test_the_table_names_each_path_once_exactly_as_requested():
    assert all(path == e.path and path.startswith("/") and not path.endswith("/") for path, e in ENDPOINTS.items())
    assert SLOT_PATHS == {p.encode() for p in SLOT_TAKING}
    assert b"/v1/messages" in SLOT_PATHS  # Anthropic's API runs in a slot like chat
    assert endpoint_for(b"/v1/messages") is ENDPOINTS["/v1/messages"]
    assert endpoint_for("/v1/messages/count_tokens") is None and endpoint_for("/tokenize") is None
    assert prompt_shape("/v1/messages") == "chat" and prompt_shape("/v1/embeddings") == "none"
    assert {b"/v1/responses", b"/responses"} <= SLOT_PATHS  # OpenAI's Responses API too
    assert endpoint_for("/v1/audio/transcriptions") is None  # multipart: passed through, not parsed


def test_the_slots_subtree_names_one_servers_slots():
    assert addresses_slots(b"/slots") and addresses_slots(b"/slots/0") and addresses_slots(b"/slots/1/x")
    assert not addresses_slots(b"/slotsx") and not addresses_slots(b"/v1/slots") and not addresses_slots(b"/")


@pytest.mark.parametrize("path", SLOT_TAKING)
def test_every_slot_taking_endpoint_of_the_table_takes_a_slot_in_the_proxy(request, path):
    """Two upstreams of one slot each: two requests run, the third waits in the buffer."""
    h = make_harness(request)
    first, a = h.add_fake("a", slots=1, hold=True)
    second, b = h.add_fake("b", slots=1, hold=True)
    responses = [h.post(path, {"model": "fake.gguf", "prompt": "hi", "input": "hi"}) for _ in range(3)]
    h.flush()
    assert (a.in_flight, b.in_flight, h.pool.requests_buffered) == (1, 1, 1)
    for _ in range(2):
        for held in [*first.held, *second.held]:
            if not held.request.finished:
                held.request.finish()
        h.flush()
    assert [h.result(d).code for d in responses] == [200, 200, 200]
    assert a.in_flight == b.in_flight == h.pool.requests_buffered == 0


def test_a_path_outside_the_table_takes_no_slot(request):
    h = make_harness(request)
    fake, upstream = h.add_fake("a", slots=1, hold=True)
    h.post("/tokenize", {"content": "hi"})
    h.flush()
    assert upstream.in_flight == 0 and len(fake.held) == 1
    fake.held[0].request.finish()
    h.flush()


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_the_router_reads_each_endpoints_prompt_shape_from_the_table(path):
    body = {
        "prompt": "hello there",
        "messages": [{"role": "user", "content": "hello there"}],
        "input_prefix": "a", "input_suffix": "b",
    }
    assert prompt_info(body, path).kind == ENDPOINTS[path].prompt
    assert prompt_info(body, path + "/?x=1").kind == ENDPOINTS[path].prompt  # as normalised for routing


def test_the_simulator_answers_the_slot_taking_endpoints_whose_format_it_speaks():
    clock = Clock()
    resource = SimulatorResource(SimulatedServerEngine(clock, SimulatorConfig()), clock)
    posted = {path for method, path in resource._routes if method == b"POST" and path in ENDPOINTS}
    assert posted == {"/completion", "/completions", "/v1/completions", "/chat/completions", "/v1/chat/completions"}
    assert all(ENDPOINTS[p].takes_slot for p in posted)
