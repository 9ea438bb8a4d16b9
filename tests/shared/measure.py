"""Round trips and failure behaviour of paddler's Redis client (and of
txredisapi, when importable) against a local redis-server: the figures in
docs/shared-state.md. Not a test; run by hand:

    .venv/bin/python -m tests.shared.measure [--txredisapi-path DIR]

Starts its own redis-server on a free loopback port (no persistence).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from paddler.sharedstate.errors import StoreError
from paddler.sharedstate.redisstore import RedisSlotStore
from paddler.sharedstate.scripts import KEY_NAMES, SCRIPTS

from .conftest import RedisServer, free_port

N = 2000


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p50_us": round(pick(0.5) * 1e6), "p99_us": round(pick(0.99) * 1e6), "mean_us": round(sum(ordered) / len(ordered) * 1e6)}


async def timed(reactor: Any, call: Any, n: int = N) -> dict[str, float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return stats(samples)


async def pipelined(call: Any, n: int = N, window: int = 64) -> float:
    started = time.perf_counter()
    for _ in range(n // window):
        await defer.gatherResults([call() for _ in range(window)])
    return (time.perf_counter() - started) / (n // window * window) * 1e6


async def ours(reactor: Any, server: RedisServer) -> dict[str, Any]:
    a = RedisSlotStore(reactor, server.url, "m-a", prefix="{m}", timeout=1.0)
    a.startService()
    while not (a.is_up and a.epoch):
        await task.deferLater(reactor, 0.01)
    for i in range(64):
        await a.register_server(f"s{i}", 4)
    candidates = [f"s{i}" for i in range(16)]
    counter = iter(range(10**9))
    out: dict[str, Any] = {}
    out["ping"] = await timed(reactor, lambda: a.client.execute("PING"))

    async def cycle() -> None:
        lease = await a.acquire(f"r{next(counter)}", candidates)
        await lease.release()

    out["acquire+release"] = await timed(reactor, cycle, N // 2)
    out["snapshot_64_servers"] = await timed(reactor, a.snapshot, 200)
    out["reap_nothing_due"] = await timed(reactor, a.reap, 500)
    out["renew_0"] = await timed(reactor, a.renew, 500)
    out["ping_pipelined_64_us"] = await pipelined(lambda: a.client.execute("PING"))
    info = (await a.client.execute("INFO", "commandstats")).decode()
    out["redis_side_evalsha_us"] = [line for line in info.splitlines() if line.startswith("cmdstat_evalsha")]
    await a.stopService()
    return out


async def txredis(reactor: Any, server: RedisServer) -> dict[str, Any]:
    import txredisapi  # imports the global reactor: only in this script

    conn = await txredisapi.Connection("127.0.0.1", server.port, reconnect=True)
    out: dict[str, Any] = {"ping": await timed(reactor, conn.ping)}
    script = SCRIPTS["snapshot"]
    keys = [f"{{t}}:{n}" for n in range(len(KEY_NAMES))]
    out["evalsha_snapshot_empty"] = await timed(reactor, lambda: conn.evalsha(script.sha, keys, ["c"]) if False else conn.execute_command("EVAL", script.source, len(keys), *keys, "c"), 500)
    out["ping_pipelined_64_us"] = await pipelined(conn.ping)
    # outage: a command during a kill, with and without a deadline
    server.kill()
    started = time.perf_counter()
    try:
        await conn.ping().addTimeout(3.0, reactor)
        out["ping_while_down"] = "answered?"
    except defer.TimeoutError:
        out["ping_while_down_with_3s_deadline"] = f"timed out after {time.perf_counter() - started:.2f} s"
    except Exception as e:  # noqa: BLE001
        out["ping_while_down_with_3s_deadline"] = f"{type(e).__name__} after {time.perf_counter() - started:.3f} s"
    pending = conn.ping()
    server.start()
    started = time.perf_counter()
    try:
        await pending.addTimeout(20.0, reactor)
        out["ping_sent_while_down_answered_after_restart"] = f"{time.perf_counter() - started:.2f} s"
    except Exception as e:  # noqa: BLE001
        out["ping_sent_while_down_answered_after_restart"] = f"{type(e).__name__} after {time.perf_counter() - started:.2f} s"
    await conn.disconnect()
    # a dead port: does the first connect ever fail?
    started = time.perf_counter()
    try:
        await txredisapi.Connection("127.0.0.1", free_port(), reconnect=True).addTimeout(3.0, reactor)
        out["dead_port_connect"] = "connected?"
    except Exception as e:  # noqa: BLE001
        out["dead_port_connect"] = f"{type(e).__name__} after {time.perf_counter() - started:.2f} s"
    return out


async def outage(reactor: Any, server: RedisServer) -> dict[str, Any]:
    """Our client: kill -9, calls during the outage, time to come back after restart; a dead port."""
    out: dict[str, Any] = {}
    a = RedisSlotStore(reactor, server.url, "o-a", prefix="{o}", timeout=0.25, max_backoff=2.0)
    a.startService()
    while not (a.is_up and a.epoch):
        await task.deferLater(reactor, 0.01)
    server.kill()
    started = time.perf_counter()
    while a.is_up:
        await task.deferLater(reactor, 0.001)
    out["down_noticed_after_kill_ms"] = round((time.perf_counter() - started) * 1000, 1)
    started = time.perf_counter()
    try:
        await a.snapshot()
    except StoreError as e:
        out["call_while_down"] = f"{type(e).__name__} after {(time.perf_counter() - started) * 1e6:.0f} us"
    await task.deferLater(reactor, 3.0)  # let the backoff reach its cap
    server.start()
    started = time.perf_counter()
    while not a.is_up:
        await task.deferLater(reactor, 0.005)
    out["up_after_restart_s"] = round(time.perf_counter() - started, 2)
    await a.stopService()
    dead = RedisSlotStore(reactor, f"redis://127.0.0.1:{free_port()}/0", "o-b", prefix="{o}")
    dead.startService()
    started = time.perf_counter()
    while dead.client.state.value != "down":
        await task.deferLater(reactor, 0.001)
    out["dead_port_down_after_ms"] = round((time.perf_counter() - started) * 1000, 1)
    started = time.perf_counter()
    try:
        await dead.acquire("x", ["s"])
    except StoreError as e:
        out["dead_port_call"] = f"{type(e).__name__} after {(time.perf_counter() - started) * 1e6:.0f} us"
    await dead.stopService()
    return out


async def main(reactor: Any, args: argparse.Namespace) -> None:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(binary, Path(directory))
        server.start()
        try:
            results = {"paddler": await ours(reactor, server), "paddler_outage": await outage(reactor, server)}
            if args.txredisapi_path:
                sys.path.insert(0, args.txredisapi_path)
                results["txredisapi"] = await txredis(reactor, server)
        finally:
            server.stop()
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--txredisapi-path", help="a directory holding txredisapi.py, to compare")
    options = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, options)))
