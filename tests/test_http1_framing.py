"""The body scanners find the exact end of a body however the bytes are split, and fail only with FramingError."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paddler.upstream.http1 import (
    MAX_LINE,
    ChunkedScanner,
    CloseScanner,
    FramingError,
    LengthScanner,
    parse_head,
)

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8).map(str.encode)
extension = st.lists(st.tuples(token, st.one_of(st.none(), token)), max_size=3).map(
    lambda pairs: b"".join(b";" + n + (b"=" + v if v is not None else b"") for n, v in pairs)
)
trailers = st.lists(st.tuples(token, token), max_size=3).map(
    lambda pairs: b"".join(n + b": " + v + b"\r\n" for n, v in pairs)
)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A chunked body (random chunk sizes, upper/lower hex, extensions, trailers) and its payload."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=300), max_size=12))
    wire = []
    for data in chunks:
        size = b"%x" % len(data)
        if draw(st.booleans()):
            size = size.upper()
        if draw(st.booleans()):
            size = b"0" * draw(st.integers(1, 3)) + size
        wire.append(size + draw(extension) + b"\r\n" + data + b"\r\n")
    wire.append(b"0" + draw(extension) + b"\r\n" + draw(trailers) + b"\r\n")
    return b"".join(wire), b"".join(chunks)


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """C{data} cut at random points (reads of any size, empty ones included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=20)))
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


def feed_all(scanner: ChunkedScanner | LengthScanner, pieces: list[bytes]) -> tuple[int, bool]:
    """Feed C{pieces} until the body ends; return the bytes consumed and whether some were left over."""
    consumed = 0
    for i, piece in enumerate(pieces):
        used = scanner.feed(piece)
        consumed += used
        if scanner.done:
            return consumed, used < len(piece) or any(pieces[i + 1:])
        assert used == len(piece), "a body that has not ended takes every byte"
    return consumed, False


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), chunked_bodies(), st.binary(max_size=20))
def test_chunked_end_is_exact_however_the_reads_are_split(data, body, after):
    """The scanner ends exactly at the last byte of the body (last chunk, trailers) whatever the read
    boundaries, decodes the payload, and leaves what follows the body alone."""
    wire, payload = body
    pieces = data.draw(splits(wire + after))
    decoded: list[bytes] = []
    scanner = ChunkedScanner(tail_bytes=64, sink=decoded.append)
    consumed, leftover = feed_all(scanner, pieces)
    assert scanner.done
    assert consumed == len(wire)
    assert leftover == bool(after)
    assert b"".join(decoded) == payload
    assert payload.endswith(scanner.tail())
    if len(wire) <= 64:  # the tail covers at least the last 64 bytes of the wire
        assert scanner.tail() == payload


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), chunked_bodies())
def test_raw_mode_tail_decodes_the_payload_end_even_when_framing_cuts_it(data, body):
    """Without a sink (pass-through) the scanner still gives the payload's last bytes, decoded, however
    chunk framing and reads cut them."""
    wire, payload = body
    scanner = ChunkedScanner(tail_bytes=100)
    consumed, _ = feed_all(scanner, data.draw(splits(wire)))
    assert consumed == len(wire) and scanner.done
    tail = scanner.tail()
    assert payload.endswith(tail)
    if len(wire) <= 100:
        assert tail == payload


def test_timings_cut_by_a_chunk_boundary_come_back_whole():
    """llama.cpp's timings object split over two chunks (and two reads) is whole in the tail."""
    last = b'data: {"stop":true,"timings":{"prompt_n":3,"predicted_per_second":41.5}}\n\n'
    cut = last.index(b"predicted")
    wire = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (cut, last[:cut], len(last) - cut, last[cut:])
    scanner = ChunkedScanner(tail_bytes=8192)
    for piece in (wire[:cut + 3], wire[cut + 3:]):
        scanner.feed(piece)
    assert scanner.done
    assert scanner.tail() == last


@pytest.mark.parametrize(
    "wire",
    [
        b"1\r\na\r\n0\r\n\r\n",
        b"1;ext=\"q\"\r\na\r\n0\r\n\r\n",
        b"1 ;ext\r\na\r\n0\r\n\r\n",
        b"A\r\n0123456789\r\n0\r\nX-Checksum: 1\r\nX-Other: 2\r\n\r\n",
        b"0\r\n\r\n",
    ],
)
def test_wellformed_bodies_end_byte_by_byte(wire):
    """A body fed one byte at a time (a final 0 CRLF CRLF split everywhere) ends at its last byte."""
    scanner = ChunkedScanner()
    for i in range(len(wire)):
        assert not scanner.done
        assert scanner.feed(wire[i:i + 1]) == 1
    assert scanner.done
    assert scanner.feed(b"more") == 0


@pytest.mark.parametrize(
    "wire",
    [
        b"g\r\n",  # not hex
        b"-1\r\n",
        b"+1\r\na\r\n",
        b"0x1\r\na\r\n",
        b"1_0\r\n",
        b" 1\r\na\r\n",
        b"\r\n",  # empty size
        b"1\na\r\n",  # LF without CR
        b"1\r\nab\r\n",  # data longer than the size
        b"1\r\na\n0\r\n\r\n",
        b"1\r\na\r\n0\r\nno-colon\r\n\r\n",
        b"1\r\na\r\n0\r\n\rx",
        b"1" * 16 + b"\r\n",  # size too large
        b"1;" + b"e" * (MAX_LINE + 10) + b"\r\n",
        b"1\r\r\n",
    ],
)
def test_malformed_framing_is_a_framing_error(wire):
    """Bad sizes, bare LFs, data overruns, bad trailers, overlong lines: FramingError, whole or split."""
    with pytest.raises(FramingError):
        ChunkedScanner().feed(wire)
    scanner = ChunkedScanner()
    with pytest.raises(FramingError):
        for i in range(len(wire)):
            scanner.feed(wire[i:i + 1])


def test_an_endless_line_without_line_feed_is_refused():
    """A size line that never ends cannot grow the scanner's memory without bound."""
    scanner = ChunkedScanner()
    with pytest.raises(FramingError):
        for _ in range(100):
            scanner.feed(b"1" * 100)


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_garbage_only_ever_raises_framing_error(pieces):
    """Random bytes: the scanner takes them, ends, or raises FramingError; nothing else."""
    scanner = ChunkedScanner(tail_bytes=16, sink=lambda _: None)
    try:
        for piece in pieces:
            used = scanner.feed(piece)
            assert 0 <= used <= len(piece)
            if scanner.done:
                break
        scanner.tail()
    except FramingError:
        pass


@settings(max_examples=300)
@given(st.data(), chunked_bodies(), st.integers(0, 10_000), st.integers(0, 255))
def test_one_corrupted_byte_gives_a_framing_error_or_a_consistent_end(data, body, where, value):
    """A valid body with one byte changed: FramingError, or an end that accounts for every byte fed."""
    wire, _ = body
    position = where % len(wire)
    corrupted = wire[:position] + bytes([value]) + wire[position + 1:]
    scanner = ChunkedScanner(tail_bytes=32)
    try:
        consumed, _ = feed_all(scanner, data.draw(splits(corrupted)))
    except FramingError:
        return
    assert consumed <= len(corrupted)


@given(st.data(), st.binary(max_size=500), st.binary(max_size=20))
def test_length_body_ends_after_exactly_content_length_bytes(data, body, after):
    """A sized body ends after exactly its length, whatever the reads; what follows is left over."""
    decoded: list[bytes] = []
    scanner = LengthScanner(len(body), tail_bytes=50, sink=decoded.append)
    consumed, leftover = feed_all(scanner, data.draw(splits(body + after)))
    assert scanner.done and consumed == len(body) and b"".join(decoded) == body
    assert leftover == bool(after) or not body and not after
    assert body.endswith(scanner.tail()) and len(scanner.tail()) >= min(50, len(body))


def test_close_delimited_body_ends_with_the_connection():
    """A body without length or chunking ends, cleanly, only when the connection closes."""
    decoded: list[bytes] = []
    scanner = CloseScanner(tail_bytes=4, sink=decoded.append)
    assert scanner.feed(b"abc") == 3 and not scanner.done
    assert scanner.eof() and scanner.done
    assert decoded == [b"abc"]


@pytest.mark.parametrize(
    "head, chunked, length, close",
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", True, None, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5", False, 5, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5", False, 5, False),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0", False, 0, True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2", False, 2, True),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2", False, 2, False),
        (b"HTTP/1.1 204 No Content", False, None, False),
    ],
)
def test_response_heads_give_the_framing(head, chunked, length, close):
    """Status line and framing headers: chunked wins over Content-Length, HTTP/1.0 closes by default."""
    parsed = parse_head(head)
    assert (parsed.chunked, parsed.length, parsed.connection_close) == (chunked, length, close)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/2 200 OK",
        b"HTTP/1.1 20 OK",
        b"ICY 200 OK",
        b"HTTP/1.1 200 OK\r\nbad header",
        b"HTTP/1.1 200 OK\r\n folded: value",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked",
        # ambiguous framing: a recipient that guesses can hand one answer's bytes to the next request
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\tfolded",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b",
        b"HTTP/1.1 200 OK\r\nX-A: a\x1bb",
        b"HTTP/1.1 200 OK\r\nX-A: a\x7fb",
        b"HTTP/1.1 200 OK\r\nX A: b",
        b"HTTP/1.1 200 OK\r\nX-A : b",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\nX-A: b",
    ],
)
def test_odd_response_heads_are_framing_errors(head):
    """Heads paddler cannot frame exactly (other codings, conflicting lengths) are refused, not guessed."""
    with pytest.raises(FramingError):
        parse_head(head)


@given(st.binary(max_size=300))
def test_garbage_heads_only_ever_raise_framing_error(raw):
    """Random bytes as a response head: parsed or FramingError, nothing else."""
    try:
        parse_head(raw)
    except FramingError:
        pass


# -- strict scanning of request bodies against Twisted's own decoder --------------------------

_FRAMING_BYTES = st.sampled_from([b"0", b"1", b"5", b"a", b"F", b" ", b"\t", b";", b"=", b"\\", b"\x01", b"\x7f",
                                  b"\x80", b"\r", b"\n", b"\r\n", b"x", b":"])


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """A well-formed chunked body with a few framing-ish bytes inserted anywhere (a space after a size,
    a backslash in an extension, a stray CR...)."""
    wire = draw(chunked_bodies())[0]
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(wire)))
        wire = wire[:at] + draw(_FRAMING_BYTES) + wire[at:]
    return wire


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), mutated_bodies())
def test_strict_scanning_refuses_whatever_twisteds_decoder_refuses_and_no_later(data, wire):
    """
    The balancer follows a chunked request body with a strict L{ChunkedScanner} before Twisted's
    decoder sees the same bytes, so that a malformed body gets a JSON 400 instead of Twisted's bare
    one. For any bytes cut into any reads: if Twisted's decoder refuses them, the strict scanner has
    refused them by the same read; and a body the scanner ends, Twisted ends at the same byte.
    """
    from twisted.web.http import _ChunkedTransferDecoder, _MalformedChunkedDataError  # test-only

    pieces = data.draw(splits(wire))
    ended: list[bytes] = []
    decoder = _ChunkedTransferDecoder(lambda _: None, ended.append)
    scanner = ChunkedScanner(strict=True)
    for piece in pieces:
        try:
            used = scanner.feed(piece)
        except FramingError:
            return  # refused first (or alone: it may be stricter than Twisted, never laxer)
        try:
            decoder.dataReceived(piece)
        except _MalformedChunkedDataError as e:
            raise AssertionError(f"Twisted refused what the strict scanner took ({e}): {wire!r} in {pieces!r}")
        if scanner.done:
            assert ended, f"the scanner ended the body, Twisted did not: {wire!r}"
            assert ended[0] == piece[used:], f"they disagree on where the body ends: {wire!r} in {pieces!r}"
            return
        assert not ended, f"Twisted ended the body, the scanner did not: {wire!r}"
