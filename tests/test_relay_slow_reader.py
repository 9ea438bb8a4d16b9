"""Through a real balancer on the lean reactor: slow readers, many chunks, with the write flush on (the default) and off.

A client that reads 4 KiB at a time with pauses, from a 64 KiB receive
buffer, while the answer is ~5 MB (more than the kernel's socket buffers
of both ends hold), makes the balancer's sends partial once those buffers
are full, so the bytes wait in Twisted's buffer and the upstream is paused
and resumed; a second client reads at full speed at the same time. Each
gets every event once, in order, in a well-formed chunked body, in both
relay modes, with the flush on and off; and the balancer says which.

The receive buffer is not smaller on purpose: with 4 KiB (about one TCP
segment) the client's kernel, avoiding silly windows, sometimes stops
sending window updates and the balancer's kernel then sends one segment
per zero-window probe (the persist timer, ~200 ms): ~10 KB/s, with the
write flush on or off alike (contrib/flushstall/README.md).
Real processes on 127.0.0.1.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .pattern_upstream import expected_events
from .processes import Processes, free_port, get_json, wait_for
from .relay_checks import MODES, post_raw

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EVENTS = 260_000  # ~5 MB of payload
SLOW_RCVBUF = 64 * 1024
FLUSH = {"flush-on": (), "flush-off": ("--no-flush-before-poll",)}


@pytest.fixture(scope="module")
def balancers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, object]]]:
    """The pattern upstream and one balancer per relay mode in front of it."""
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "tests.pattern_upstream", str(port)], cwd=ROOT)
    procs = Processes(tmp_path_factory.mktemp("slow-reader"))
    try:
        wait_for(lambda: get_json(f"http://127.0.0.1:{port}/health")[0] == 200, 20, "the pattern upstream")
        proxies = {}
        for mode, flags in MODES.items():
            for flush, flush_flags in FLUSH.items():
                process, proxy, _ = procs.balancer(
                    "--upstream", f"http://127.0.0.1:{port}", "--probe-interval", "0.2", *flags, *flush_flags
                )
                proxies[f"{mode}-{flush}"] = (proxy, process)
        yield proxies
    finally:
        procs.stop_all()
        upstream.terminate()
        upstream.wait(10)


def read_raw(url: str, body: dict, rcvbuf: int | None, piece: int | None) -> bytes:
    """POST C{body} on a raw socket and read the whole answer, C{piece} bytes at a time (None: at once)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(60)
    sock.connect((host, int(port)))
    got = bytearray()
    try:
        post_raw(sock, "/completion", body, extra="Connection: close\r\n")
        if piece is not None:
            time.sleep(0.3)  # let the balancer's buffers fill before the first read
        while True:
            data = sock.recv(piece or 1 << 20)
            if not data:
                return bytes(got)
            got += data
            if piece is not None:
                time.sleep(0.0005)
    finally:
        sock.close()


def decode_chunked(raw: bytes) -> tuple[bytes, dict[str, str], bytes, bytes]:
    """(status line, headers, payload, bytes after the last chunk), decoded strictly."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of head in {raw[:200]!r}"
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode().strip().lower()] = value.decode().strip()
    assert headers.get("transfer-encoding") == "chunked", headers
    parts, pos = [], 0
    while True:
        end = rest.index(b"\r\n", pos)
        size = int(rest[pos:end].split(b";")[0], 16)
        if size == 0:
            stop = rest.index(b"\r\n\r\n", end) + 4
            return lines[0], headers, b"".join(parts), rest[stop:]
        assert rest[end + 2 + size:end + 4 + size] == b"\r\n", "chunk data not followed by CRLF"
        parts.append(rest[end + 2:end + 2 + size])
        pos = end + 4 + size


@pytest.mark.parametrize("flush", list(FLUSH))
@pytest.mark.parametrize("mode", list(MODES))
def test_a_slow_reader_and_a_fast_one_at_once_get_every_event_once_in_order(balancers, mode, flush):
    proxy, process = balancers[f"{mode}-{flush}"]
    wait_for(lambda: get_json(proxy + "/health")[1]["upstreams"]["healthy"] == 1, 20, "the upstream healthy")
    results: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def run(name: str, rcvbuf: int | None, piece: int | None, per_chunk: int) -> None:
        try:
            results[name] = read_raw(proxy, {"events": EVENTS, "per_chunk": per_chunk, "stream": True}, rcvbuf, piece)
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=("slow", SLOW_RCVBUF, 4096, 1)),
        threading.Thread(target=run, args=("fast", None, None, 7)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    expected = expected_events(EVENTS)
    for name in ("slow", "fast"):
        status, headers, payload, after = decode_chunked(results[name])
        assert status.startswith(b"HTTP/1.1 200"), status
        assert headers["content-type"].startswith("text/event-stream")
        assert after == b""
        assert len(payload) == len(expected) and payload == expected, f"{name}: the events differ"
    said = "on" if flush == "flush-on" else "off"
    assert f"reactor LeanEPollReactor, write flush {said}" in process.log()  # type: ignore[attr-defined]


def test_the_balancer_says_when_it_runs_on_twisteds_reactor_with_the_flush(tmp_path):
    procs = Processes(tmp_path)
    try:
        process, proxy, _ = procs.balancer("--no-lean-reactor")
        wait_for(lambda: "write flush" in process.log(), 10, "the startup line")
        assert "reactor EPollReactor, write flush on" in process.log()
        assert get_json(proxy + "/health")[1]["upstreams"]["healthy"] == 0
    finally:
        procs.stop_all()
