"""A tiny SSE upstream for the streaming benchmark (asyncio protocols, uvloop when installed; no Twisted).

``POST /completion?n=N&rate=R`` (any POST path; ``bench_events``,
``bench_rate`` and ``bench_hold`` in the JSON body win over ``n``, ``rate``
and ``hold`` in the query string, for routers that drop it) answers ``text/event-stream`` (chunked) with N events R per
second, each ``data: {"t": T, "i": I}`` where T is
``clock_gettime(CLOCK_MONOTONIC)`` taken just before the write: that clock
is system-wide on Linux, so the client subtracts it from its own reading to
get the delay a chunk spent between the upstream's write and the client's
read. ``n=0&hold=S`` sends the headers and one comment, then holds the
stream open for S seconds (idle streams). ``GET /slots``, ``/props``,
``/health`` and ``/v1/models`` report ``--slots`` idle slots so that no
balancer makes a request wait. Each stream is a timer callback, not a
coroutine, so that 1,000 streams at 50 events/s stay cheap; a request that
asked for ``Connection: close`` is closed after its answer.

    python -m bench.sse_upstream --port P [--slots 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

CLOCK = time.CLOCK_MONOTONIC


def now() -> float:
    return time.clock_gettime(CLOCK)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n"
)


class Bodies:
    def __init__(self, slots: int) -> None:
        self.slots = json.dumps([{"id": i, "is_processing": False} for i in range(slots)]).encode()
        self.props = json.dumps({"total_slots": slots, "model_alias": "bench", "model_path": "bench.gguf"}).encode()
        self.models = json.dumps({"object": "list", "data": [{"id": "bench", "object": "model"}]}).encode()


class Connection(asyncio.Protocol):
    def __init__(self, bodies: Bodies) -> None:
        self.bodies = bodies
        self.buffer = b""
        self.transport: Any = None
        self.timer: Any = None
        self.streaming = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.streaming:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            lines = head.split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and "close" in value.lower():
                    close = True
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            self.answer(method, target, body, close)

    def answer(self, method: str, target: str, body: bytes, close: bool) -> None:
        url = urlsplit(target)
        if method == "GET":
            payload = {
                "/slots": self.bodies.slots,
                "/props": self.bodies.props,
                "/v1/models": self.bodies.models,
            }.get(url.path, b'{"status":"ok"}')
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                % (len(payload), b"Connection: close\r\n" if close else b"", payload)
            )
            if close:
                self.transport.close()
            return
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            params = json.loads(body) if body else {}
        except ValueError:
            params = {}
        if not isinstance(params, dict):
            params = {}
        n = int(params.get("bench_events", query.get("n", 100)))
        rate = float(params.get("bench_rate", query.get("rate", 50)))
        hold = float(params.get("bench_hold", query.get("hold", 0)))
        Stream(self, n, rate, hold, close).start()


class Stream:
    """One answer: the head, then an event every 1/rate s from a timer callback."""

    def __init__(self, conn: Connection, n: int, rate: float, hold: float, close: bool) -> None:
        self.conn = conn
        self.n = n
        self.interval = 1.0 / rate
        self.hold = hold
        self.close = close
        self.i = 0
        self.loop = asyncio.get_running_loop()

    def start(self) -> None:
        conn = self.conn
        conn.streaming = True
        conn.transport.write(STREAM_HEAD)
        if self.n == 0:
            conn.transport.write(chunk(b": open\n\n"))
            conn.timer = self.loop.call_later(self.hold, self.finish)
            return
        self.start_at = self.loop.time()
        conn.timer = self.loop.call_at(self.start_at + self.interval, self.tick)

    def tick(self) -> None:
        conn = self.conn
        if conn.transport.is_closing():
            return
        conn.transport.write(chunk(b'data: {"t": %.6f, "i": %d}\n\n' % (now(), self.i)))
        self.i += 1
        if self.i >= self.n:
            self.finish()
            return
        conn.timer = self.loop.call_at(self.start_at + (self.i + 1) * self.interval, self.tick)

    def finish(self) -> None:
        conn = self.conn
        conn.timer = None
        if conn.transport.is_closing():
            return
        conn.transport.write(b"0\r\n\r\n")
        conn.streaming = False
        if self.close:
            conn.transport.close()
        elif conn.buffer:
            conn.data_received(b"")


async def serve(port: int, slots: int) -> None:
    bodies = Bodies(slots)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(bodies), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def run(coro: Any) -> Any:
    """Run C{coro} on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slots", type=int, default=4096)
    args = parser.parse_args()
    try:
        run(serve(args.port, args.slots))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
