"""Three balancer processes ("owners") on one shared slot store, in memory or on Redis.

A L{World} hides the difference for the contract tests: C{wait(seconds)}
advances a C{Clock} (memory) or lets real time pass (Redis: the scripts use
Redis's clock), and C{settle(d)} waits for a Deferred with a deadline.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater

from paddler.sharedstate.memory import MemorySlotState, MemorySlotStore
from paddler.sharedstate.redisstore import RedisSlotStore
from paddler.sharedstate.scripts import KEY_NAMES
from paddler.sharedstate.store import SlotStoreBase

OWNERS = ("replica-a", "replica-b", "replica-c")
#: Short enough for expiry tests on real time, long enough for 2 shared cores.
LEASE_TTL = 0.6


class World:
    """Stores of several owners sharing one state."""

    kind = "?"

    def __init__(self) -> None:
        self.stores: list[SlotStoreBase] = []

    def add(self, owner: str, **kwargs: Any) -> SlotStoreBase:
        raise NotImplementedError

    async def wait(self, seconds: float) -> None:
        raise NotImplementedError

    async def settle(self, d: Deferred[Any], deadline: float = 3.0) -> Any:
        raise NotImplementedError

    async def placement_records(self) -> set[str]:
        """The servers the shared state holds a placement record for (checks its two keys agree)."""
        raise NotImplementedError

    async def placement_claims(self) -> set[str]:
        """The models the shared state holds a placement claim for (checks its two keys agree)."""
        raise NotImplementedError

    def stop(self) -> None:
        for store in self.stores:
            for waiter in store.waiters.values():
                waiter.deferred.addErrback(lambda failure: None)  # left waiting by the test
            if store.running:
                pytest_twisted.blockon(store.stopService())


class MemoryWorld(World):
    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.state = MemorySlotState(self.clock)

    def add(self, owner: str, **kwargs: Any) -> MemorySlotStore:
        kwargs.setdefault("lease_ttl", LEASE_TTL)
        kwargs.setdefault("reap_interval", 3600.0)
        store = MemorySlotStore(self.state, owner, **kwargs)
        store.startService()
        pytest_twisted.blockon(store.hello())
        self.stores.append(store)
        return store

    async def wait(self, seconds: float) -> None:
        step = 0.05
        left = seconds
        while left > 1e-9:
            self.clock.advance(min(step, left))
            left -= step

    async def settle(self, d: Deferred[Any], deadline: float = 3.0) -> Any:
        waited = 0.0
        while not d.called and waited < deadline:
            self.clock.advance(0.05)
            waited += 0.05
        assert d.called, f"not settled within {deadline} s of the fake clock"
        return await d

    async def placement_records(self) -> set[str]:
        placed = set(self.state.placed)
        assert placed == set(self.state.placedx), (self.state.placed, self.state.placedx)
        return placed

    async def placement_claims(self) -> set[str]:
        claims = set(self.state.place)
        assert claims == set(self.state.placeq), (self.state.place, self.state.placeq)
        return claims


class RedisWorld(World):
    kind = "redis"

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__()
        self.url = url
        self.prefix = prefix

    def add(self, owner: str, **kwargs: Any) -> RedisSlotStore:
        kwargs.setdefault("lease_ttl", LEASE_TTL)
        kwargs.setdefault("reap_interval", 3600.0)
        kwargs.setdefault("timeout", 2.0)
        store = RedisSlotStore(reactor, self.url, owner, prefix=self.prefix, **kwargs)
        store.startService()
        pytest_twisted.blockon(Deferred.fromCoroutine(self._up(store)))
        self.stores.append(store)
        return store

    async def _up(self, store: RedisSlotStore) -> None:
        for _ in range(200):
            if store.is_up and store.subscriber.is_up and store.epoch is not None:
                return
            await deferLater(reactor, 0.01)
        raise AssertionError("the store did not come up within 2 s")

    async def wait(self, seconds: float) -> None:
        await deferLater(reactor, seconds)

    async def settle(self, d: Deferred[Any], deadline: float = 3.0) -> Any:
        return await d.addTimeout(deadline, reactor)

    async def placement_records(self) -> set[str]:
        store = self.stores[0]
        keys = dict(zip(KEY_NAMES, store.keys))
        placed = await store.client.execute("HKEYS", keys["placed"])
        lapsing = await store.client.execute("ZRANGE", keys["placedx"], 0, -1)
        names = {v.decode() for v in placed}
        assert names == {v.decode() for v in lapsing}, (placed, lapsing)
        return names

    async def placement_claims(self) -> set[str]:
        store = self.stores[0]
        keys = dict(zip(KEY_NAMES, store.keys))
        claims = await store.client.execute("HKEYS", keys["place"])
        expiring = await store.client.execute("ZRANGE", keys["placeq"], 0, -1)
        models = {v.decode() for v in claims}
        assert models == {v.decode() for v in expiring}, (claims, expiring)
        return models
