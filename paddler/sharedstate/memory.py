"""The shared slot store in memory, for tests with a C{Clock} and no Redis.

L{MemorySlotState} plays Redis: it runs the same operations as the Lua
scripts of L{paddler.sharedstate.scripts}, with the same arguments (as strings),
the same checks and the same replies, on Python dicts, with C{clock} as the
one clock. L{MemorySlotStore} is one balancer process's view of it (the same
L{SlotStoreBase} as the Redis store). The contract tests run against both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from paddler.sharedstate.errors import StoreUnavailable
from paddler.interfaces import ISlotStore
from paddler.sharedstate.resp import RedisError
from paddler.sharedstate.scripts import (
    DROP_BUDGET,
    MAX_BATCH,
    MAX_CANDIDATES,
    MAX_ID,
    MAX_META,
    MAX_MODEL,
    MAX_REAP,
    MAX_SERVERS,
    MAX_SLOTS,
    MAX_TTL_MS,
    MAX_WAITERS,
    MIN_TTL_MS,
)
from paddler.sharedstate.store import SlotStoreBase

_ID = re.compile(r"[A-Za-z0-9._:@/+=-]+")
_INT = re.compile(r"-?[0-9]+")


def _valid_id(value: str) -> bool:
    return 1 <= len(value) <= MAX_ID and _ID.fullmatch(value) is not None


def _int_arg(value: str, low: int, high: int) -> int | None:
    if len(value) > 17 or not _INT.fullmatch(value):
        return None
    number = int(value)
    return number if low <= number <= high else None


def _bad(what: str) -> RedisError:
    return RedisError("PDARG " + what)


class MemorySlotState:
    """What Redis holds, in dicts: one instance shared by every L{MemorySlotStore} of a test."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.available = True
        self.calls = 0
        self._subscribers: dict[str, list[Callable[[bytes], None]]] = {}
        self._stores: list[MemorySlotStore] = []
        self._outbox: list[tuple[str, bytes]] = []
        self.wipe()

    # -- test controls ----------------------------------------------------

    def wipe(self) -> None:
        """Lose everything, as a Redis restarted without persistence."""
        self.total: dict[str, int] = {}
        self.ext: dict[str, int] = {}
        self.gen: dict[str, int] = {}
        self.drain: set[str] = set()
        self.meta: dict[str, str] = {}
        self.mark: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        self.seq = 0
        self.leases: dict[str, int] = {}  # id -> expiry ms
        self.lease: dict[str, tuple[str, int, int, str, int, int, str]] = {}  # id -> s, g, n, owner, t, waited, model
        self.w: dict[str, tuple[str, int, int, int, int, tuple[str, ...], str]] = {}  # id -> owner, seq, deadline, ttl, t, cands, model
        self.owners: dict[str, int] = {}
        self.epoch: str | None = None
        self.place: dict[str, tuple[str, int]] = {}  # model -> owner, expiry ms
        self.placed: dict[str, int] = {}  # server -> ms a model was placed on it
        self.placedx: dict[str, int] = {}  # server -> ms its placed record lapses
        self.placeq: dict[str, int] = {}  # model -> ms its place claim expires

    def set_available(self, available: bool) -> None:
        """Make every call fail with L{StoreUnavailable} (or answer again), and tell the stores."""
        if available == self.available:
            return
        self.available = available
        for store in list(self._stores):
            store._state_changed(available)

    def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> None:
        self._subscribers.setdefault(channel, []).append(callback)

    def run(self, name: str, channel: str, args: Sequence[Any]) -> Any:
        """Run one operation atomically; deliver what it published afterwards."""
        if not self.available:
            raise StoreUnavailable("the in-memory store is marked unavailable")
        self.calls += 1
        operation = getattr(self, "op_" + name)
        try:
            return operation(channel, *[str(arg) for arg in args])
        finally:
            outbox, self._outbox = self._outbox, []
            for target, data in outbox:
                for callback in list(self._subscribers.get(target, [])):
                    callback(data)

    # -- helpers (the Lua prelude) ----------------------------------------

    def _now(self) -> int:
        return int(self.clock.seconds() * 1000)

    def _ours(self, server: str, generation: int, upto: int | None = None) -> int:
        return sum(
            1
            for s, g, n, *_ in self.lease.values()
            if s == server and g == generation and (upto is None or n <= upto)
        )

    def _free(self, server: str) -> tuple[int, int | None]:
        if server not in self.total:
            return 0, None
        generation = self.gen.get(server, 0)
        if server in self.drain:
            return 0, generation
        free = self.total[server] - self.ext.get(server, 0) - self._ours(server, generation)
        return max(0, free), generation

    def _heartbeat(self, owner: str, expiry: int) -> None:
        if self.owners.get(owner, -1) < expiry:
            self.owners[owner] = expiry

    def _alive(self, owner: str, now: int) -> bool:
        return self.owners.get(owner, -1) >= now

    def _grant(self, s: str, g: int, rid: str, owner: str, model: str, ttl: int, now: int, waited: int) -> int:
        self.seq += 1
        self.lease[rid] = (s, g, self.seq, owner, now, waited, model)
        self.leases[rid] = now + ttl
        return self.seq

    def _drop_waiter(self, rid: str) -> tuple[str, int, int, int, int, tuple[str, ...], str]:
        return self.w.pop(rid)

    def _oldest_listing(self, server: str) -> str | None:
        best: tuple[int, str] | None = None
        for rid, (_, seq, _, _, _, cands, _) in self.w.items():
            if server in cands and (best is None or seq < best[0]):
                best = (seq, rid)
        return best[1] if best else None

    def _handoff(self, server: str, channel: str, now: int) -> int:
        granted, budget = 0, DROP_BUDGET
        while budget > 0:
            free, generation = self._free(server)
            if free <= 0:
                break
            rid = self._oldest_listing(server)
            if rid is None:
                break
            owner, _, deadline, ttl, t, _, model = self._drop_waiter(rid)
            if deadline <= now or not self._alive(owner, now):
                budget -= 1
                continue
            assert generation is not None
            number = self._grant(server, generation, rid, owner, model, ttl, now, now - t)
            self._outbox.append((channel + owner, f"{rid}|{server}|{generation}|{number}|{now - t}".encode()))
            granted += 1
        return granted

    def _release_lease(self, rid: str, channel: str, now: int, running: bool = False) -> int:
        s, g, *_ = self.lease.pop(rid)
        self.leases.pop(rid, None)
        if s in self.total and self.gen.get(s, 0) == g:
            if running:
                self.ext[s] = self.ext.get(s, 0) + 1
            else:
                self._handoff(s, channel, now)
            return 1
        return 3

    def _lease_reply(self, rid: str) -> list[Any]:
        s, g, n, _, _, waited, _ = self.lease[rid]
        return [1, s, g, n, waited]

    def _position(self, rid: str) -> int:
        seq = self.w[rid][1]
        return sum(1 for other in self.w.values() if other[1] < seq)

    # -- the scripts ------------------------------------------------------

    def op_acquire(self, channel: str, owner: str, rid: str, ttl_s: str, wait_s: str, maxw_s: str, model: str, *cands: str) -> Any:
        if not _valid_id(owner):
            raise _bad("owner id")
        if not _valid_id(rid):
            raise _bad("request id")
        ttl = _int_arg(ttl_s, MIN_TTL_MS, MAX_TTL_MS)
        if ttl is None:
            raise _bad("lease ttl")
        wait = _int_arg(wait_s, 0, MAX_TTL_MS)
        if wait is None:
            raise _bad("wait time")
        max_waiting = _int_arg(maxw_s, 0, MAX_WAITERS)
        if max_waiting is None:
            raise _bad("max waiting")
        if len(model.encode()) > MAX_MODEL:
            raise _bad("model")
        if len(cands) > MAX_CANDIDATES:
            raise _bad("too many candidates")
        for c in cands:
            if not _valid_id(c):
                raise _bad("candidate id")
        if len(set(cands)) != len(cands):
            raise _bad("duplicate candidate")
        now = self._now()
        if rid in self.lease:
            if self.lease[rid][3] != owner:
                raise RedisError("PDINUSE the request id is a lease of another owner")
            return self._lease_reply(rid)
        if rid in self.w:
            w = self.w[rid]
            if w[0] != owner:
                raise RedisError("PDINUSE the request id is a waiter of another owner")
            self._heartbeat(owner, now + ttl)
            self.w[rid] = (w[0], w[1], w[2], w[3], w[4], tuple(cands), w[6])
            for c in cands:
                if self._free(c)[0] > 0:
                    self._handoff(c, channel, now)
                    if rid in self.lease:
                        return self._lease_reply(rid)
            if rid not in self.w:  # the hand-off dropped it (past its deadline): the script's ZRANK is nil
                return [2, w[1], None]
            return [2, w[1], self._position(rid)]
        self._heartbeat(owner, now + ttl)
        for c in cands:
            if self._free(c)[0] > 0:
                self._handoff(c, channel, now)
                free, generation = self._free(c)
                if free > 0:
                    assert generation is not None
                    number = self._grant(c, generation, rid, owner, model, ttl, now, 0)
                    return [1, c, generation, number, 0]
        if wait == 0 or max_waiting == 0:
            return [3]
        if len(self.w) >= max_waiting:
            return [4]
        self.seq += 1
        self.w[rid] = (owner, self.seq, now + wait, ttl, now, tuple(cands), model)
        return [2, self.seq, self._position(rid)]

    def op_release(self, channel: str, rid: str, running: str = "0") -> int:
        if not _valid_id(rid):
            raise _bad("request id")
        now = self._now()
        if rid in self.lease:
            return self._release_lease(rid, channel, now, running == "1")
        if rid in self.w:
            self._drop_waiter(rid)
            return 2
        return 0

    def op_renew(self, channel: str, owner: str, ttl_s: str, epoch: str, *ids: str) -> list[Any]:
        if not _valid_id(owner):
            raise _bad("owner id")
        ttl = _int_arg(ttl_s, MIN_TTL_MS, MAX_TTL_MS)
        if ttl is None:
            raise _bad("lease ttl")
        if len(ids) > MAX_BATCH:
            raise _bad("too many leases")
        if not all(_valid_id(rid) for rid in ids):
            raise _bad("lease id")
        if self.epoch != epoch:
            return [0]
        now = self._now()
        self.owners[owner] = now + ttl
        out: list[Any] = [1]
        for rid in ids:
            if rid in self.lease and self.lease[rid][3] == owner:
                self.leases[rid] = now + ttl
            else:
                out.append(rid)
        return out

    def op_hello(self, channel: str, owner: str, ttl_s: str, token: str) -> str:
        if not _valid_id(owner):
            raise _bad("owner id")
        ttl = _int_arg(ttl_s, MIN_TTL_MS, MAX_TTL_MS)
        if ttl is None:
            raise _bad("lease ttl")
        if not _valid_id(token):
            raise _bad("epoch token")
        if self.epoch is None:
            self.epoch = token
        self._heartbeat(owner, self._now() + ttl)
        return self.epoch

    def op_poll(self, channel: str, owner: str, epoch: str, *ids: str) -> list[Any]:
        if not _valid_id(owner):
            raise _bad("owner id")
        if len(ids) > MAX_BATCH:
            raise _bad("too many ids")
        if not all(_valid_id(rid) for rid in ids):
            raise _bad("id")
        if self.epoch != epoch:
            return [0]
        out: list[Any] = [1]
        for rid in ids:
            if rid in self.lease and self.lease[rid][3] == owner:
                out.append(self._lease_reply(rid))
            elif rid in self.w and self.w[rid][0] == owner:
                out.append([2, self.w[rid][1], self._position(rid)])
            else:
                out.append([0])
        return out

    def op_reading(self, channel: str, s: str, total_s: str, busy_s: str, mark_s: str, gen_s: str) -> list[Any]:
        if not _valid_id(s):
            raise _bad("server id")
        total = _int_arg(total_s, 0, MAX_SLOTS)
        if total is None:
            raise _bad("total slots")
        busy = None
        if busy_s != "":
            busy = _int_arg(busy_s, 0, MAX_SLOTS)
            if busy is None:
                raise _bad("busy slots")
        mark = _int_arg(mark_s, 0, 2**53 - 1)
        if mark is None:
            raise _bad("mark")
        want = None
        if gen_s != "":
            want = _int_arg(gen_s, 1, 10**9)
            if want is None:
                raise _bad("generation")
        if s not in self.total:
            return [0]
        g = self.gen.get(s, 0)
        if want is not None and want != g:
            return [2, g]
        if mark > self.seq or (s in self.mark and mark < self.mark[s]):
            return [3, g]
        ext = 0
        if busy is not None:
            busy = min(busy, total)
            ext = max(0, busy - self._ours(s, g, upto=mark))
        now = self._now()
        self.total[s] = total
        self.ext[s] = ext
        self.mark[s] = mark
        self.seen[s] = now
        self._handoff(s, channel, now)
        return [1, g, ext]

    def op_register(self, channel: str, s: str, total_s: str, meta: str, restarted: str) -> list[int]:
        if not _valid_id(s):
            raise _bad("server id")
        total = _int_arg(total_s, 0, MAX_SLOTS)
        if total is None:
            raise _bad("total slots")
        if len(meta.encode()) > MAX_META:
            raise _bad("metadata")
        if restarted not in ("0", "1", "2"):
            raise _bad("registration mode")
        exists = s in self.total
        if not exists and len(self.total) >= MAX_SERVERS:
            raise _bad("too many servers")
        now = self._now()
        g, how = self.gen.get(s, 0), 0
        if not exists or restarted == "1":
            g += 1
            how = 2 if exists else 1
            self.gen[s] = g
            self.ext[s] = total if (restarted == "2" and not exists) else 0
            self.mark.pop(s, None)
            if not exists:
                self.drain.discard(s)
        self.total[s] = total
        if meta:
            self.meta[s] = meta
        self._handoff(s, channel, now)
        return [g, how]

    def op_unregister(self, channel: str, s: str) -> int:
        if not _valid_id(s):
            raise _bad("server id")
        self._unplace(s)
        if s not in self.total:
            return 0
        for table in (self.total, self.ext, self.meta, self.mark, self.seen):
            table.pop(s, None)
        self.drain.discard(s)
        return 1

    def op_drain(self, channel: str, s: str, flag: str) -> int:
        if not _valid_id(s):
            raise _bad("server id")
        if flag not in ("0", "1"):
            raise _bad("drain flag")
        if s not in self.total:
            return 0
        if flag == "1":
            self.drain.add(s)
        else:
            self.drain.discard(s)
            self._handoff(s, channel, self._now())
        return 1

    def op_adopt(self, channel: str, owner: str, rid: str, s: str, ttl_s: str, model: str) -> list[Any]:
        if not _valid_id(owner):
            raise _bad("owner id")
        if not _valid_id(rid):
            raise _bad("request id")
        if not _valid_id(s):
            raise _bad("server id")
        ttl = _int_arg(ttl_s, MIN_TTL_MS, MAX_TTL_MS)
        if ttl is None:
            raise _bad("lease ttl")
        if len(model.encode()) > MAX_MODEL:
            raise _bad("model")
        now = self._now()
        if rid in self.lease:
            if self.lease[rid][3] != owner:
                raise RedisError("PDINUSE the request id is a lease of another owner")
            self.leases[rid] = now + ttl
            self._heartbeat(owner, now + ttl)
            return self._lease_reply(rid)
        if s not in self.total:
            return [0]
        if rid in self.w:
            if self.w[rid][0] != owner:
                raise RedisError("PDINUSE the request id is a waiter of another owner")
            self._drop_waiter(rid)
        self._heartbeat(owner, now + ttl)
        g = self.gen.get(s, 0)
        number = self._grant(s, g, rid, owner, model, ttl, now, 0)
        return [1, s, g, number, 0]

    def op_reap(self, channel: str, limit_s: str) -> list[int]:
        limit = _int_arg(limit_s, 1, MAX_REAP)
        if limit is None:
            raise _bad("limit")
        now = self._now()
        released = stale = expired = orphaned = gone = swept = 0
        # in a ZSET's order: by score, equal scores by member (the script's ZRANGEBYSCORE ... LIMIT)
        for rid in sorted((r for r, e in self.leases.items() if e <= now), key=lambda r: (self.leases[r], r))[:limit]:
            if self._release_lease(rid, channel, now) == 1:
                released += 1
            else:
                stale += 1
        for rid in sorted((r for r, w in self.w.items() if w[2] <= now), key=lambda r: (self.w[r][2], r))[:limit]:
            if rid in self.w:
                self._drop_waiter(rid)
                expired += 1
        for owner in sorted((o for o, e in self.owners.items() if e < now), key=lambda o: (self.owners[o], o))[:limit]:
            mine = sorted(rid for rid, w in self.w.items() if w[0] == owner)
            for rid in mine[:limit]:
                self._drop_waiter(rid)
                orphaned += 1
            if len(mine) < limit:
                del self.owners[owner]
                gone += 1
        for s in sorted({c for w in self.w.values() for c in w[5]})[:MAX_SERVERS]:
            if self._free(s)[0] > 0:
                swept += self._handoff(s, channel, now)
        return [released, stale, expired, orphaned, gone, swept, self._prune_placed(now, limit)]

    def op_place(self, channel: str, owner: str, model: str, s: str, victim: str, hold_s: str,
                 residency_s: str) -> int:
        if not _valid_id(owner):
            raise _bad("owner id")
        if not 1 <= len(model.encode()) <= MAX_MODEL:
            raise _bad("model")
        if not _valid_id(s):
            raise _bad("server id")
        if victim != "" and not _valid_id(victim):
            raise _bad("victim server id")
        hold = _int_arg(hold_s, MIN_TTL_MS, MAX_TTL_MS)
        if hold is None:
            raise _bad("hold")
        residency = _int_arg(residency_s, 0, MAX_TTL_MS)
        if residency is None:
            raise _bad("residency")
        now = self._now()
        self._prune_placed(now, DROP_BUDGET)
        held = self.place.get(model)
        if held is not None and held[0] != owner and held[1] > now:
            return 0
        if victim != "" and victim in self.placed and now - self.placed[victim] < residency:
            return 0
        self.place[model] = (owner, now + hold)
        self.placeq[model] = now + hold
        if victim != "":
            self._unplace(victim)
        self.placed[s] = now
        self.placedx[s] = now + max(residency, hold)
        return 1

    def _unplace(self, s: str) -> None:
        self.placed.pop(s, None)
        self.placedx.pop(s, None)

    def _prune_placed(self, now: int, limit: int) -> int:
        """Drop at most C{limit} lapsed placement records and as many expired claims, oldest
        first (ZRANGEBYSCORE's order)."""
        lapsed = sorted((at, s) for s, at in self.placedx.items() if at <= now)[:limit]
        for _, s in lapsed:
            self._unplace(s)
        claims = sorted((at, m) for m, at in self.placeq.items() if at <= now)[:limit]
        for _, m in claims:
            self.place.pop(m, None)
            del self.placeq[m]
        return len(lapsed) + len(claims)

    def op_finish_place(self, channel: str, owner: str, model: str, hold_s: str) -> int:
        if not _valid_id(owner):
            raise _bad("owner id")
        if not 1 <= len(model.encode()) <= MAX_MODEL:
            raise _bad("model")
        hold = _int_arg(hold_s, 0, MAX_TTL_MS)
        if hold is None:
            raise _bad("hold")
        held = self.place.get(model)
        if held is None or held[0] != owner:
            return 0
        if hold == 0:
            del self.place[model]
            self.placeq.pop(model, None)
        else:
            self.place[model] = (owner, self._now() + hold)
            self.placeq[model] = self._now() + hold
        return 1

    def op_snapshot(self, channel: str) -> list[Any]:
        now = self._now()
        oldest = min(self.w.values(), key=lambda w: w[1])[4] if self.w else -1
        out: list[Any] = [
            [now, self.seq, len(self.w), oldest, len(self.leases), sum(1 for e in self.owners.values() if e >= now), self.epoch or "",
             sorted((o for o, e in self.owners.items() if e >= now), key=lambda o: (self.owners[o], o))[:1024]]
        ]
        for s in self.total:
            g = self.gen.get(s, 0)
            out.append(
                [
                    s,
                    self.total[s],
                    self.ext.get(s, 0),
                    self._ours(s, g),
                    1 if s in self.drain else 0,
                    g,
                    self.seen.get(s, 0),
                    self.mark.get(s, 0),
                    sum(1 for w in self.w.values() if s in w[5]),
                    self.meta.get(s, ""),
                ]
            )
        return out


@implementer(ISlotStore)
class MemorySlotStore(SlotStoreBase):
    """One balancer process's view of a L{MemorySlotState}; grant hints arrive synchronously."""

    def __init__(self, state: MemorySlotState, owner: str, clock: IReactorTime | None = None, **kwargs: Any) -> None:
        super().__init__(owner, clock if clock is not None else state.clock, **kwargs)
        self.state = state
        self.channel_prefix = "{mem}:grant:"
        state._stores.append(self)
        state.subscribe(self.channel_prefix + self.owner, self._message)

    @property
    def is_up(self) -> bool:
        return self.state.available

    def _run(self, name: str, args: Sequence[Any]) -> Deferred[Any]:
        try:
            return succeed(self.state.run(name, self.channel_prefix, args))
        except Exception:
            return fail()

    def _get_mark(self) -> Deferred[Any]:
        if not self.state.available:
            return fail(StoreUnavailable("the in-memory store is marked unavailable"))
        return succeed(self.state.seq)
