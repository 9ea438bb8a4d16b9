"""What every slot store does on the balancer's side, whatever holds the state.

L{SlotStoreBase} keeps this owner's leases and waiters, turns script replies
into L{SharedLease} and L{Waiter} objects, renews, polls, reaps, retries
releases that could not be sent, and re-creates what it knows when the store
lost its data. Subclasses only say how to run a script
(L{paddler.sharedstate.redisstore.RedisSlotStore} on Redis,
L{paddler.sharedstate.memory.MemorySlotStore} in memory).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from paddler.sharedstate.errors import (
    SharedBufferFull,
    IdInUse,
    InvalidArgument,
    NoFreeSlot,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
    WaiterLost,
    WaitExpired,
)
from paddler.interfaces import ISlotStore
from paddler.sharedstate.model import (
    ReapResult,
    Reading,
    Release,
    StoreSnapshot,
    _text,
    check_candidates,
    check_count,
    check_id,
    check_meta,
    check_model,
    check_seconds,
    parse_snapshot,
)
from paddler.sharedstate.resp import RedisError
from paddler.sharedstate.scripts import MAX_BATCH, MAX_MODEL, MAX_REAP, MAX_WAITERS

#: Releases kept for a retry while the store is down; older ones are left to lease expiry.
MAX_UNSETTLED = 100_000


class SharedLease:
    """One slot held in the shared store for one request; C{release} gives it back once."""

    def __init__(
        self,
        store: SlotStoreBase,
        lease_id: str,
        server_id: str,
        generation: int,
        number: int,
        waited: float,
        model: str = "",
    ) -> None:
        self.store = store
        self.id = lease_id
        self.server_id = server_id
        self.generation = generation
        self.number = number
        self.waited = waited
        self.model = model
        self.released = False

    def __repr__(self) -> str:
        return f"<SharedLease {self.id} on {self.server_id} gen {self.generation} #{self.number}>"

    def release(self, running: bool = False) -> Deferred[Release]:
        """End the lease (idempotent); never fails: see L{SlotStoreBase.release}."""
        return self.store.release(self.id, running)


class Waiter:
    """
    A request queued in the shared FIFO. C{deferred} fires with the
    L{SharedLease} when a slot is handed over, or fails with L{WaitExpired}
    (deadline), L{WaiterLost} (the store forgot it) or L{CancelledError}
    (C{deferred.cancel()}: the client left; the waiter leaves the queue).
    """

    def __init__(
        self,
        store: SlotStoreBase,
        request_id: str,
        seq: int,
        position: int,
        candidates: list[str],
        model: str,
        deadline: float,
    ) -> None:
        self.store = store
        self.id = request_id
        self.seq = seq
        self.position = position
        self.candidates = candidates
        self.model = model
        self.deadline = deadline
        self.enqueued_at = store.clock.seconds()
        self.timeout_call: IDelayedCall | None = None
        self.deferred: Deferred[SharedLease] = Deferred(self._cancelled)

    def __repr__(self) -> str:
        return f"<Waiter {self.id} seq {self.seq}>"

    def _cancelled(self, _: Deferred[SharedLease]) -> None:
        self.store._abandon(self.id)

    def update(self, candidates: Iterable[str]) -> Deferred[SharedLease | Waiter]:
        """New candidates (the fleet changed); the waiter keeps its place in the order."""
        return self.store.acquire(self.id, candidates, self.model, wait=max(0.05, self.deadline - self.store.clock.seconds()))


class _FailedStep:
    def __init__(self, failure: Failure) -> None:
        self.failure = failure


class _Periodic:
    """A LoopingCall on the store's clock whose job never kills it (house rule 7)."""

    log = Logger()

    def __init__(self, clock: IReactorTime, interval: float, job: Callable[[], Any], name: str) -> None:
        self.interval = interval
        self.job = job
        self.name = name
        self.call = LoopingCall(self._run)
        self.call.clock = clock

    def _run(self) -> Deferred[None]:
        def failed(failure: Failure) -> None:
            if failure.check(StoreUnavailable):
                return  # the state change is logged once by the connection
            self.log.failure("shared state {job} failed", failure, job=self.name)

        return maybeDeferred(self.job).addCallbacks(lambda _: None, failed)

    def start(self, now: bool = False) -> None:
        if not self.call.running:
            self.call.start(self.interval, now=now).addErrback(
                lambda f: self.log.failure("shared state loop {job} stopped", f, job=self.name)
            )

    def stop(self) -> None:
        if self.call.running:
            self.call.stop()


@implementer(ISlotStore)
class SlotStoreBase(MultiService):
    """
    The balancer side of a shared slot store (see L{ISlotStore}). As a
    service it renews its leases every C{renew_interval} (default a third of
    C{lease_ttl}), polls its waiters every C{poll_interval} (the backstop for
    lost pub/sub hints) and reaps every C{reap_interval}. C{stopService}
    stops every loop and fails every local waiter with L{CancelledError}.
    """

    log = Logger()

    def __init__(
        self,
        owner: str,
        clock: IReactorTime,
        lease_ttl: float = 10.0,
        wait: float = 30.0,
        max_waiting: int = 30,
        renew_interval: float | None = None,
        poll_interval: float = 0.2,
        reap_interval: float = 1.0,
        reap_limit: int = 1000,
    ) -> None:
        super().__init__()
        self.owner = check_id(owner, "owner id")
        self.clock = clock
        self.lease_ttl_ms = check_seconds(lease_ttl, "lease ttl")
        self.default_wait = wait
        check_seconds(wait, "wait", allow_zero=True)
        self.max_waiting = check_count(max_waiting, "max waiting", MAX_WAITERS)
        self.reap_limit = check_count(reap_limit, "reap limit", MAX_REAP, 1)
        self.leases: dict[str, SharedLease] = {}
        self.waiters: dict[str, Waiter] = {}
        self.epoch: str | None = None
        self.resets = 0
        self._unsettled: dict[str, bool] = {}  # ids to release once the store answers -> still running
        self._servers: dict[str, tuple[int, str]] = {}  # what to re-register after the store lost its data
        self._drained: set[str] = set()
        self._pending_registrations: set[str] = set()
        self._state_listeners: list[Callable[[bool], None]] = []
        self._reset_listeners: list[Callable[[], None]] = []
        self._recovering: Deferred[None] | None = None
        self._loops = [
            _Periodic(clock, renew_interval or lease_ttl / 3.0, self.renew, "renew"),
            _Periodic(clock, poll_interval, self._poll_if_waiting, "poll"),
            _Periodic(clock, reap_interval, lambda: self.reap(self.reap_limit), "reap"),
        ]

    # -- subclasses -------------------------------------------------------

    def _run(self, name: str, args: Sequence[Any]) -> Deferred[Any]:
        """Run script C{name} with C{args} (after the channel prefix); fire with its reply."""
        raise NotImplementedError

    def _get_mark(self) -> Deferred[Any]:
        raise NotImplementedError

    @property
    def is_up(self) -> bool:
        raise NotImplementedError

    # -- lifetime ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for loop in self._loops:
            loop.start()

    def stopService(self) -> Deferred[None]:
        for loop in self._loops:
            loop.stop()
        for waiter in list(self.waiters.values()):
            self._forget_waiter(waiter.id)
            waiter.deferred.errback(CancelledError("the slot store is stopping"))
        return super().stopService()  # type: ignore[no-any-return]

    def subscribe_state(self, listener: Callable[[bool], None]) -> Callable[[], None]:
        self._state_listeners.append(listener)
        return lambda: self._state_listeners.remove(listener)

    def subscribe_reset(self, listener: Callable[[], None]) -> Callable[[], None]:
        self._reset_listeners.append(listener)
        return lambda: self._reset_listeners.remove(listener)

    def _state_changed(self, up: bool) -> None:
        for listener in list(self._state_listeners):
            try:
                listener(up)
            except Exception:
                self.log.failure("slot store state listener failed")
        if up:
            # at once, not at the next renew: releases kept while down must not hold slots (or
            # places in the FIFO) meanwhile, and leases the store lost must count again
            self._call_quietly(lambda: self.hello().addCallback(lambda _: self.renew()))

    def _call_quietly(self, job: Callable[[], Deferred[Any]]) -> None:
        def failed(failure: Failure) -> None:
            if not failure.check(StoreUnavailable):
                self.log.failure("shared state job failed", failure)

        maybeDeferred(job).addErrback(failed)

    # -- scripts with checked arguments -----------------------------------

    def _script(self, name: str, args: Sequence[Any]) -> Deferred[Any]:
        def mapped(failure: Failure) -> Failure:
            if failure.check(RedisError):
                message = str(failure.value)
                if message.startswith("PDARG"):
                    raise InvalidArgument(message[6:])
                if message.startswith("PDINUSE"):
                    raise IdInUse(message[8:])
            return failure

        return maybeDeferred(self._run, name, args).addErrback(mapped)

    def hello(self) -> Deferred[str]:
        """Make sure the store has an epoch; if it changed since we last looked, recover."""

        def answered(reply: Any) -> Deferred[Any] | str:
            epoch = _text(reply)
            previous, self.epoch = self.epoch, epoch
            if previous is not None and previous != epoch:
                return self._recover(previous, epoch).addCallback(lambda _: epoch)
            if self._pending_registrations:
                return self._register_pending().addCallback(lambda _: epoch)
            return epoch

        token = uuid.uuid4().hex
        return self._script("hello", [self.owner, self.lease_ttl_ms, token]).addCallback(answered)

    # -- servers ----------------------------------------------------------

    def register_server(self, server_id: str, total: int, meta: str = "", restarted: bool = False) -> Deferred[int]:
        try:
            check_id(server_id, "server id")
            check_count(total, "total slots")
            meta = check_meta(meta)
        except InvalidArgument:
            return fail()
        self._servers[server_id] = (total, meta)

        def done(reply: Any) -> int:
            self._pending_registrations.discard(server_id)
            return int(reply[0])

        def failed(failure: Failure) -> Failure:
            if failure.check(StoreUnavailable):
                self._pending_registrations.add(server_id)  # registered when the store answers again
            return failure

        return self._script("register", [server_id, total, meta, 1 if restarted else 0]).addCallbacks(done, failed)

    def _register_pending(self) -> Deferred[Any]:
        from twisted.internet.defer import gatherResults

        jobs = []
        for server_id in sorted(self._pending_registrations):
            if server_id in self._servers:
                total, meta = self._servers[server_id]
                jobs.append(self.register_server(server_id, total, meta).addErrback(lambda f: None))
        self._pending_registrations.clear()
        return gatherResults(jobs)

    def unregister_server(self, server_id: str) -> Deferred[bool]:
        try:
            check_id(server_id, "server id")
        except InvalidArgument:
            return fail()
        self._servers.pop(server_id, None)
        self._drained.discard(server_id)
        return self._script("unregister", [server_id]).addCallback(lambda reply: bool(int(reply)))

    def drain(self, server_id: str) -> Deferred[bool]:
        return self._drain(server_id, True)

    def undrain(self, server_id: str) -> Deferred[bool]:
        return self._drain(server_id, False)

    def _drain(self, server_id: str, on: bool) -> Deferred[bool]:
        try:
            check_id(server_id, "server id")
        except InvalidArgument:
            return fail()
        if on:
            self._drained.add(server_id)
        else:
            self._drained.discard(server_id)
        return self._script("drain", [server_id, 1 if on else 0]).addCallback(lambda reply: bool(int(reply)))

    # -- placing models on router-mode upstreams ---------------------------

    def claim_placement(
        self, model: str, server_id: str, victim_id: str | None, hold: float, residency: float
    ) -> Deferred[bool]:
        """Claim the placement of C{model} on C{server_id} (the child upstream of a router),
        evicting C{victim_id} (another child of that router) or nothing: True when this owner
        may load it, False when another owner places the model now (its claim lasts C{hold}
        seconds unless renewed or finished) or the victim was placed less than C{residency}
        seconds ago. A claim also records C{server_id} as placed now."""
        try:
            if not isinstance(model, str) or not 1 <= len(model.encode("utf-8")) <= MAX_MODEL:
                raise InvalidArgument(f"model must be a string of 1 to {MAX_MODEL} bytes")
            check_id(server_id, "server id")
            if victim_id is not None:
                check_id(victim_id, "victim server id")
            hold_ms = check_seconds(hold, "placement hold")
            residency_ms = check_seconds(residency, "residency", allow_zero=True)
        except InvalidArgument:
            return fail()
        args = [self.owner, model, server_id, victim_id or "", hold_ms, residency_ms]
        return self._script("place", args).addCallback(lambda reply: bool(int(reply)))

    def finish_placement(self, model: str, hold: float = 0.0) -> Deferred[bool]:
        """End this owner's claim on C{model}, at once or C{hold} seconds from now (so the
        others read the model loaded before they may place it again)."""
        try:
            if not isinstance(model, str) or not 1 <= len(model.encode("utf-8")) <= MAX_MODEL:
                raise InvalidArgument(f"model must be a string of 1 to {MAX_MODEL} bytes")
            hold_ms = check_seconds(hold, "placement hold", allow_zero=True)
        except InvalidArgument:
            return fail()
        return self._script("finish_place", [self.owner, model, hold_ms]).addCallback(
            lambda reply: bool(int(reply))
        )

    def probe_mark(self) -> Deferred[int]:
        return self._get_mark().addCallback(lambda reply: int(reply or 0))

    def reading(
        self, server_id: str, total: int, busy: int | None, mark: int, generation: int | None = None
    ) -> Deferred[Reading]:
        try:
            check_id(server_id, "server id")
            check_count(total, "total slots")
            if busy is not None:
                check_count(busy, "busy slots")
            check_count(mark, "mark", 2**53 - 1)
            if generation is not None:
                check_count(generation, "generation", 10**9, 1)
        except InvalidArgument:
            return fail()
        if server_id in self._servers:
            self._servers[server_id] = (total, self._servers[server_id][1])
        args = [server_id, total, "" if busy is None else busy, mark, "" if generation is None else generation]
        return self._script("reading", args).addCallback(lambda reply: Reading(int(reply[0])))

    def snapshot(self) -> Deferred[StoreSnapshot]:
        def parsed(reply: Any) -> StoreSnapshot:
            snapshot = parse_snapshot(reply)
            for figures in snapshot.servers.values():
                # remembered so that any replica can re-create the fleet if the store loses it
                self._servers.setdefault(figures.server_id, (figures.total, figures.meta))
                if figures.draining:
                    self._drained.add(figures.server_id)
            return snapshot

        return self._script("snapshot", []).addCallback(parsed)

    # -- leases and waiters -----------------------------------------------

    def acquire(
        self,
        request_id: str,
        candidates: Iterable[str],
        model: str | None = "",
        wait: float | None = None,
        max_waiting: int | None = None,
    ) -> Deferred[SharedLease | Waiter]:
        try:
            check_id(request_id, "request id")
            cands = check_candidates(candidates)
            model = check_model(model)
            wait_ms = check_seconds(self.default_wait if wait is None else wait, "wait", allow_zero=True)
            limit = check_count(self.max_waiting if max_waiting is None else max_waiting, "max waiting", MAX_WAITERS)
            if request_id in self._unsettled:
                raise InvalidArgument(f"request id {request_id} is being released; use a new id")
            if request_id in self.leases and request_id not in self.waiters:
                return succeed(self.leases[request_id])
        except InvalidArgument:
            return fail()

        def answered(reply: Any) -> SharedLease | Waiter:
            code = int(reply[0])
            if updating and request_id not in self.waiters and request_id not in self.leases:
                # the waiter left (cancelled, expired, given up) while its update was on the way: what the
                # update made in the store (a lease, or the waiter queued again) is released, not revived
                self._call_quietly(partial(self._settle, request_id))
                raise CancelledError(f"waiter {request_id} left while its candidates were being updated")
            if code == 1:
                lease = self._granted(request_id, _text(reply[1]), int(reply[2]), int(reply[3]), int(reply[4]), model)
                return lease
            if code == 2:
                existing = self.waiters.get(request_id)
                if existing is not None:
                    existing.candidates = cands
                    existing.position = int(reply[2] or 0)
                    return existing
                return self._queued(request_id, int(reply[1]), int(reply[2] or 0), cands, model, wait_ms / 1000.0)
            if code == 3:
                raise NoFreeSlot("no candidate has a free slot and waiting is disabled")
            raise SharedBufferFull(f"the shared request buffer is full ({limit} requests waiting for a slot)")

        updating = request_id in self.waiters

        def failed(failure: Failure) -> Failure:
            if failure.check(StoreTimeout) and not updating:
                # it may have run: release whatever it made, later (an update of a
                # queued waiter only moves its candidates: the waiter stays)
                self._unsettle(request_id)
            return failure

        args = [self.owner, request_id, self.lease_ttl_ms, wait_ms, limit, model, *cands]
        return self._script("acquire", args).addCallbacks(answered, failed)

    def _queued(self, request_id: str, seq: int, position: int, cands: list[str], model: str, wait: float) -> Waiter:
        waiter = Waiter(self, request_id, seq, position, cands, model, self.clock.seconds() + wait)
        waiter.timeout_call = self.clock.callLater(wait, self._expired, request_id)
        self.waiters[request_id] = waiter
        return waiter

    def _granted(
        self, request_id: str, server_id: str, generation: int, number: int, waited_ms: int, model: str = ""
    ) -> SharedLease:
        """Record the lease (idempotent) and fire the waiter that was waiting for it."""
        lease = self.leases.get(request_id)
        if lease is None:
            lease = SharedLease(self, request_id, server_id, generation, number, waited_ms / 1000.0, model)
            self.leases[request_id] = lease
        waiter = self._forget_waiter(request_id)
        if waiter is not None:
            lease.model = waiter.model
            waiter.deferred.callback(lease)
        return lease

    def _forget_waiter(self, request_id: str) -> Waiter | None:
        waiter = self.waiters.pop(request_id, None)
        if waiter is not None and waiter.timeout_call is not None and waiter.timeout_call.active():
            waiter.timeout_call.cancel()
        return waiter

    def _message(self, data: bytes) -> None:
        """A grant hint on our channel: ``id|server|gen|num|waited_ms``."""
        try:
            request_id, server_id, generation, number, waited = data.decode("utf-8").split("|")
            if request_id not in self.waiters:
                return  # already granted by a poll, or cancelled (the cancel releases it)
            self._granted(request_id, server_id, int(generation), int(number), int(waited))
        except ValueError:
            self.log.warn("ignored a malformed grant message {data!r}", data=data[:200])

    def _expired(self, request_id: str) -> None:
        waiter = self.waiters.get(request_id)
        if waiter is None:
            return
        waiter.timeout_call = None
        self._forget_waiter(request_id)
        self._settle(request_id)
        waiter.deferred.errback(WaitExpired(f"no slot was handed over within {waiter.deadline - waiter.enqueued_at:g} s"))

    def give_up_waiters(self, error: Exception) -> int:
        """
        Fail every local waiter with C{error}, oldest first (the store cannot
        be reached and their requests wait elsewhere, or the balancer stops);
        their places in the store's FIFO are released now, or when it answers
        again. Returns how many.
        """
        waiters = sorted(self.waiters.values(), key=lambda w: w.seq)
        for waiter in waiters:
            self._forget_waiter(waiter.id)
            self._call_quietly(partial(self._settle, waiter.id))
        for waiter in waiters:
            if not waiter.deferred.called:
                waiter.deferred.errback(error)
        return len(waiters)

    def _abandon(self, request_id: str) -> None:
        """The waiter's Deferred was cancelled: leave the queue (or give back a slot granted meanwhile)."""
        self._forget_waiter(request_id)
        self._settle(request_id)

    def release(self, request_id: str, running: bool = False) -> Deferred[Release]:
        """
        End the lease or waiter C{request_id} (idempotent). Never fails for
        want of the store: while it is down the release is kept and sent
        when it answers again (fires with C{None} then), and the lease's
        expiry is the last resort. C{running}: the client left but the
        server goes on with the request, so its slot stays busy (as external
        load) until the next reading of the server.
        """
        try:
            check_id(request_id, "request id")
        except InvalidArgument:
            return fail()
        lease = self.leases.pop(request_id, None)
        if lease is not None:
            lease.released = True
        waiter = self._forget_waiter(request_id)
        if waiter is not None and not waiter.deferred.called:
            waiter.deferred.errback(CancelledError("released while waiting"))
        return self._settle(request_id, running)

    cancel = release

    def _settle(self, request_id: str, running: bool = False) -> Deferred[Any]:
        def failed(failure: Failure) -> None:
            failure.trap(StoreUnavailable)
            self._unsettle(request_id, running)
            return None

        def done(reply: Any) -> Release:
            self._unsettled.pop(request_id, None)
            return Release(int(reply))

        return self._script("release", [request_id, "1" if running else "0"]).addCallbacks(done, failed)

    def _unsettle(self, request_id: str, running: bool = False) -> None:
        self._unsettled[request_id] = running
        while len(self._unsettled) > MAX_UNSETTLED:
            self._unsettled.pop(next(iter(self._unsettled)))

    def _flush_unsettled(self) -> Deferred[Any]:
        from twisted.internet.defer import gatherResults

        ids = list(self._unsettled)[:MAX_BATCH]
        return gatherResults([self._settle(request_id, self._unsettled[request_id]) for request_id in ids])

    def adopt(self, request_id: str, server_id: str, model: str | None = "") -> Deferred[SharedLease | None]:
        try:
            check_id(request_id, "request id")
            check_id(server_id, "server id")
            model = check_model(model)
        except InvalidArgument:
            return fail()

        def answered(reply: Any) -> SharedLease | None:
            if int(reply[0]) != 1:
                return None
            lease = self.leases.get(request_id)
            if lease is None:
                return self._granted(request_id, _text(reply[1]), int(reply[2]), int(reply[3]), int(reply[4]), model)
            lease.server_id, lease.generation, lease.number = _text(reply[1]), int(reply[2]), int(reply[3])
            return lease

        return self._script("adopt", [self.owner, request_id, server_id, self.lease_ttl_ms, model]).addCallback(answered)

    # -- keeping things alive ---------------------------------------------

    def renew(self) -> Deferred[list[str]]:
        """Renew every lease and the heartbeat; re-adopt leases the store lost; send pending releases."""
        if self.epoch is None:
            return self.hello().addCallback(lambda _: self.renew())
        ids = list(self.leases)
        chunks = [ids[i : i + MAX_BATCH] for i in range(0, len(ids), MAX_BATCH)] or [[]]
        lost: list[str] = []

        def step(_: Any = None) -> Deferred[list[str]] | list[str]:
            if not chunks:
                return lost
            chunk = chunks.pop(0)
            return self._script("renew", [self.owner, self.lease_ttl_ms, self.epoch, *chunk]).addCallback(answered)

        def answered(reply: Any) -> Deferred[Any] | list[str]:
            if int(reply[0]) == 0:
                return self.hello().addCallback(lambda _: lost)
            for value in reply[1:]:
                lost.append(_text(value))
            return step()

        def readopt(lost: list[str]) -> Deferred[list[str]]:
            from twisted.internet.defer import gatherResults

            jobs = []
            for request_id in lost:
                lease = self.leases.get(request_id)
                if lease is not None:
                    self.log.warn(
                        "the shared store lost lease {lease} on {server} (reaped?); adopting it again",
                        lease=request_id,
                        server=lease.server_id,
                    )
                    jobs.append(self.adopt(request_id, lease.server_id, lease.model))
            return gatherResults(jobs).addCallback(lambda _: lost)

        started: Deferred[Any] = maybeDeferred(step)
        return started.addCallback(readopt).addCallback(self._after_renew)

    def _after_renew(self, lost: list[str]) -> Deferred[list[str]] | list[str]:
        if self._unsettled:
            return self._flush_unsettled().addCallback(lambda _: lost)
        return lost

    def _poll_if_waiting(self) -> Deferred[None] | None:
        if self.waiters:
            return self.poll()
        return None

    def poll(self) -> Deferred[None]:
        """Ask the store about every local waiter: fire those granted, fail those it forgot."""
        ids = list(self.waiters)[:MAX_BATCH]
        if not ids:
            return succeed(None)
        if self.epoch is None:
            return self.hello().addCallback(lambda _: None)

        def answered(reply: Any) -> Deferred[Any] | None:
            if int(reply[0]) == 0:
                return self.hello().addCallback(lambda _: None)
            for request_id, state in zip(ids, reply[1:]):
                if request_id not in self.waiters:
                    continue
                code = int(state[0])
                if code == 1:
                    self._granted(request_id, _text(state[1]), int(state[2]), int(state[3]), int(state[4]))
                elif code == 2:
                    self.waiters[request_id].position = int(state[2] or 0)
                elif self._recovering is None:
                    waiter = self._forget_waiter(request_id)
                    if waiter is not None:
                        waiter.deferred.errback(WaiterLost("the shared store no longer knows this waiter"))
            return None

        return self._script("poll", [self.owner, self.epoch, *ids]).addCallback(answered)

    def reap(self, limit: int = 1000) -> Deferred[ReapResult]:
        try:
            check_count(limit, "reap limit", MAX_REAP, 1)
        except InvalidArgument:
            return fail()
        return self._script("reap", [limit]).addCallback(lambda reply: ReapResult(*(int(v) for v in reply)))

    # -- when the store lost its data -------------------------------------

    def _recover(self, previous: str, epoch: str) -> Deferred[None]:
        """Re-create servers, drains, our leases and our waiters (in our order) in an emptied store."""
        if self._recovering is not None:
            return self._recovering
        self.resets += 1
        self.log.warn(
            "the shared slot store lost its data (epoch {previous} -> {epoch}): re-registering "
            "{servers} servers, adopting {leases} leases, queueing {waiters} waiters again",
            previous=previous,
            epoch=epoch,
            servers=len(self._servers),
            leases=len(self.leases),
            waiters=len(self.waiters),
        )

        async def recover() -> None:
            self._pending_registrations.clear()
            for server_id, (total, meta) in list(self._servers.items()):
                # counted fully busy until the next reading: other owners have not adopted their leases yet
                await self._quiet(self._script("register", [server_id, total, meta, 2]), "register", server_id)
            for server_id in list(self._drained):
                await self._quiet(self._script("drain", [server_id, 1]), "drain", server_id)
            for lease in list(self.leases.values()):
                await self._quiet(self.adopt(lease.id, lease.server_id, lease.model), "adopt", lease.id)
            now = self.clock.seconds()
            for waiter in list(self.waiters.values()):
                if waiter.id not in self.waiters:
                    continue
                wait = max(0.05, waiter.deadline - now)
                result = await self._quiet(
                    self.acquire(waiter.id, waiter.candidates, waiter.model, wait=wait), "queue", waiter.id
                )
                if isinstance(result, _FailedStep) and self._forget_waiter(waiter.id) is not None:
                    error = result.failure.getErrorMessage()
                    waiter.deferred.errback(WaiterLost(f"could not queue again: {error}"))

        def finished(result: Any) -> Any:
            self._recovering = None
            if not isinstance(result, Failure):
                for listener in list(self._reset_listeners):
                    try:
                        listener()
                    except Exception:
                        self.log.failure("slot store reset listener failed")
            return result

        recovering: Deferred[None] = Deferred()
        self._recovering = recovering
        Deferred.fromCoroutine(recover()).addBoth(finished).chainDeferred(recovering)
        return recovering

    def _quiet(self, job: Deferred[Any], what: str, name: str) -> Deferred[Any]:
        """A step of recovery: log a failure and go on with the next step."""

        def failed(failure: Failure) -> _FailedStep:
            self.log.warn(
                "re-creating shared state: {what} {name} failed: {error}",
                what=what,
                name=name,
                error=failure.getErrorMessage(),
            )
            return _FailedStep(failure)

        return job.addErrback(failed)


__all__ = ["SharedLease", "SlotStoreBase", "Waiter", "StoreError"]
