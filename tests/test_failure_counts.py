"""Per-upstream failure counts: each failed request or attempt is counted once, in one place.

The one place is L{paddler.observability.requests.RequestStats.upstream_failed};
the proxy calls it for attempts that fail before answering (refused, reset,
no headers in time, no body byte in time), and L{RequestStats.record} for
answers relayed with a 5xx status. Every case runs with two upstreams.
"""
from __future__ import annotations

import ast
from pathlib import Path

from paddler.balancer.proxy import ProxyConfig

from .proxy_harness import make_harness

PADDLER = Path(__file__).resolve().parent.parent / "paddler"


def test_requests_failed_is_incremented_in_one_place_only():
    """Only RequestStats.upstream_failed adds to an upstream's requests_failed."""
    places = []
    for path in PADDLER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AugAssign) and getattr(node.target, "attr", None) == "requests_failed":
                places.append((path.relative_to(PADDLER).as_posix(), node.lineno))
    assert len(places) == 1 and places[0][0] == "observability/requests.py", places


def test_refused_connections_count_one_failure_per_upstream_tried(request):
    """Two dead upstreams: the request tries each once (502), each counts exactly one failure."""
    h = make_harness(request)
    dead = [h.add_dead("dead-1"), h.add_dead("dead-2")]
    response = h.result(h.post("/completion", {"prompt": "hi"}))
    h.content(response)
    assert response.code == 502
    assert [u.requests_failed for u in dead] == [1, 1]
    assert [u.requests_served for u in dead] == [0, 0]


def test_no_headers_in_time_counts_one_failure_per_request(request):
    """--upstream-timeout: one 504 per request, one failure on the upstream that held it, none elsewhere."""
    h = make_harness(request, config=ProxyConfig(upstream_timeout=5))
    slow, slow_up = h.add_fake("slow", hold=True)
    other, other_up = h.add_fake("other", hold=True)
    answers = [h.post("/completion", {"prompt": str(i)}) for i in range(2)]
    h.flush()
    h.run(5)
    codes = sorted(h.result(d).code for d in answers)
    assert codes == [504, 504]
    assert slow_up.requests_failed + other_up.requests_failed == 2
    assert slow_up.requests_served == other_up.requests_served == 0


def test_no_body_byte_in_time_counts_one_failure(request):
    """Headers, then silence past --idle-timeout: a 504, one failure, on each of two upstreams."""
    h = make_harness(request, config=ProxyConfig(idle_timeout=10))
    a, a_up = h.add_fake("a", slots=1, hold=True)
    b, b_up = h.add_fake("b", slots=1, hold=True)
    answers = [h.post("/completion", {"prompt": str(i), "stream": True}) for i in range(2)]
    for fake in (a, b):
        h.held(fake).start_stream()
    h.flush()
    h.run(10)
    assert sorted(h.result(d).code for d in answers) == [504, 504]
    assert (a_up.requests_failed, b_up.requests_failed) == (1, 1)
    assert a_up.requests_served == b_up.requests_served == 0


def test_a_relayed_5xx_counts_one_failure_per_request(request):
    """Upstreams answering their own 500, relayed to the client: one failure per request, none served."""
    h = make_harness(request)
    fakes = [h.add_fake("broken-1", slots=1), h.add_fake("broken-2", slots=1)]
    for fake, _ in fakes:
        fake.answer_status = 500
    for i in range(2):
        response = h.result(h.post("/completion", {"prompt": str(i)}))
        h.content(response)
        assert response.code == 500
    assert sum(up.requests_failed for _, up in fakes) == 2
    assert sum(up.requests_served for _, up in fakes) == 0


def test_a_stream_broken_mid_body_counts_one_failure(request):
    """The answer began, then the upstream reset: 502 recorded once, one failure."""
    h = make_harness(request)
    fake, upstream = h.add_fake("breaks", hold=True)
    _, other = h.add_fake("other")
    held, response, chunks = h.open_stream(fake)
    chunks.done.addErrback(lambda _: None)
    held.reset()
    h.flush()
    assert upstream.requests_failed == 1 and other.requests_failed == 0
    assert h.proxy.stats.requests_total == 1
