"""A client that leaves cancels its upstream request, and only its own (issue 24's
C{test_cancel_request}): two upstreams, two clients, all in memory (L{tests.proxy_harness})."""

from __future__ import annotations

import json

import pytest

from .proxy_harness import Harness, make_harness

#: every test here runs with each request parser of the proxy port (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("both_parsers")


@pytest.fixture
def harness(request) -> Harness:
    return make_harness(request)


def _whole(prompt: str) -> bytes:
    return json.dumps({"prompt": prompt, "n_predict": -1}).encode()


def test_a_non_streaming_client_leaving_before_the_head_aborts_its_upstream_request_only(harness):
    """Request written, no head yet (what llama-server does for a whole answer until it is
    done): the client that leaves gets its upstream connection aborted at once; the other
    client, on the other upstream, is served as if nothing happened."""
    fake_a, up_a = harness.add_fake("a", hold=True)
    fake_b, up_b = harness.add_fake("b", hold=True)
    leaving = harness.raw_post("/completion", _whole("leaves"))
    held_leaving = harness.held(fake_a)
    staying = harness.raw_post("/completion", _whole("stays"))
    held_staying = harness.held(fake_b)
    assert held_leaving.json["prompt"] == "leaves" and held_staying.json["prompt"] == "stays"
    assert up_a.in_flight == 1 and up_b.in_flight == 1
    leaving.addErrback(lambda _: None)
    leaving.cancel()  # the client drops its connection while the upstream is still generating
    harness.flush()
    assert held_leaving.gone  # the upstream saw the request cancelled
    assert all(conn.closed for conn in harness.connections_to(up_a))
    assert not held_staying.gone and up_b.in_flight == 1
    held_staying.finish(b'{"content":"all of it"}')
    response = harness.result(staying)
    assert response.code == 200
    assert up_a.in_flight == 0 and up_b.in_flight == 0


def test_a_client_leaving_while_buffered_never_reaches_an_upstream_and_the_other_is_served(harness):
    """Both upstreams busy: a client that leaves while its request waits in the buffer is
    dropped from it (no upstream ever sees it); the client buffered after it gets the next
    free slot."""
    fake_a, up_a = harness.add_fake("a", slots=1, hold=True)
    fake_b, up_b = harness.add_fake("b", slots=1, hold=True)
    first_a = harness.raw_post("/completion", _whole("a"))
    held_a = harness.held(fake_a)
    first_b = harness.raw_post("/completion", _whole("b"))
    held_b = harness.held(fake_b)
    leaving = harness.raw_post("/completion", _whole("leaves"))
    staying = harness.raw_post("/completion", _whole("stays"))
    harness.flush()
    assert harness.pool.requests_buffered == 2
    leaving.addErrback(lambda _: None)
    leaving.cancel()
    harness.flush()
    assert harness.pool.requests_buffered == 1
    held_a.finish(b'{"content":"a"}')
    assert harness.result(first_a).code == 200
    next_held = harness.held(fake_a)
    assert next_held.json["prompt"] == "stays"  # not the one that left
    next_held.finish(b'{"content":"stays"}')
    assert harness.result(staying).code == 200
    held_b.finish(b'{"content":"b"}')
    assert harness.result(first_b).code == 200
    assert [h.json["prompt"] for h in fake_a.held + fake_b.held].count("leaves") == 0
