"""Slow and hostile clients on the server side (paddler.server.channel), in memory on a Clock.

A head that trickles in is cut at --header-timeout whatever its pace; a body
must keep --min-request-body-rate; oversized or unaffordable bodies are
answered before they are read (no 100 Continue); framing errors get JSON;
each listener caps its open connections; body memory is shared and given
back. Every early answer is a complete JSON response with Connection: close.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from paddler.errors import PaddlerHTTPError, outcome_of
from paddler.server.channel import MAX_LINGERING_REFUSALS, ClientLimits, GuardedSite, OverCapacity
from paddler.server.memory import BodyMemory
from paddler.server.request import bounded_request_factory

#: every test here runs with each request parser of the proxy port (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("both_parsers")

LIMITS = ClientLimits(header_timeout=10.0, min_body_rate=1000.0, idle_timeout=120.0, max_connections=4, linger=2.0)


class Echo(Resource):
    """Answers 200 with the body's length; with C{hold}, keeps requests open until released."""

    isLeaf = True

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.hold = hold
        self.held: list[Any] = []
        self.seen: list[bytes] = []

    def render(self, request: Any) -> Any:
        body = request.content.read()
        self.seen.append(body)
        request.setHeader(b"content-type", b"application/json")
        answer = json.dumps({"length": len(body)}).encode()
        if self.hold:
            self.held.append((request, answer))
            return NOT_DONE_YET
        return answer

    def release(self) -> None:
        held, self.held = self.held, []
        for request, answer in held:
            request.write(answer)
            request.finish()


class Transport(StringTransport):
    """A StringTransport that can half-close, and tells its protocol when it is aborted."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(peerAddress=IPv4Address("TCP", host, 50000))
        self.write_closed = False
        self.aborted = False
        self.protocol: Any = None

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.close()

    def close(self) -> None:
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(Failure(ConnectionDone()))


class Rig:
    """A GuardedSite on a Clock with in-memory connections."""

    def __init__(self, limits: ClientLimits = LIMITS, max_body: int = 100_000, memory: int = 10**9,
                 hold: bool = False) -> None:
        self.clock = Clock()
        self.resource = Echo(hold)
        self.memory = BodyMemory(memory)
        self.answered: list[PaddlerHTTPError] = []
        self.site = GuardedSite(
            self.resource, limits, self.clock, "test listener",
            request_factory=bounded_request_factory(max_body, self.memory, "abc123"),
            instance_id="abc123", on_answered=self.answered.append,
        )

    def connect(self, host: str = "127.0.0.1") -> Transport:
        transport = Transport(host)
        protocol = self.site.buildProtocol(transport.getPeer())
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return transport

    def send(self, transport: Transport, data: bytes) -> None:
        transport.protocol.dataReceived(data)


def responses(raw: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Every complete HTTP response in C{raw} (Content-Length or chunked bodies)."""
    found = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        if status == 100:
            raw = rest
            continue
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            size = int(headers[b"content-length"])
            body, raw = rest[:size], rest[size:]
        else:
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body += rest[:size]
                rest = rest[size + 2:]
                if size == 0:
                    break
            raw = rest
        found.append((status, headers, body))
    return found


def only_answer(transport: Transport) -> tuple[int, dict[bytes, bytes], bytes]:
    (answer,) = responses(transport.value())
    return answer


def assert_json_error(transport: Transport, status: int, words: str) -> dict[str, Any]:
    code, headers, body = only_answer(transport)
    assert code == status
    assert headers[b"connection"] == b"close" and headers[b"x-paddler-instance"] == b"abc123"
    error = json.loads(body)["error"]
    assert error["code"] == status and words in error["message"], error
    assert transport.write_closed, "the answer is followed by a half-close"
    return error


GET = b"GET /v1/models HTTP/1.1\r\nHost: h\r\n\r\n"


def post(length: int, extra: bytes = b"") -> bytes:
    return b"POST /completion HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n%s\r\n" % (length, extra)


# -- the head deadline ---------------------------------------------------------


def test_a_head_trickled_a_byte_a_second_is_cut_at_the_header_timeout():
    """Each byte would restart Twisted's idle timer; the head deadline counts from the first byte."""
    rig = Rig()
    transport = rig.connect()
    for byte in b"GET /v1/models HTTP/1.1\r\nHost: h\r\nX-Slow: ":
        rig.send(transport, bytes([byte]))
        rig.clock.advance(0.2)
        if rig.clock.seconds() >= 9.9:
            break
    assert transport.value() == b""
    rig.clock.advance(10.0 - rig.clock.seconds())
    assert_json_error(transport, 408, "--header-timeout")
    assert outcome_of(rig.answered[0]) == ("timed_out", "client_head")
    rig.clock.advance(LIMITS.linger)
    assert transport.aborted and rig.site.open_connections == 0
    assert rig.clock.getDelayedCalls() == []


def test_the_head_deadline_restarts_for_each_request_of_a_kept_alive_connection():
    """Two requests 9 s apart on one connection, each with a quick head: both answered, nothing cut."""
    rig = Rig()
    transport = rig.connect()
    rig.send(transport, GET)
    rig.clock.advance(9.0)
    rig.send(transport, GET)
    rig.clock.advance(9.0)
    assert [status for status, _, _ in responses(transport.value())] == [200, 200]
    assert not transport.write_closed


def test_an_idle_connection_is_closed_by_the_idle_timeout_not_the_head_deadline():
    rig = Rig()
    transport = rig.connect()
    rig.clock.advance(119.0)
    assert not transport.disconnecting
    rig.clock.advance(1.0)
    assert transport.disconnecting and transport.value() == b""


# -- the body rate -------------------------------------------------------------


def test_a_body_slower_than_the_minimum_rate_is_cut_at_its_deadline():
    """10,000 bytes announced at 1,000 B/s after 10 s of grace: 20 s from the end of the head."""
    rig = Rig()
    transport = rig.connect()
    rig.send(transport, post(10_000))
    for _ in range(19):
        rig.clock.advance(1.0)
        rig.send(transport, b"x" * 100)  # 100 B/s
    assert transport.value() == b""
    rig.clock.advance(1.0)
    assert_json_error(transport, 408, "--min-request-body-rate")
    assert outcome_of(rig.answered[0]) == ("timed_out", "client_body")
    assert rig.resource.seen == [] and rig.memory.held == 0


def test_a_body_at_the_minimum_rate_gets_through():
    rig = Rig()
    transport = rig.connect()
    rig.send(transport, post(10_000))
    for _ in range(10):
        rig.clock.advance(1.0)
        rig.send(transport, b"x" * 1000)
    (status, _, body) = only_answer(transport)
    assert status == 200 and json.loads(body) == {"length": 10_000}


def test_a_chunked_body_must_keep_the_rate_for_what_it_sent():
    """Without a length the deadline grows with the bytes received: a trickle of 10 B/s is cut."""
    rig = Rig()
    transport = rig.connect()
    rig.send(transport, b"POST /completion HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(12):
        rig.clock.advance(1.0)
        rig.send(transport, b"a\r\n0123456789\r\n")
    assert_json_error(transport, 408, "--min-request-body-rate")


# -- answers before the body ---------------------------------------------------


def test_expect_100_continue_with_an_oversized_body_gets_413_and_no_100():
    rig = Rig(max_body=1000)
    transport = rig.connect()
    rig.send(transport, post(5000, b"Expect: 100-continue\r\n"))
    assert b"100 Continue" not in transport.value()
    assert_json_error(transport, 413, "larger than 1000 bytes")


def test_expect_100_continue_within_the_limit_gets_100_then_the_answer():
    rig = Rig(max_body=1000)
    transport = rig.connect()
    rig.send(transport, post(10, b"Expect: 100-continue\r\n"))
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    rig.send(transport, b"0123456789")
    assert only_answer(transport)[0] == 200


def test_a_huge_content_length_is_413_at_once_before_any_byte_of_body():
    rig = Rig()
    transport = rig.connect()
    rig.send(transport, post(10**30))
    assert_json_error(transport, 413, "larger than")
    rig.send(transport, b"x" * 100_000)  # read and dropped while lingering
    assert len(responses(transport.value())) == 1
    assert rig.memory.held == 0 and rig.resource.seen == []


def test_a_chunked_body_that_grows_past_the_limit_is_413_part_way():
    rig = Rig(max_body=100)
    transport = rig.connect()
    rig.send(transport, b"POST /completion HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    rig.send(transport, b"40\r\n" + b"x" * 64 + b"\r\n")
    assert transport.value() == b""
    rig.send(transport, b"40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n")
    assert_json_error(transport, 413, "larger than 100 bytes")
    assert rig.resource.seen == [] and rig.memory.held == 0


# -- body memory across connections -------------------------------------------


def test_bodies_share_one_memory_budget_given_back_when_their_requests_end():
    """Two connections: the first holds 600 of 1000 bytes while its request runs; the second, 600
    more, is refused 503 before its body; once the first finishes the second one's retry fits."""
    rig = Rig(memory=1000, hold=True)
    first, second = rig.connect(), rig.connect()
    rig.send(first, post(600) + b"x" * 600)
    assert rig.memory.held == 600 and len(rig.resource.held) == 1
    rig.send(second, post(600, b"Expect: 100-continue\r\n"))
    error = assert_json_error(second, 503, "--max-request-bodies-memory")
    assert error["type"] == "unavailable_error"
    assert only_answer(second)[1][b"retry-after"] == b"1"
    assert outcome_of(rig.answered[0]) == ("refused", "body_memory")
    rig.resource.release()
    assert rig.memory.held == 0
    third = rig.connect()
    rig.send(third, post(600) + b"y" * 600)
    rig.resource.release()
    assert only_answer(third)[0] == 200 and rig.memory.held == 0


def test_a_chunked_body_that_outgrows_the_memory_budget_is_refused_part_way():
    rig = Rig(memory=100)
    transport = rig.connect()
    rig.send(transport, b"POST /completion HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    rig.send(transport, b"50\r\n" + b"x" * 80 + b"\r\n")
    rig.send(transport, b"50\r\n" + b"x" * 80 + b"\r\n0\r\n\r\n")
    assert_json_error(transport, 503, "--max-request-bodies-memory")
    assert rig.memory.held == 0 and rig.resource.seen == []


def test_a_client_that_leaves_mid_body_gives_its_memory_back():
    rig = Rig()
    transport = rig.connect()
    rig.send(transport, post(1000) + b"x" * 10)
    assert rig.memory.held == 1000
    transport.close()
    assert rig.memory.held == 0 and rig.site.open_connections == 0


# -- framing errors get JSON ---------------------------------------------------


@pytest.mark.parametrize(
    "raw, status, words",
    [
        (b"GET /v1/models HTTP/1.1\nHost: h\n\n", 400, "bare LF"),
        (b"GET /v1/models HTTP/1.1\r\nHost: h\n\r\n", 400, "bare LF"),
        (b"GET /" + b"a" * 17 * 1024 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414, "request line is longer"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * (1 << 20) + b"\r\n\r\n", 431, "headers are larger"),
        (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-A: b\r\n" * 501 + b"\r\n", 431, "more than 500 headers"),
        (b"GET / HTTP/1.1\r\n" + b"X-Many: " + b"c" * 8000 + b"\r\n" + b"X-More: " + b"d" * 9000 + b"\r\n\r\n",
         431, "headers are larger"),
        (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "single spaces"),
        (b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "method must be a token"),
        (b"GET /\xff HTTP/1.1\r\nHost: h\r\n\r\n", 400, "visible ASCII"),
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 400, "only HTTP/1.1"),
        (b"GET / HTTQ/1.1\r\nHost: h\r\n\r\n", 400, "must end with HTTP/1.1"),
        (b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "request line"),
        (b"GET / HTTP/1.1\r\nHost h\r\n\r\n", 400, "no colon"),
        (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400, "header name must be a token"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400, "NUL or CR"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400, "NUL or CR"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400, "whole number"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400, "more than one"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
         "more than one"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "only Transfer-Encoding"),
    ],
)
def test_framing_errors_are_answered_at_once_with_json(raw, status, words):
    """What Twisted would answer with a bare 400, with nothing, or not at all (bare LF) gets a JSON error."""
    rig = Rig()
    transport = rig.connect()
    rig.send(transport, raw)
    assert_json_error(transport, status, words)
    assert rig.resource.seen == []
    assert rig.clock.getDelayedCalls()[0].getTime() == LIMITS.linger  # only the linger is left


def test_a_framing_error_trickled_in_is_answered_as_soon_as_it_shows():
    """A bare LF in the second packet: answered then, not at the idle timeout."""
    rig = Rig()
    transport = rig.connect()
    rig.send(transport, b"GET / HTTP/1.1\r")
    rig.send(transport, b"\nHost: h\r\n")
    assert transport.value() == b""
    rig.send(transport, b"X: y\n")
    assert_json_error(transport, 400, "bare LF")


CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nab\r\n0\r\n\r\n",  # a size that is not hex
        b"3\r\nabcX\r\n0\r\n\r\n",  # data longer than its size
        b"3\nabc\r\n0\r\n\r\n",  # a bare LF after the size
        b"3\r\nabc\r\n0\r\nX-T: 1\n\r\n",  # a bare LF in the trailers
        b"-3\r\nabc\r\n0\r\n\r\n",  # a negative size
        b"1" * 40 + b"\r\n",  # a size no body could have
        # what Twisted's own decoder refuses, so it must be refused before it sees it:
        b"5 \r\nhello\r\n0\r\n\r\n",  # whitespace after the size
        b"5;a\\b\r\nhello\r\n0\r\n\r\n",  # a backslash in an extension
        b"5;\x01\r\nhello\r\n0\r\n\r\n",  # a control character in an extension
        b"5;" + b"x" * 1100 + b"\r\nhello\r\n0\r\n\r\n",  # a chunk-size line over 1,023 bytes
    ],
)
def test_a_malformed_chunked_body_gets_a_json_400_not_a_bare_one(body):
    """Twisted answers a chunked body it cannot decode with a bare 400; paddler says what was wrong."""
    for pieces in ([body], [bytes([b]) for b in body]):  # whole, then a byte per read
        rig = Rig()
        transport = rig.connect()
        rig.send(transport, CHUNKED_HEAD)
        for piece in pieces:
            rig.send(transport, piece)
        assert_json_error(transport, 400, "chunked request body")
        assert rig.resource.seen == []


def test_chunked_bodies_with_extensions_and_trailers_pipelined_are_both_served():
    rig = Rig()
    transport = rig.connect()
    first = CHUNKED_HEAD + b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
    second = CHUNKED_HEAD + b"2\r\nde\r\n0\r\n\r\n"
    for byte in first + second:  # one byte per read: every boundary split
        rig.send(transport, bytes([byte]))
    assert [json.loads(body) for _, _, body in responses(transport.value())] == [{"length": 3}, {"length": 2}]
    assert rig.resource.seen == [b"abc", b"de"]


def test_bare_lf_inside_a_body_is_fine():
    rig = Rig()
    transport = rig.connect()
    rig.send(transport, post(6) + b"a\nb\nc\n")
    assert only_answer(transport)[0] == 200 and rig.resource.seen == [b"a\nb\nc\n"]


def test_a_request_pipelined_behind_one_answered_in_the_same_read_is_checked_and_served_when_its_head_is_cut():
    """Found by tests/test_request_parsers.py: its head began in the read that finished the first request."""
    rig = Rig()
    transport = rig.connect()
    second = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Type: close\r\n\r\n"
    rig.send(transport, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n" + second[:40])
    rig.send(transport, second[40:41])
    rig.send(transport, second[41:])
    assert [status for status, _, _ in responses(transport.value())] == [200, 200]
    transport.clear()
    rig.send(transport, b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET  / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [status for status, _, _ in responses(transport.value())] == [200, 400]
    transport.clear()


def test_a_bare_lf_in_a_head_pipelined_behind_an_answered_request_is_a_json_400():
    rig = Rig()
    transport = rig.connect()
    rig.send(transport, b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\nHost: h\r\n\r\n")
    statuses = [status for status, _, _ in responses(transport.value())]
    assert statuses == [200, 400] and b"bare LF" in transport.value()


def test_two_pipelined_requests_are_both_answered_in_order():
    rig = Rig()
    transport = rig.connect()
    rig.send(transport, post(3) + b"abc" + post(2) + b"de")
    assert [json.loads(body) for _, _, body in responses(transport.value())] == [{"length": 3}, {"length": 2}]


def test_after_an_early_answer_whatever_the_client_sends_is_dropped_and_the_connection_aborted_after_the_linger():
    rig = Rig()
    transport = rig.connect()
    rig.send(transport, b"GET / HTTP/2.0\r\n")
    rig.send(transport, GET * 100)
    assert len(responses(transport.value())) == 1
    rig.clock.advance(LIMITS.linger)
    assert transport.aborted and rig.clock.getDelayedCalls() == []


# -- the connection cap ---------------------------------------------------------


def test_connections_above_the_cap_get_503_and_are_closed_and_counted():
    """Cap 4: the 5th connection is answered 503 at once; when one closes, a new one is served."""
    rig = Rig()
    open_ones = [rig.connect() for _ in range(4)]
    assert rig.site.open_connections == 4
    refused = rig.connect()
    assert isinstance(refused.protocol, OverCapacity)
    assert_json_error(refused, 503, "--max-connections")
    assert rig.site.connections_refused == 1
    assert outcome_of(rig.answered[0]) == ("refused", "connection_limit")
    rig.clock.advance(LIMITS.linger)
    assert refused.aborted and rig.site.lingering_refusals == 0
    open_ones[0].close()
    again = rig.connect()
    rig.send(again, GET)
    assert only_answer(again)[0] == 200


def test_one_client_address_above_its_own_cap_gets_429_and_the_others_are_served():
    """--max-connections-per-client 2: a third connection from 10.0.0.1 is answered 429 and closed,
    10.0.0.2 still connects; when one of 10.0.0.1's closes, it may open another."""
    from dataclasses import replace

    rig = Rig(replace(LIMITS, max_connections_per_client=2))
    first = [rig.connect("10.0.0.1") for _ in range(2)]
    refused = rig.connect("10.0.0.1")
    assert isinstance(refused.protocol, OverCapacity)
    error = assert_json_error(refused, 429, "--max-connections-per-client")
    assert "10.0.0.1" not in json.dumps(error)  # the answer does not echo addresses
    assert outcome_of(rig.answered[-1]) == ("refused", "client_connection_limit")
    assert rig.site.connections_refused == 1
    other = [rig.connect("10.0.0.2") for _ in range(2)]
    for transport in other:
        rig.send(transport, GET)
        assert only_answer(transport)[0] == 200
    rig.clock.advance(LIMITS.linger)
    assert refused.aborted and rig.site.open_connections == 4
    first[0].close()
    again = rig.connect("10.0.0.1")
    rig.send(again, GET)
    assert only_answer(again)[0] == 200
    for transport in [first[1], again, *other]:
        transport.close()
    assert rig.site.open_connections == 0 and rig.site.connections_by_client == {}


def test_without_a_per_client_cap_one_address_may_use_the_whole_listener():
    rig = Rig()
    transports = [rig.connect("10.0.0.1") for _ in range(LIMITS.max_connections)]
    assert not any(isinstance(t.protocol, OverCapacity) for t in transports)
    assert rig.site.connections_by_client == {"10.0.0.1": LIMITS.max_connections}


def test_a_flood_above_the_cap_is_answered_and_closed_without_lingering_once_many_refusals_linger():
    """Past MAX_LINGERING_REFUSALS at once, a refusal keeps no descriptor: answered, then closed."""
    rig = Rig()
    kept = [rig.connect() for _ in range(4)]
    flood = [rig.connect() for _ in range(MAX_LINGERING_REFUSALS + 10)]
    assert all(responses(t.value())[0][0] == 503 for t in flood)
    closed_at_once = [t for t in flood if t.disconnecting and not t.write_closed]
    assert len(closed_at_once) == 10
    for transport in closed_at_once:
        transport.close()  # the kernel's part, once the answer is sent
    assert rig.site.connections_refused == MAX_LINGERING_REFUSALS + 10
    rig.clock.advance(LIMITS.linger)
    assert rig.site.lingering_refusals == 0
    for transport in kept:
        transport.close()
    assert rig.clock.getDelayedCalls() == []


def test_the_cap_is_logged_at_most_once_a_minute():
    from twisted.logger import globalLogPublisher

    lines: list[dict] = []
    globalLogPublisher.addObserver(lines.append)
    try:
        rig = Rig()
        for _ in range(4):
            rig.connect()
        for _ in range(5):
            rig.connect().close()
        rig.clock.advance(61)
        rig.connect().close()
    finally:
        globalLogPublisher.removeObserver(lines.append)
    capped = [e for e in lines if "the cap (--max-connections)" in e.get("log_format", "")]
    assert [e["refused"] for e in capped] == [1, 5]


def test_a_site_leaves_no_timer_behind_once_its_connections_are_gone():
    rig = Rig()
    transports = [rig.connect() for _ in range(3)]
    rig.send(transports[0], GET)
    rig.send(transports[1], b"GET / HT")
    for transport in transports:
        transport.close()
    assert rig.site.open_connections == 0
    assert all(not call.active() for call in rig.clock.getDelayedCalls())


# -- descriptors ---------------------------------------------------------------------


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(monkeypatch):
    import resource

    from paddler.server.descriptors import raise_open_files_limit

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 524288))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    assert raise_open_files_limit() == (1024, 524288)
    assert calls == [(524288, 524288)]


def test_a_limit_that_cannot_be_raised_is_left_and_reported_as_it_is(monkeypatch):
    import resource

    from paddler.server.descriptors import raise_open_files_limit

    def refuse(which, limits):
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert raise_open_files_limit() == (1024, 1024)


def test_the_connection_cap_is_fitted_under_the_open_files_limit():
    """Two descriptors a proxied connection, one a management connection, 256 kept for the rest."""
    from paddler.server.descriptors import fit_connection_cap

    assert fit_connection_cap(1024, 20000) == 1024
    assert fit_connection_cap(1024, 1024) == (1024 - 256) // 3 == 256
    assert fit_connection_cap(1024, None) == 1024
    assert fit_connection_cap(1024, 100) == (100 - 25) // 3 == 25


def test_starting_a_balancer_logs_the_open_files_limit_and_a_lowered_cap(monkeypatch):
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import capturedLogs

    import paddler.server.descriptors as descriptors
    from paddler.config import BalancerConfig
    from paddler.tap import _raise_open_files_limit, makeBalancerService

    monkeypatch.setattr(descriptors, "raise_open_files_limit", lambda: (1024, 4096))
    monkeypatch.setattr(descriptors, "open_files_limit", lambda: 1024)
    with capturedLogs() as events:
        _raise_open_files_limit()
        service = makeBalancerService(BalancerConfig(), MemoryReactorClock())
    lines = [e["log_format"].format(**{k: v for k, v in e.items() if isinstance(k, str)}) for e in events
             if "log_format" in e and ("RLIMIT_NOFILE" in e["log_format"])]
    assert any("raised from 1024 to 4096" in line for line in lines), lines
    assert any("--max-connections 1024 lowered to 256" in line for line in lines), lines
    assert all(site.limits.max_connections == 256 for site in service.sites)


def test_the_reserve_scales_with_a_low_limit_and_the_start_up_log_says_why(monkeypatch):
    """Open-files limit 256: the reserve is 64 (a quarter), not 256, so the cap is 64, not 1; the log says so."""
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import capturedLogs

    import paddler.server.descriptors as descriptors
    from paddler.config import BalancerConfig
    from paddler.tap import makeBalancerService

    assert [descriptors.reserved_descriptors(n) for n in (256, 1024, 4096, 3)] == [64, 256, 256, 0]
    assert descriptors.fit_connection_cap(1024, 256) == (256 - 64) // 3 == 64
    monkeypatch.setattr(descriptors, "open_files_limit", lambda: 256)
    with capturedLogs() as events:
        service = makeBalancerService(BalancerConfig(), MemoryReactorClock())
    lines = [e["log_format"].format(**{k: v for k, v in e.items() if isinstance(k, str)}) for e in events
             if "log_format" in e and "lowered to" in e["log_format"]]
    assert len(lines) == 1 and "lowered to 64" in lines[0], lines
    assert "64 are kept" in lines[0] and "min(256, limit/4)" in lines[0], lines
    assert all(site.limits.max_connections == 64 for site in service.sites)
    monkeypatch.setattr(descriptors, "open_files_limit", lambda: 20000)
    with capturedLogs() as events:
        makeBalancerService(BalancerConfig(), MemoryReactorClock())
    said = [e.get("why") for e in events if e.get("why")]
    assert said == ["connection cap 1024 per listener (--max-connections); the open-files limit 20000 "
                    "allows 6581 after keeping 256 for the rest"], said


def test_a_reload_applies_new_client_limits_and_body_memory_to_both_listeners():
    """SIGHUP with a shorter --header-timeout, a lower --max-connections and another body budget:
    both sites take the new limits (fitted to the open-files limit), the budget changes in place."""
    from twisted.internet.testing import MemoryReactorClock

    from paddler.balancer.reload import Reloader
    from paddler.config import BalancerConfig
    from paddler.tap import makeBalancerService

    service = makeBalancerService(BalancerConfig(), MemoryReactorClock())
    new = BalancerConfig(header_timeout=3.0, max_connections=50, client_idle_timeout=30.0,
                         max_request_bodies_memory=64 * 1024 * 1024, max_connections_per_client=8)

    class Prober:
        timeout, mode, unhealthy_after, api_key = 2.0, "slots", 2, None

    changes = Reloader(service, lambda: new, Prober(), open_files=lambda: 20000).reload()
    assert "header_timeout is now 3.0" in changes and "max_connections is now 50" in changes
    assert [(s.limits.header_timeout, s.limits.max_connections, s.timeOut) for s in service.sites] == [
        (3.0, 50, 30.0), (3.0, 50, 30.0)
    ]
    assert "max_connections_per_client is now 8" in changes
    assert [s.limits.max_connections_per_client for s in service.sites] == [8, 8]
    assert service.body_memory.limit == 64 * 1024 * 1024


def test_the_channel_says_whether_its_connection_is_tls_once_per_connection_and_rightly_for_each():
    from twisted.internet.interfaces import ISSLTransport
    from zope.interface import directlyProvides

    rig = Rig()
    plain, tls = rig.connect(), rig.connect("127.0.0.2")
    directlyProvides(tls, ISSLTransport)
    assert [plain.protocol.isSecure(), tls.protocol.isSecure()] == [False, True]
    directlyProvides(tls)  # asked once: the answer stays the connection's
    assert [plain.protocol.isSecure(), tls.protocol.isSecure()] == [False, True]


def test_a_site_refuses_a_request_parser_it_does_not_know():
    with pytest.raises(ValueError, match="request parser"):
        GuardedSite(Echo(), LIMITS, Clock(), parser="h11")


@pytest.mark.parametrize("parser", ["twisted", "httptools"])
def test_the_request_parser_setting_reaches_the_proxy_port_only(parser, monkeypatch):
    monkeypatch.setattr(GuardedSite, "request_parser", "twisted")  # not both_parsers': the setting alone
    from dataclasses import replace

    from twisted.internet.testing import MemoryReactorClock

    from paddler.config import BalancerConfig
    from paddler.server.channel import GuardedChannel
    from paddler.server.httptools_channel import HttptoolsChannel
    from paddler.tap import makeBalancerService

    assert BalancerConfig.request_parser == "twisted"  # the default: Twisted's parser
    config = replace(BalancerConfig(), request_parser=parser)
    proxy_site, management_site = makeBalancerService(config, MemoryReactorClock()).sites
    assert proxy_site.protocol is (HttptoolsChannel if parser == "httptools" else GuardedChannel)
    assert management_site.protocol is GuardedChannel
