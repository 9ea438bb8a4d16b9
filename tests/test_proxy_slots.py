"""/slots through the proxy port (issue #24): llama-server's own answer, fresh, with its codes;
/slots/{id}, /slots?... and id_slot requests go to the server whose slot ids they name."""

from __future__ import annotations

import json

import pytest

from paddler.balancer.proxy import ProxyConfig
from paddler.fleet.upstream import FailureSeen

from .proxy_harness import make_harness

#: every test here runs with each request parser of the proxy port (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("both_parsers")


@pytest.fixture
def harness(request):
    return make_harness(request)


def _paths(fake):
    return [uri for _, uri, _, _ in fake.seen]


def test_get_slots_is_the_servers_own_answer_read_when_asked(harness):
    """Not a probe's snapshot: the fake's slots change between two reads and both are seen."""
    fake, upstream = harness.add_fake(slots=2)
    upstream.raw_slots = [{"id": 0, "stale": True}]
    first = harness.json(harness.result(harness.get("/slots")))
    fake.busy = 2
    second = harness.json(harness.result(harness.get("/slots")))
    assert [s["is_processing"] for s in first] == [False, False]
    assert [s["is_processing"] for s in second] == [True, True]
    assert upstream.in_flight == 0


def test_a_no_slots_server_answers_501_in_its_own_shape(harness):
    fake, _ = harness.add_fake()
    fake.slots_status = 501
    response = harness.result(harness.get("/slots"))
    assert response.code == 501
    assert harness.json(response)["error"]["type"] == "not_supported_error"


def test_slot_requests_of_two_upstreams_all_go_to_the_slot_home(harness):
    """/slots, /slots/{id}?action=..., and id_slot completions address the first upstream's slots,
    even while the second has more idle slots; a completion naming no slot may go anywhere."""
    home, _ = harness.add_fake("home", slots=1)
    other, _ = harness.add_fake("other", slots=8)
    assert harness.proxy.slot_home().name == "home"
    harness.result(harness.get("/slots"))
    harness.result(harness.get("/slots?fail_on_no_slot=1"))
    harness.result(harness.post("/slots/0?action=save", {"filename": "a.bin"}))
    for _ in range(2):
        response = harness.result(harness.post("/completion", {"prompt": "hi", "id_slot": 0}))
        assert harness.json(response)["upstream"] == "home"
    response = harness.result(harness.post("/completion", {"prompt": "hi", "id_slot": -1}))
    assert harness.json(response)["upstream"] == "other"
    assert _paths(home) == [b"/slots", b"/slots?fail_on_no_slot=1", b"/slots/0?action=save",
                            b"/completion", b"/completion"]
    assert _paths(other) == [b"/completion"]


def test_the_slot_home_moves_when_the_first_upstream_stops_serving(harness):
    _, first = harness.add_fake("first")
    second_fake, _ = harness.add_fake("second")
    harness.pool.observe(first, FailureSeen("down", unreachable_after=1))
    assert harness.proxy.slot_home().name == "second"
    harness.result(harness.get("/slots"))
    assert _paths(second_fake) == [b"/slots"]


def test_a_slot_request_with_no_serving_upstream_is_503(harness):
    _, only = harness.add_fake()
    harness.pool.observe(only, FailureSeen("down", unreachable_after=1))
    response = harness.result(harness.get("/slots/0?action=erase"))
    assert response.code == 503
    assert "no healthy upstream" in harness.json(response)["error"]["message"]


def test_a_503_to_an_id_slot_request_is_the_servers_answer_not_retried(harness):
    """A slot id means one server: its 503 is relayed, no other upstream is tried."""
    home, _ = harness.add_fake("home")
    other, _ = harness.add_fake("other")
    home.answer_status = 503
    response = harness.result(harness.post("/completion", {"prompt": "hi", "id_slot": 1}))
    assert response.code == 503
    assert json.loads(harness.content(response))["error"]["message"] == "Loading model"
    assert _paths(other) == []


def test_slots_endpoint_enable_keeps_the_fleet_view(request):
    h = make_harness(request, config=ProxyConfig(slots_endpoint_enable=True))
    fake, upstream = h.add_fake(slots=1)
    upstream.raw_slots = [{"id": 0, "is_processing": False}]
    assert [s["upstream"] for s in h.json(h.result(h.get("/slots")))] == ["fake"]
    assert fake.seen == []
