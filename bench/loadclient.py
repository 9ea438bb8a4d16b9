"""The load client for streams and trace replay (asyncio, its own process).

It speaks just enough HTTP/1.1 (request out, chunked or sized body in) to
stay cheap, and reports its own CPU time so a reader can check that it was
not the bottleneck.

    python -m bench.loadclient streams --port P --streams N --events E --rate R --out F.json
    python -m bench.loadclient idle --port P --streams N --hold S --out F.json
    python -m bench.loadclient trace --port P --trace T.json --out F.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any

CLOCK = time.CLOCK_MONOTONIC


def now() -> float:
    return time.clock_gettime(CLOCK)


class _Body:
    """Incremental decoding of a chunked or sized body; C{feed} returns decoded bytes."""

    def __init__(self, chunked: bool, length: int | None) -> None:
        self.chunked = chunked
        self.remaining = length
        self.buffer = b""
        self.need = 0  # bytes left in the current chunk
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if not self.chunked:
            if self.remaining is not None:
                self.remaining -= len(data)
                self.done = self.remaining <= 0
            return data
        self.buffer += data
        out = []
        while True:
            if self.need:
                take = self.buffer[: self.need]
                out.append(take)
                self.need -= len(take)
                self.buffer = self.buffer[len(take):]
                if self.need:
                    break
                continue
            if self.buffer.startswith(b"\r\n"):
                self.buffer = self.buffer[2:]
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            size = int(self.buffer[:end].split(b";")[0], 16)
            self.buffer = self.buffer[end + 2:]
            if size == 0:
                self.done = True
                break
            self.need = size
        return b"".join(out)


async def request(
    port: int, method: str, path: str, body: bytes, on_data: Any, timeout: float
) -> int:
    """Send one request on a new connection; call C{on_data(bytes)} per decoded piece; return status."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(
            (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        chunked, length = False, None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "content-length":
                length = int(value)
        decoder = _Body(chunked, length)
        if length == 0:
            return status
        while not decoder.done:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                break
            piece = decoder.feed(data)
            if piece:
                on_data(piece)
        return status
    finally:
        writer.close()


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _StreamReceiver(asyncio.Protocol):
    """One stream on its own connection: finds each event's stamp in the raw bytes (no decoding)."""

    def __init__(self, request: bytes, delays: list[float], done: asyncio.Future[Any]) -> None:
        self.request = request
        self.delays = delays
        self.done = done
        self.head = b""
        self.first = b""
        self.status = 0
        self.carry = b""
        self.events = 0
        self.ended = False

    def connection_made(self, transport: Any) -> None:
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        t = now()
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.head.split(b" ", 2)[1])
            self.first = self.head[:300]
            data = self.head[end + 4:]
            self.head = b""
        data = self.carry + data
        last = data.rfind(b"\n\n")
        if last < 0:
            self.carry = data[-4096:]
            return
        self.carry = data[last + 2:]
        if self.carry.endswith(b"0\r\n\r\n"):
            self.ended = True
        start = 0
        append = self.delays.append
        while True:
            at = data.find(b'{"t": ', start, last)
            if at < 0:
                break
            end = data.find(b",", at)
            append(t - float(data[at + 6:end]))
            self.events += 1
            start = end

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def run_streams(args: argparse.Namespace) -> dict[str, Any]:
    delays: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}

    def error(kind: str) -> None:
        nonlocal errors
        errors += 1
        kinds[kind] = kinds.get(kind, 0) + 1
    events = 0
    loop = asyncio.get_running_loop()
    body = json.dumps({"model": "bench", "prompt": "bench", "stream": True, "bench_events": args.events, "bench_rate": args.rate}).encode()
    request = (
        f"POST /v1/completions?n={args.events}&rate={args.rate} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body

    async def one(i: int) -> None:
        nonlocal events
        await asyncio.sleep(i * args.ramp / max(1, args.streams))
        done: asyncio.Future[Any] = loop.create_future()
        try:
            transport, receiver = await asyncio.wait_for(
                loop.create_connection(lambda: _StreamReceiver(request, delays, done), "127.0.0.1", args.port), 60
            )
            await asyncio.wait_for(done, 60 + args.events / args.rate)
            transport.close()
            events += receiver.events
            if receiver.status != 200:
                error(f"status {receiver.status}: {receiver.first!r}")
            elif receiver.events != args.events:
                error(f"{receiver.events} of {args.events} events")
        except Exception as e:  # noqa: BLE001 - counted
            error(type(e).__name__)

    started, cpu0 = time.monotonic(), cpu()
    await asyncio.gather(*(one(i) for i in range(args.streams)))
    return {
        "delays": delays if len(delays) <= 300000 else delays[:: len(delays) // 300000 + 1],
        "events": events,
        "expected_events": args.streams * args.events,
        "errors": errors,
        "errors_by_kind": kinds,
        "wall": time.monotonic() - started,
        "client_cpu": cpu() - cpu0,
    }


async def run_idle(args: argparse.Namespace) -> dict[str, Any]:
    opened = 0
    errors = 0

    async def one(i: int) -> None:
        nonlocal opened, errors
        await asyncio.sleep(i * args.ramp / max(1, args.streams))
        first = True

        def on_data(_: bytes) -> None:
            nonlocal opened, first
            if first:
                opened += 1
                first = False

        try:
            await request(args.port, "POST", f"/v1/completions?n=0&hold={args.hold}",
                          json.dumps({"model": "bench", "prompt": "bench", "stream": True, "bench_events": 0, "bench_hold": args.hold}).encode(),
                          on_data, args.hold + 60)
        except Exception:  # noqa: BLE001 - counted
            errors += 1

    started, cpu0 = time.monotonic(), cpu()
    await asyncio.gather(*(one(i) for i in range(args.streams)))
    return {"opened": opened, "errors": errors, "wall": time.monotonic() - started, "client_cpu": cpu() - cpu0}


async def run_trace(args: argparse.Namespace) -> dict[str, Any]:
    with open(args.trace) as f:
        trace = json.load(f)
    results: list[dict[str, Any]] = []

    async def one(item: dict[str, Any], t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + item["at"] - now()))
        sent = now()
        record: dict[str, Any] = {"id": item["id"], "sent": sent - t0, "ttft": None, "status": 0}

        def on_data(data: bytes) -> None:
            if record["ttft"] is None and b"data: " in data:
                record["ttft"] = now() - sent

        body = json.dumps({
            "prompt": item["prompt"], "n_predict": item["n_predict"], "ignore_eos": True,
            "stream": True, "cache_prompt": True,
        }).encode()
        try:
            record["status"] = await request(args.port, "POST", "/completion", body, on_data, args.timeout)
        except Exception as e:  # noqa: BLE001 - every failure is an error of that request
            record["error"] = type(e).__name__
        record["e2e"] = now() - sent
        results.append(record)

    t0 = now() + 0.2
    cpu0 = cpu()
    await asyncio.gather(*(one(item, t0) for item in trace["requests"]))
    return {"results": results, "client_cpu": cpu() - cpu0, "wall": now() - t0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("streams", "idle", "trace"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which streams are opened")
    parser.add_argument("--hold", type=float, default=10.0)
    parser.add_argument("--trace")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import sys

    sys.path.insert(0, ".")
    from bench.common import raise_fd_limit

    raise_fd_limit()
    runner = {"streams": run_streams, "idle": run_idle, "trace": run_trace}[args.mode]
    from bench.sse_upstream import run

    result = run(runner(args))
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
