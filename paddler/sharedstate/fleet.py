"""One balancer process's side of a fleet shared with other balancers (``--state redis://...``).

L{SharedFleet} binds the process's L{UpstreamPool} to a shared slot store
(L{paddler.interfaces.ISlotStore}):

- **Membership.** Every upstream the process adds (configuration, the
  management API, an agent's report, the demo fleet) is registered in the
  store with its URL, name, source, models and health in the server's
  metadata; every C{sync_interval} the process reads the store's snapshot and
  adds the upstreams other processes registered, applies their figures, and
  drops those removed elsewhere (the static ones of its own configuration are
  registered again).
- **Probing.** Each upstream is probed by one process only: the live owner
  whose hash with the upstream's id is highest (rendezvous hashing over the
  owners in the snapshot). When an owner dies its heartbeat expires and the
  others take its upstreams over at the next sync. The prober sends its
  readings to the store (a store mark is taken before each probe, so leases
  granted meanwhile are not counted twice); the others take the figures from
  the snapshot. Health and models travel in the metadata.
- **Leases and the buffer.** While the store answers, slots are acquired
  through it (atomic across processes, one FIFO of waiters for the whole
  fleet, a freed slot handed to the oldest waiter that can use it and its
  process told at once). Each shared lease is mirrored by a local one, so
  the local figures and metrics stay right.
- **The store unavailable.** The process goes on from its last view with
  local leases and its local buffer, taking at most its share of each
  upstream (slots ÷ owners last seen, rounded up); it says so in its log,
  in ``/health`` and in ``paddler_shared_state_up``. When the store answers
  again, the requests it started meanwhile are adopted as shared leases.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from itertools import count
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from paddler.errors import BufferingDisabled
from paddler.fleet.pool import Lease, UpstreamPool
from paddler.fleet.routers import child_id, new_child
from paddler.fleet.upstream import (
    FailureSeen,
    LoadingSeen,
    Observation,
    SlotsSeen,
    Upstream,
    UpstreamState,
)
from paddler.interfaces import ISlotSource, IUpstreamProber
from paddler.sharedstate import errors as store_errors
from paddler.sharedstate.model import StoreSnapshot

#: Seconds between two reads of the store's snapshot.
SYNC_INTERVAL = 0.25
#: Longest a process back from an outage waits for fresh readings before taking slots through the store.
SETTLE_TIMEOUT = 3.0


def rendezvous(owners: tuple[str, ...], upstream_id: str) -> str | None:
    """The owner that probes C{upstream_id}: the highest hash of (owner, upstream)."""
    if not owners:
        return None
    return max(owners, key=lambda owner: hashlib.sha1(f"{owner}|{upstream_id}".encode()).digest())


def upstream_meta(upstream: Upstream) -> str:
    """What other processes need to know of an upstream, as the store's server metadata
    (for a router-mode server: its role and limits; for one of its models: the router's
    id, the model and its state)."""
    meta: dict[str, Any] = {
        "url": upstream.url,
        "name": upstream.name,
        "source": upstream.source,
        "state": upstream.state.value,
        "error": (upstream.last_error or "")[:500],
        "models": list(upstream.models)[:16],
    }
    if upstream.role == "router":
        meta.update(role="router", max_instances=upstream.max_instances, autoload=upstream.autoload)
    if upstream.parent_id is not None:
        meta.update(parent=upstream.parent_id, model=upstream.router_model, model_state=upstream.model_state,
                    exit_code=upstream.exit_code, slots_when_loaded=upstream.slots_when_loaded)
    return json.dumps(meta, separators=(",", ":"))


def _meta_of(figures: Any) -> dict[str, Any]:
    try:
        meta = json.loads(figures.meta) if figures.meta else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


@implementer(ISlotSource)
class SharedFleet(Service):
    """
    Keeps a pool and a shared slot store in step (see the module docstring).

    @param store: an L{ISlotStore} that is also a service (started and stopped with this one).
    """

    log = Logger()

    def __init__(
        self,
        pool: UpstreamPool,
        store: Any,
        clock: IReactorTime,
        static_ids: frozenset[str] = frozenset(),
        sync_interval: float = SYNC_INTERVAL,
    ) -> None:
        self.pool = pool
        self.store = store
        self.clock = clock
        self.static_ids = static_ids
        self.sync_interval = sync_interval
        self.snapshot: StoreSnapshot | None = None
        self.owners_seen = 1
        self._ids = count(1)
        self._fallback: dict[str, tuple[str, Lease]] = {}  # request id -> (server, local lease) taken while down
        self._homeless: list[tuple[Deferred[None], Any]] = []
        self._known_in_store: set[str] = set()
        self._syncing = False
        self._unsubscribers: list[Callable[[], None]] = []
        self._loop = LoopingCall(self._sync_safely)
        self._loop.clock = clock
        self._was_up: bool | None = None
        self._ever_up = False
        # back from an outage (see _follow_settling): snapshots read so far, the count when it came
        # back, the store time of the first snapshot read since, and the deadline
        self._snapshots = 0
        self._settling = False
        self._settle_from = 0
        self._settle_since: float | None = None
        self._settle_until = 0.0

    # -- lifetime ---------------------------------------------------------

    @property
    def reachable(self) -> bool:
        """Whether the store answers and has been read (slots may still not be taken through it)."""
        return bool(self.store.is_up) and self.snapshot is not None

    @property
    def up(self) -> bool:
        """Whether slots are taken through the store now."""
        return self.reachable and not self._settling

    @property
    def settling(self) -> bool:
        """Back from an outage, waiting for readings taken since (see L{_follow_settling})."""
        return self._settling

    @property
    def requests_waiting(self) -> int:
        """This process's requests waiting in the shared buffer."""
        return len(self.store.waiters) + len(self._homeless)

    def startService(self) -> None:
        super().startService()
        self._unsubscribers = [
            self.pool.subscribe(self._pool_event),
            self.pool.subscribe_observations(self._observed),
            self.store.subscribe_state(self._store_state),
            self.store.subscribe_reset(self._store_reset),
        ]
        self.store.startService()
        self._quietly(self.store.hello(), "hello")  # be one of the owners from the first snapshot on
        for upstream in list(self.pool.upstreams.values()):
            self._register(upstream)
        self._loop.start(self.sync_interval, now=True).addErrback(
            lambda f: self.log.failure("shared fleet sync stopped", f)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        for unsubscribe in self._unsubscribers:
            unsubscribe()
        self._unsubscribers = []
        for waiting, _ in self._homeless:
            waiting.cancel()
        self._homeless = []
        return self.store.stopService()  # type: ignore[no-any-return]

    def _store_state(self, link_up: bool) -> None:
        self._check_up()

    def _check_up(self) -> None:
        """
        Follow L{up} (the store's link, and a snapshot read): when slots start
        being taken through the store, the requests started meanwhile become
        shared leases and the requests waiting here join the shared FIFO;
        when they stop, this process's requests in the shared FIFO wait here.
        """
        self._follow_settling()
        up = self.up
        if up == self._was_up:
            return
        starting = self._was_up is None
        self._was_up = up
        if up:
            self._ever_up = True
            self.log.info("shared state: the store answers again; slots are taken through it")
            self._adopt_fallback()
            self.pool.hand_waiters_over(self._acquire_since)
        else:
            if not starting:
                self.log.warn(
                    "shared state: the store is unavailable; serving from the last view with local leases, "
                    "at most 1/{owners} of each upstream's slots",
                    owners=self.owners_seen,
                )
            self.store.give_up_waiters(
                store_errors.WaiterLost("the shared store is unavailable; waiting in this balancer's buffer")
            )
        self.pool.notify("changed")

    def _follow_settling(self) -> None:
        """
        Back from an outage, the store does not count the requests other
        processes started meanwhile until they adopt them, and a slot it
        hands out now could be one of theirs. So until the store holds a
        reading of every upstream taken since it answered again (this process
        probes them all meanwhile), or L{SETTLE_TIMEOUT} passed, slots are
        taken neither through it nor locally: requests wait here.
        """
        if not self._settling:
            if self.reachable and self._was_up is False and self._ever_up:
                self._settling = True
                self._settle_from = self._snapshots
                self._settle_since = None
                self._settle_until = self.clock.seconds() + SETTLE_TIMEOUT
                self.log.info("shared state: the store answers again; waiting for fresh readings of the fleet")
            return
        if self._settle_since is None and self._snapshots > self._settle_from and self.snapshot is not None:
            self._settle_since = self.snapshot.now  # the first snapshot read since it came back
        if not self.reachable or self.clock.seconds() >= self._settle_until or self._fresh():
            self._settling = False

    def _fresh(self) -> bool:
        """Whether the store holds a reading, applied since it came back, of every upstream that takes requests."""
        since = self._settle_since
        if since is None or self.snapshot is None:
            return False
        for upstream in self.pool.upstreams.values():
            figures = self.snapshot.servers.get(upstream.id)
            if upstream.accepts_requests and figures is not None and (figures.seen is None or figures.seen < since):
                return False
        return True

    def _store_reset(self) -> None:
        self.log.warn("shared state: the store lost its data and was rebuilt from what this process knew")
        for upstream in list(self.pool.upstreams.values()):
            self._register(upstream)

    # -- what the pool does -------------------------------------------------

    def local_share(self, upstream: Upstream) -> int:
        """Slots this process may hold on C{upstream} while the store is down (none while settling)."""
        if self.settling:
            return 0
        return math.ceil(upstream.slots_total / max(1, self.owners_seen))

    def probes(self, upstream: Upstream) -> bool:
        """Whether this process is the one that probes C{upstream} (all of them while the store is
        down); a router's model is read with its router."""
        if not self.up or self.snapshot is None:
            return True
        owner = rendezvous(self.snapshot.owner_ids, upstream.parent_id or upstream.id)
        return owner is None or owner == self.store.owner

    def _pool_event(self, event: str, upstream: Upstream | None) -> None:
        if upstream is None or self._syncing:
            return
        if event == "added":
            self._register(upstream)
        elif event == "removed":
            self._quietly(self.store.unregister_server(upstream.id), "unregister")
        elif event == "changed" and upstream.id in self._known_in_store:
            if upstream.draining != self._store_draining(upstream.id):
                action = self.store.drain if upstream.draining else self.store.undrain
                self._quietly(action(upstream.id), "drain")

    def _store_draining(self, upstream_id: str) -> bool:
        figures = self.snapshot.servers.get(upstream_id) if self.snapshot is not None else None
        return bool(figures and figures.draining)

    def _observed(self, upstream: Upstream, observation: Observation, changed: bool) -> None:
        if observation.source == "shared":
            return
        if changed or (isinstance(observation, SlotsSeen) and observation.models is not None):
            self._register(upstream)
        if isinstance(observation, SlotsSeen) and observation.source == "agent":
            self.send_reading(upstream, observation.total, observation.processing, None)

    def republish(self, upstream: Upstream) -> None:
        """C{upstream}'s metadata changed (a router's role or a model's state): tell the store."""
        if not self._syncing and upstream.id in self.pool.upstreams:
            self._register(upstream)

    def _register(self, upstream: Upstream) -> None:
        self._known_in_store.add(upstream.id)
        self._quietly(
            self.store.register_server(upstream.id, upstream.slots_total, upstream_meta(upstream)), "register"
        )

    def send_reading(self, upstream: Upstream, total: int, busy: int | None, mark: int | None) -> None:
        """Tell the store what a probe or an agent read (with a store mark taken before, or now)."""
        marked = succeed(mark) if mark is not None else self.store.probe_mark()
        marked.addCallback(lambda taken: self.store.reading(upstream.id, total, busy, taken))
        self._quietly(marked, "reading")

    def _quietly(self, d: Deferred[Any], what: str) -> None:
        def failed(failure: Failure) -> None:
            if failure.check(store_errors.StoreUnavailable, store_errors.UnknownServer, CancelledError):
                return
            self.log.failure("shared state: {what} failed", failure, what=what)

        d.addErrback(failed)

    # -- acquiring through the store ------------------------------------------

    def acquire(
        self, model: str | None, exclude: frozenset[str], demand: Any, since: float | None = None
    ) -> Deferred[Lease]:
        """
        A lease granted by the store, now or when the fleet frees a slot for
        this request. Cancelling it (the client left) takes the request out of
        the shared buffer. C{since}: when the request began waiting, if it
        already waited here (its deadline stays the same). While the store
        is down the pool's own buffer serves it.
        """
        if not self.up:
            return self.pool.acquire_locally(model, exclude, demand, since)
        return self._acquire_since(model, exclude, demand, self.clock.seconds() if since is None else since)

    def _acquire_since(self, model: str | None, exclude: frozenset[str], demand: Any, since: float) -> Deferred[Lease]:
        return ensureDeferred(self._acquire(model, exclude, demand, since))

    async def _acquire(self, model: str | None, exclude: frozenset[str], demand: Any, started: float) -> Lease:
        pool = self.pool
        while True:
            candidates = pool.ranked(model, exclude, demand)
            remaining = pool.buffer_timeout - (self.clock.seconds() - started)
            if remaining <= 0:
                raise pool.buffer_timeout_error()
            if not candidates:
                await self._wait_for_candidates(remaining, model)
                continue
            request_id = f"{self.store.owner}.{next(self._ids)}"
            try:
                granted = await self.store.acquire(
                    request_id,
                    [u.id for u in candidates[:256]],
                    model or "",
                    wait=remaining if pool.max_buffered else 0.0,
                    max_waiting=pool.max_buffered,
                )
                if not hasattr(granted, "server_id"):  # a waiter in the shared FIFO
                    pool.notify("changed")
                    try:
                        granted = await granted.deferred
                    finally:
                        pool.notify("changed")
            except store_errors.NoFreeSlot:
                raise BufferingDisabled("no free slot on any upstream and buffering is disabled") from None
            except store_errors.SharedBufferFull:
                raise pool.buffer_full_error(" fleet-wide") from None
            except store_errors.WaitExpired:
                raise pool.buffer_timeout_error() from None
            except (store_errors.StoreUnavailable, store_errors.WaiterLost):
                # The store went away under this request: it goes on waiting in the local buffer.
                return await self._local(model, exclude, demand, started)
            lease = self._mirror(granted, demand, self.clock.seconds() - started)
            if lease is not None:
                return lease

    def _mirror(self, shared: Any, demand: Any, waited: float) -> Lease | None:
        """The local lease for a shared one (released together); None if the upstream left meanwhile."""
        upstream = self.pool.upstreams.get(shared.server_id)
        if upstream is None:
            self._quietly(shared.release(), "release")
            return None
        return self.pool.grant(
            upstream, waited, demand, on_release=lambda running: self._quietly(shared.release(running), "release")
        )

    def waiting_by_model(self) -> dict[str, int]:
        """This process's requests waiting through the store (in its FIFO, or for an upstream
        that may take them, as for a model loaded nowhere), per model ("" for none)."""
        counts: dict[str, int] = {}
        for waiter in self.store.waiters.values():
            counts[waiter.model or ""] = counts.get(waiter.model or "", 0) + 1
        for _, model in self._homeless:
            counts[model or ""] = counts.get(model or "", 0) + 1
        return counts

    async def _wait_for_candidates(self, remaining: float, model: str | None = None) -> None:
        """No upstream may take the request yet (scale from zero): wait until one may, or the deadline."""
        waiting: Deferred[None] = Deferred()
        entry = (waiting, model)
        self._homeless.append(entry)
        timer = self.clock.callLater(remaining, lambda: None if waiting.called else waiting.callback(None))
        try:
            await waiting
        finally:
            if timer.active():
                timer.cancel()
            if entry in self._homeless:
                self._homeless.remove(entry)

    def stop_waiting(self, error: Exception) -> None:
        """The balancer stops: this process's requests in the shared buffer fail with C{error} and leave it."""
        self.store.give_up_waiters(error)
        self._wake_homeless(error)

    def _wake_homeless(self, error: Exception | None = None) -> None:
        """The requests waiting for a candidate look again (or fail with C{error})."""
        homeless, self._homeless = self._homeless, []
        for waiting, _ in homeless:
            if waiting.called:
                continue
            if error is None:
                waiting.callback(None)
            else:
                waiting.errback(error)

    async def _local(self, model: str | None, exclude: frozenset[str], demand: Any, started: float) -> Lease:
        return await self.acquire(model, exclude, demand, since=started)

    def admits(self, upstream: Upstream) -> bool:
        """While the store is down this process takes only its share of each upstream."""
        return self.up or upstream.slots_held < self.local_share(upstream)

    def taken_locally(self, lease: Lease) -> None:
        """A lease the pool granted on its own while the store was down: adopted when it answers again."""
        request_id = f"{self.store.owner}.{next(self._ids)}"
        self._fallback[request_id] = (lease.upstream.id, lease)
        lease.on_release = lambda running: self._fallback.pop(request_id, None)
        if self._was_up:
            self._adopt_fallback()  # taken as the store came back: the store must count it now

    def _adopt_fallback(self) -> None:
        """Requests started while the store was down become shared leases (they are running)."""
        for request_id, (server_id, lease) in list(self._fallback.items()):
            if lease.released:
                self._fallback.pop(request_id, None)
                continue

            def adopted(shared: Any, request_id: str = request_id, lease: Lease = lease) -> None:
                self._fallback.pop(request_id, None)
                if shared is None:
                    return
                if lease.released:
                    self._quietly(shared.release(), "release")
                else:
                    lease.on_release = lambda running: self._quietly(shared.release(running), "release")

            self._quietly(self.store.adopt(request_id, server_id).addCallback(adopted), "adopt")

    # -- reading the store ----------------------------------------------------

    def _sync_safely(self) -> Deferred[None]:
        d = self.store.snapshot().addCallback(self._apply)

        def failed(failure: Failure) -> None:
            if not failure.check(store_errors.StoreUnavailable, CancelledError):
                self.log.failure("shared state: sync failed; trying again", failure)

        return d.addErrback(failed)

    def _apply(self, snapshot: StoreSnapshot) -> None:
        self.snapshot = snapshot
        self._snapshots += 1
        self.owners_seen = max(1, snapshot.owners)
        self._syncing = True
        try:
            self._apply_servers(snapshot)
        finally:
            self._syncing = False
        self._check_up()
        if self._homeless and any(u.accepts_requests for u in self.pool.upstreams.values()):
            self._wake_homeless()
        self._update_waiters()

    def _apply_servers(self, snapshot: StoreSnapshot) -> None:
        pool = self.pool
        metas = {server_id: _meta_of(figures) for server_id, figures in snapshot.servers.items()}
        # routers before their models: a model's upstream is made from its router's
        order = sorted(snapshot.servers, key=lambda server_id: "parent" in metas[server_id])
        for server_id in order:
            figures, meta = snapshot.servers[server_id], metas[server_id]
            self._known_in_store.add(server_id)
            upstream = pool.upstreams.get(server_id)
            if upstream is None:
                upstream = self._add_from_meta(server_id, meta)
                if upstream is None:
                    continue
            if figures.draining and not upstream.draining:
                pool.drain(upstream.id)
            elif not figures.draining and upstream.draining and not upstream.drain_requested:
                pool.undrain(upstream.id)
            if upstream.source != "agent" and self.probes(upstream):
                continue  # this process reads it itself
            _apply_router_meta(pool, upstream, meta)
            pool.observe(upstream, self._observation(upstream, figures, meta))
        for upstream_id in list(pool.upstreams):
            if upstream_id in snapshot.servers or upstream_id not in self._known_in_store:
                continue
            if upstream_id in self.static_ids:
                self._register(pool.upstreams[upstream_id])  # ours by configuration: back in the store
                continue
            self._known_in_store.discard(upstream_id)
            pool.remove(upstream_id)

    def _add_from_meta(self, server_id: str, meta: dict[str, Any]) -> Upstream | None:
        """The upstream another process registered as C{server_id}, added to the pool (or None)."""
        pool = self.pool
        url = meta.get("url")
        if not isinstance(url, str):
            return None
        parent_id, model = meta.get("parent"), meta.get("model")
        if parent_id is not None:
            parent = pool.upstreams.get(parent_id) if isinstance(parent_id, str) else None
            if parent is None or not isinstance(model, str) or child_id(parent.url, model) != server_id:
                return None
            child = new_child(parent, model)
            child.draining = parent.draining
            return pool.add(child)  # type: ignore[no-any-return]
        try:
            upstream = pool.add(
                Upstream(url, str(meta.get("name") or "") or None, source=str(meta.get("source") or "shared"),
                         clock=self.clock)
            )
        except ValueError:
            return None
        return upstream if upstream.id == server_id else None

    @staticmethod
    def _observation(upstream: Upstream, figures: Any, meta: dict[str, Any]) -> Observation:
        state = meta.get("state")
        if state == UpstreamState.LOADING.value:
            return LoadingSeen(source="shared")
        if state == UpstreamState.UNREACHABLE.value:
            return FailureSeen(str(meta.get("error") or "unreachable (seen by another balancer)"), source="shared")
        models = meta.get("models")
        return SlotsSeen(
            figures.total,
            min(figures.total, figures.external + figures.leased),
            upstream.probe_mark(),
            source="shared",
            models=tuple(str(m) for m in models) if isinstance(models, list) and models else None,
        )

    def _update_waiters(self) -> None:
        """Waiters in the shared FIFO list the upstreams that may take them now (they keep their place)."""
        for waiter in list(self.store.waiters.values()):
            candidates = [u.id for u in self.pool.ranked(waiter.model or None)][:256]
            if candidates and candidates != list(waiter.candidates):
                self._quietly(waiter.update(candidates), "waiter update")

    def report_age(self, upstream_id: str) -> float | None:
        """Seconds since the store last got a reading of C{upstream_id} (from any process), or None."""
        figures = self.snapshot.servers.get(upstream_id) if self.snapshot is not None else None
        if figures is None or figures.seen is None or self.snapshot is None:
            return None
        return max(0.0, self.snapshot.now - figures.seen)

    def metrics(self) -> Any:
        """The Prometheus families of the shared state (scraped with the rest)."""
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "paddler_shared_state_up", "1 while the shared slot store (--state) answers, else 0.", value=int(self.up)
        )
        yield GaugeMetricFamily(
            "paddler_shared_state_owners",
            "Balancer processes sharing the fleet (alive in the store's last snapshot).",
            value=0 if self.snapshot is None else self.snapshot.owners,
        )

    def describe(self) -> dict[str, Any]:
        """The shared state as ``/health`` and the state API show it."""
        snapshot = self.snapshot
        return {
            "up": self.up,
            "settling": self.settling,
            "owner": self.store.owner,
            "owners": 0 if snapshot is None else snapshot.owners,
            "requests_waiting_fleet_wide": 0 if snapshot is None else snapshot.waiting,
            "requests_waiting_here": self.requests_waiting,
        }


def _apply_router_meta(pool: Any, upstream: Upstream, meta: dict[str, Any]) -> None:
    """A router's role and limits, or a router model's state, as the process that reads it said."""
    if meta.get("role") == "router":
        upstream.role = "router"
        max_instances = meta.get("max_instances")
        upstream.max_instances = max_instances if isinstance(max_instances, int) else 0
        upstream.autoload = bool(meta.get("autoload", True))
        return
    if upstream.parent_id is None or upstream.parent_id != meta.get("parent"):
        return
    state = meta.get("model_state")
    if isinstance(state, str) and state != upstream.model_state:
        now = upstream._clock.seconds() if upstream._clock is not None else 0.0
        if upstream.model_state == "loading" and state == "loaded":
            upstream.load_seconds = max(0.0, now - upstream.model_since)
        upstream.model_state = state
        upstream.model_since = now
    exit_code = meta.get("exit_code")
    upstream.exit_code = exit_code if isinstance(exit_code, int) else 0
    slots = meta.get("slots_when_loaded")
    if isinstance(slots, int) and slots > 0:
        upstream.slots_when_loaded = slots
    parent = pool.upstreams.get(upstream.parent_id)
    # with --model-placement paddler loads models itself: requests wait for its loads
    upstream.autoload = (parent.autoload if parent is not None else True) and not getattr(
        pool, "model_placement", False)


@implementer(IUpstreamProber)
class SharedProber:
    """Probes only the upstreams this process is elected for, and tells the store what it read."""

    def __init__(self, prober: Any, fleet: SharedFleet) -> None:
        self.prober = prober
        self.fleet = fleet
        self._marks: dict[str, int | None] = {}
        prober.on_reading = self._read
        prober.on_router_reading = self._read_router

    def probe(self, upstream: Upstream) -> Deferred[None]:
        if not self.fleet.probes(upstream):
            return succeed(None)
        if not self.fleet.reachable:
            return self.prober.probe(upstream)  # type: ignore[no-any-return]
        marked = self.fleet.store.probe_mark()
        marked.addTimeout(1.0, self.fleet.clock)

        def probe(mark: Any) -> Deferred[None]:
            self._marks[upstream.id] = mark if isinstance(mark, int) else None
            return self.prober.probe(upstream)  # type: ignore[no-any-return]

        return marked.addBoth(probe)

    def _read(self, upstream: Upstream, reading: Any) -> None:
        mark = self._marks.pop(upstream.id, None)
        if mark is not None and self.fleet.reachable:
            self.fleet.send_reading(upstream, reading.total, reading.processing, mark)

    def _read_router(self, router: Upstream, reading: Any) -> None:
        """A router's reading: each of its models' slots to the store (those of a model not
        loaded as its child counts them: no request takes them but through a load)."""
        mark = self._marks.pop(router.id, None)
        if mark is None or not self.fleet.reachable:
            return
        upstreams = self.fleet.pool.upstreams
        for model in reading.models:
            child = upstreams.get(child_id(router.url, model.id))
            if child is None:
                continue
            if model.state == "loaded":
                self.fleet.send_reading(child, model.total, model.processing, mark)
            else:
                self.fleet.send_reading(child, child.slots_total, 0, mark)
