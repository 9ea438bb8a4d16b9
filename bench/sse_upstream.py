"""A tiny SSE upstream for the streaming benchmark (asyncio, no Twisted).

``POST /completion?n=N&rate=R`` answers ``text/event-stream`` (chunked) with N
events R per second, each ``data: {"t": T, "i": I}`` where T is
``clock_gettime(CLOCK_MONOTONIC)`` taken just before the write: that clock is
system-wide on Linux, so the client subtracts it from its own reading to get
the delay a chunk spent between the upstream's write and the client's read.
``?n=0&hold=S`` sends the headers and one comment, then holds the stream open
for S seconds (idle streams). ``GET /slots`` and ``/props`` report
``--slots`` idle slots so paddler never makes a request wait.

    python -m bench.sse_upstream --port P [--slots 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import parse_qs, urlsplit

CLOCK = time.CLOCK_MONOTONIC


def now() -> float:
    return time.clock_gettime(CLOCK)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream:
    def __init__(self, slots: int) -> None:
        self.slots_body = json.dumps([{"id": i, "is_processing": False} for i in range(slots)]).encode()
        self.props_body = json.dumps({"total_slots": slots, "model_alias": "bench"}).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                if length:
                    await reader.readexactly(length)
                url = urlsplit(target)
                if method == "GET" and url.path in ("/slots", "/props", "/health"):
                    body = {"/slots": self.slots_body, "/props": self.props_body}.get(url.path, b'{"status":"ok"}')
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(body), body)
                    )
                    continue
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                await self.stream(writer, int(query.get("n", "100")), float(query.get("rate", "50")),
                                  float(query.get("hold", "0")))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def stream(self, writer: asyncio.StreamWriter, n: int, rate: float, hold: float) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        if n == 0:
            writer.write(chunk(b": open\n\n"))
            await writer.drain()
            await asyncio.sleep(hold)
        start = now()
        interval = 1.0 / rate
        for i in range(n):
            delay = start + (i + 1) * interval - now()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(chunk(b'data: {"t": %.6f, "i": %d}\n\n' % (now(), i)))
            if writer.transport.get_write_buffer_size() > 65536:
                await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def serve(port: int, slots: int) -> None:
    upstream = Upstream(slots)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slots", type=int, default=4096)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port, args.slots))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
