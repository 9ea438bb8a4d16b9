"""One balancer-like process for the multi-process test: acquires, holds and
releases slots through a RedisSlotStore, and checks occupancy with an atomic
counter in Redis (HINCRBY, one hash per server, one field per process) whose
sum must never pass a server's slots.

    python -m tests.shared.replica_worker URL PREFIX OWNER SECONDS SEED

Prints one JSON line at the end: grants, queued, violations, peak per server.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

from twisted.internet import defer, task

from paddler.sharedstate.errors import SharedBufferFull, StoreError, WaitExpired
from paddler.sharedstate.redisstore import RedisSlotStore
from paddler.sharedstate.store import SharedLease

TOTALS = {"s1": 1, "s2": 2, "s3": 3}


async def main(reactor: Any, url: str, prefix: str, owner: str, seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    store = RedisSlotStore(reactor, url, owner, prefix=prefix, lease_ttl=1.0, timeout=1.0, reap_interval=0.5)
    store.startService()
    while not (store.is_up and store.epoch and store.subscriber.is_up):
        await task.deferLater(reactor, 0.01)
    for server, total in TOTALS.items():
        await store.register_server(server, total)
    check = prefix + ":check"
    stats: dict[str, Any] = {"owner": owner, "grants": 0, "queued": 0, "violations": 0, "errors": 0, "peak": {}}
    end = reactor.seconds() + seconds
    counter = 0

    async def one(request_id: str) -> None:
        candidates = rng.sample(sorted(TOTALS), rng.randrange(1, 4))
        try:
            result = await store.acquire(request_id, candidates, wait=10.0, max_waiting=1000)
            if not isinstance(result, SharedLease):
                stats["queued"] += 1
                result = await result.deferred
        except (SharedBufferFull, WaitExpired, StoreError):
            stats["errors"] += 1
            return
        stats["grants"] += 1
        key = f"{check}:{result.server_id}"
        await store.client.execute("HINCRBY", key, owner, 1)
        busy = sum(int(v) for v in await store.client.execute("HVALS", key))
        peak = stats["peak"]
        peak[result.server_id] = max(peak.get(result.server_id, 0), busy)
        if busy > TOTALS[result.server_id]:
            stats["violations"] += 1
        await task.deferLater(reactor, rng.uniform(0.0, 0.02))
        await store.client.execute("HINCRBY", key, owner, -1)
        await result.release()

    running: set[defer.Deferred[None]] = set()
    while reactor.seconds() < end:
        while len(running) < 4:
            counter += 1
            job = defer.Deferred.fromCoroutine(one(f"{owner}-{counter}"))
            running.add(job)
            job.addBoth(lambda _, job=job: running.discard(job))
        await task.deferLater(reactor, 0.002)
    while running:
        await task.deferLater(reactor, 0.01)
    sys.stdout.write(json.dumps(stats) + "\n")
    sys.stdout.flush()
    await store.stopService()


if __name__ == "__main__":
    url, prefix, owner, seconds, seed = sys.argv[1:6]
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, url, prefix, owner, float(seconds), int(seed))))
