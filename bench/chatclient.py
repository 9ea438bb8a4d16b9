"""Replay a conversation trace (L{bench.traces}) as chat clients would (asyncio, its own process).

Each conversation starts at its time; each turn is sent ``think`` seconds
after the previous reply ended, as a streaming ``/v1/chat/completions``
request carrying the whole history with the assistant's real replies
(``max_tokens`` + ``ignore_eos``, ``stream_options.include_usage``).
Per request it records the time to the first content token, the time to
the last byte, the reply's length and llama.cpp's ``timings``
(``cache_n``, ``prompt_n``) when the stream carries them.

    python -m bench.chatclient --port P --trace T.json --out F.json
    python -m bench.chatclient --ports P1,P2 --assign 0,1,0,... --trace T.json --out F.json   (sticky ideal)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any

from bench.loadclient import _Body

CLOCK = time.CLOCK_MONOTONIC


def now() -> float:
    return time.clock_gettime(CLOCK)


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Stream:
    """Collects an SSE chat stream: content, the first-token time, timings, usage."""

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.ttft: float | None = None
        self.carry = b""
        self.content: list[str] = []
        self.timings: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self.chunks = 0

    def feed(self, data: bytes) -> None:
        data = self.carry + data
        lines = data.split(b"\n")
        self.carry = lines.pop()
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]" or not payload:
                continue
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            self.chunks += 1
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                piece = delta.get("content")
                if piece:
                    if self.ttft is None:
                        self.ttft = now() - self.sent
                    self.content.append(piece)
            if isinstance(event.get("timings"), dict):
                self.timings = event["timings"]
            if isinstance(event.get("usage"), dict):
                self.usage = event["usage"]


async def post(port: int, path: str, body: bytes, on_data: Any, timeout: float,
               headers: dict[str, str] | None = None) -> int:
    """One POST on a new connection; C{on_data(bytes)} per decoded piece; the status."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
             f"{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
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


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with open(args.trace) as f:
        trace = json.load(f)
    conversations = trace["conversations"]
    ports = [int(p) for p in args.ports.split(",")] if args.ports else [args.port]
    assign = [int(a) for a in args.assign.split(",")] if args.assign else [0] * len(conversations)
    results: list[dict[str, Any]] = []

    async def converse(conv: dict[str, Any], t0: float) -> None:
        port = ports[assign[conv["id"]] % len(ports)]
        messages: list[dict[str, str]] = [{"role": "system", "content": conv["system"]}]
        await asyncio.sleep(max(0.0, t0 + conv["start"] - now()))
        for k, turn in enumerate(conv["turns"]):
            if turn["think"]:
                await asyncio.sleep(turn["think"])
            messages.append({"role": "user", "content": turn["user"]})
            body: dict[str, Any] = {
                "messages": messages, "max_tokens": turn["max_tokens"], "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, "cache_prompt": True,
            }
            if args.model:
                body["model"] = args.model
            headers = {"X-Session-ID": f"conv-{conv['id']}"} if args.session_header else None
            sent = now()
            stream = _Stream(sent)
            record: dict[str, Any] = {"conversation": conv["id"], "turn": k, "system": conv["system_key"],
                                      "sent": sent - t0, "status": 0, "ttft": None}
            try:
                record["status"] = await post(port, "/v1/chat/completions", json.dumps(body).encode(),
                                              stream.feed, args.timeout, headers)
            except Exception as e:  # noqa: BLE001 - every failure is an error of that request
                record["error"] = type(e).__name__
            record["e2e"] = now() - sent
            record["ttft"] = stream.ttft
            reply = "".join(stream.content)
            record["reply_chars"] = len(reply)
            timings = stream.timings or {}
            record["cache_n"] = timings.get("cache_n")
            record["prompt_n"] = timings.get("prompt_n")
            record["predicted_n"] = timings.get("predicted_n")
            usage = stream.usage or {}
            record["completion_tokens"] = usage.get("completion_tokens", timings.get("predicted_n"))
            record["prompt_tokens"] = usage.get("prompt_tokens")
            results.append(record)
            messages.append({"role": "assistant", "content": reply})

    t0 = now() + 0.2
    cpu0 = cpu()
    await asyncio.gather(*(converse(conv, t0) for conv in conversations))
    return {"results": results, "client_cpu": cpu() - cpu0, "wall": now() - t0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    parser.add_argument("--ports", help="comma-separated ports (with --assign: one server per conversation)")
    parser.add_argument("--assign", help="comma-separated index into --ports for each conversation id")
    parser.add_argument("--trace", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--session-header", action="store_true", help="send X-Session-ID: conv-ID")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    if args.port is None and not args.ports:
        parser.error("--port or --ports is required")
    import sys

    sys.path.insert(0, ".")
    from bench.common import raise_fd_limit

    raise_fd_limit()
    result = asyncio.run(run(args))
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
