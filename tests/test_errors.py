"""One classifier of errors for the counters (paddler.errors.outcome_of), used by the proxy and the channel."""

from __future__ import annotations

import pytest

from paddler import errors
from paddler.errors import PaddlerHTTPError, outcome_of
from paddler.observability.requests import OUTCOMES


def _all_errors() -> list[type[PaddlerHTTPError]]:
    found, todo = [], [PaddlerHTTPError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted({c for c in found if c.__module__ == errors.__name__}, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _all_errors(), ids=lambda c: c.__name__)
def test_every_error_with_a_reason_is_counted_under_a_known_outcome(cls):
    """An error that names a reason is counted as refused or timed out under that reason; others are not."""
    error = cls("x")
    outcome = outcome_of(error)
    if getattr(cls, "reason", None) is None:
        assert outcome is None
    else:
        kind, reason = outcome
        assert reason == cls.reason and reason in OUTCOMES[kind]


def test_client_timeouts_and_client_connection_caps_are_classified_as_the_proxy_would():
    """The proxy used its own copy that knew neither RequestTimeout nor TooManyClientConnections."""
    assert outcome_of(errors.RequestTimeout("slow head")) == ("timed_out", "client_head")
    assert outcome_of(errors.BodyTimeout("slow body")) == ("timed_out", "client_body")
    assert outcome_of(errors.TooManyClientConnections("cap")) == ("refused", "client_connection_limit")
    assert outcome_of(errors.BufferTimeout("late")) == ("timed_out", "buffer")
    assert outcome_of(errors.UpstreamFailed("502")) is None


def test_the_proxy_has_no_classifier_of_its_own():
    from paddler.balancer import proxy

    assert not hasattr(proxy, "_outcome") and proxy.outcome_of is outcome_of


def test_one_message_for_a_body_over_the_limit():
    error = errors.body_too_large(100, "--max-request-body")
    assert error.status == 413 and error.message == "the request body is larger than 100 bytes (--max-request-body)"
    assert errors.body_too_large(7).message == "the request body is larger than 7 bytes"
    full = errors.body_memory_full()
    assert full.status == 503 and full.headers == {b"retry-after": b"1"}
    assert outcome_of(full) == ("refused", "body_memory")


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_the_balancer_answers_an_oversized_body_with_that_message_however_it_is_framed(request, framing):
    """Content-Length over the limit (refused by the channel before the body) or a chunked body
    growing past it (refused by the request part way): the same 413."""
    import json

    from paddler.balancer.proxy import ProxyConfig

    from .proxy_harness import make_harness

    h = make_harness(request, config=ProxyConfig(max_request_body=100))
    h.add_fake()
    body = json.dumps({"prompt": "x" * 200}).encode()
    if framing == "length":
        raw = b"POST /completion HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    else:
        raw = b"POST /completion HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            len(body), body
        )
    client = h.raw(raw)
    head, _, rest = client.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert errors.body_too_large(100, "--max-request-body").message.encode() in rest
