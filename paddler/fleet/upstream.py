"""One llama.cpp server as the balancer sees it: its health state and its slots.

Slot bookkeeping (the part the original Paddler got wrong): a probe answer is
an absolute snapshot taken while some of *our* requests were running. We keep
our own requests as numbered leases; a probe remembers the next lease number
when it is sent. When its answer arrives, the leases older than that number
that are still open were certainly running when the server answered, so the
rest of the server's ``processing`` count belongs to other clients
(``external``). The live figure is ``min(total, external + ours)``, which
cannot go negative or drift: every lease is returned exactly once, and the
next probe overwrites ``external``.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class UpstreamState(enum.Enum):
    """Health of an upstream, as probes, agents and the proxy see it (drawn in docs/states.md)."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    LOADING = "loading"
    UNREACHABLE = "unreachable"

    @property
    def serving(self) -> bool:
        """Whether an upstream in this state may take requests (unless it is draining)."""
        return self is UpstreamState.HEALTHY


class Event(enum.Enum):
    """What an observation says about an upstream's health."""

    SERVING = "serving"  # its slots were read: it can take requests
    LOADING = "loading"  # it answered 503 "Loading model"
    FAILING = "failing"  # a failed probe, below --unhealthy-after in a row
    UNREACHABLE = "unreachable"  # failures reached the bound, a connection broke, or its agent says so


_S, _E = UpstreamState, Event
#: Every (state, event) pair and the state it leads to; nothing else moves an upstream.
TRANSITIONS: dict[tuple[UpstreamState, Event], UpstreamState] = {
    (_S.UNKNOWN, _E.SERVING): _S.HEALTHY,
    (_S.UNKNOWN, _E.LOADING): _S.LOADING,
    (_S.UNKNOWN, _E.FAILING): _S.UNKNOWN,
    (_S.UNKNOWN, _E.UNREACHABLE): _S.UNREACHABLE,
    (_S.HEALTHY, _E.SERVING): _S.HEALTHY,
    (_S.HEALTHY, _E.LOADING): _S.LOADING,
    (_S.HEALTHY, _E.FAILING): _S.HEALTHY,
    (_S.HEALTHY, _E.UNREACHABLE): _S.UNREACHABLE,
    (_S.LOADING, _E.SERVING): _S.HEALTHY,
    (_S.LOADING, _E.LOADING): _S.LOADING,
    (_S.LOADING, _E.FAILING): _S.LOADING,
    (_S.LOADING, _E.UNREACHABLE): _S.UNREACHABLE,
    (_S.UNREACHABLE, _E.SERVING): _S.HEALTHY,
    (_S.UNREACHABLE, _E.LOADING): _S.LOADING,
    (_S.UNREACHABLE, _E.FAILING): _S.UNREACHABLE,
    (_S.UNREACHABLE, _E.UNREACHABLE): _S.UNREACHABLE,
}


@dataclass(frozen=True)
class SlotsSeen:
    """The upstream's slots were read (a probe, or its agent's report): it serves.

    C{processing} is C{None} when the server does not say (then every busy
    slot is assumed to be ours); C{mark} is L{Upstream.probe_mark} taken
    just before the request whose answer gave C{processing}; C{models} and
    C{raw_slots} are C{None} when they were not read this time.
    """

    total: int
    processing: int | None
    mark: int
    source: str = "probe"
    models: tuple[str, ...] | None = None
    raw_slots: list[Any] | None = None
    method: str | None = None


@dataclass(frozen=True)
class LoadingSeen:
    """The upstream answered 503 "Loading model"."""

    source: str = "probe"


@dataclass(frozen=True)
class FailureSeen:
    """A request to the upstream failed with C{reason}.

    The upstream becomes unreachable once C{unreachable_after} failures
    came in a row: a probe passes ``--unhealthy-after``; a broken
    connection of a proxied request, or an agent saying "unreachable",
    passes 1.
    """

    reason: str
    unreachable_after: int = 1
    source: str = "probe"


Observation = SlotsSeen | LoadingSeen | FailureSeen


#: The last_error of an upstream that is loading its model.
LOADING_REASON = "Loading model"


class InvalidUpstreamURL(ValueError):
    """An upstream URL that is not ``http(s)://host[:port]``."""


def normalise_url(url: str) -> str:
    """Return C{url} as C{scheme://host:port} with no path, or raise L{InvalidUpstreamURL}."""
    if not isinstance(url, str) or not url:
        raise InvalidUpstreamURL("url must be a non-empty string")
    try:
        parts = urlsplit(url.strip())
    except ValueError as e:  # "Invalid IPv6 URL" and other unparsable forms
        raise InvalidUpstreamURL(f"url is not a valid URL ({e}): {url!r}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidUpstreamURL(f"url must start with http:// or https://, got {url!r}")
    if not parts.hostname:
        raise InvalidUpstreamURL(f"url has no host: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise InvalidUpstreamURL(f"url has a bad port: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidUpstreamURL(f"url must not have a path, query or fragment: {url!r}")
    host = parts.hostname
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidUpstreamURL(f"url has a host that is not a valid name: {url!r}")
    if ":" in host:
        host = f"[{host}]"
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}:{port}"


def upstream_id(url: str) -> str:
    """A stable identifier for the upstream at C{url} (idempotent registration)."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:12]


class Upstream:
    """A llama.cpp server: URL, name, health state, slots, model and counters."""

    log = Logger()

    def __init__(
        self,
        url: str,
        name: str | None = None,
        api_key: str | None = None,
        source: str = "static",
        clock: IReactorTime | None = None,
    ) -> None:
        self.url = normalise_url(url)
        self.id = upstream_id(self.url)
        self.name = name or urlsplit(self.url).netloc
        self.api_key = api_key
        self.source = source
        self._clock = clock
        self._state = UpstreamState.UNKNOWN
        self.draining = False
        self.drain_requested = False  # drained on request (API), not by expiry
        self.slots_total = 0
        self.external_processing = 0
        self.models: tuple[str, ...] = ()
        #: ``single`` (one model) or ``router`` (llama-server's router mode: it takes no
        #: request itself; each of its models is a child upstream with C{parent_id}).
        self.role = "single"
        #: For a router's child: the router's id, the model it serves and its state.
        self.parent_id: str | None = None
        self.router_model: str | None = None
        self.model_state: str | None = None
        self.exit_code = 0
        #: When C{model_state} last changed, and when a request of ours last started or ended here.
        self.model_since = clock.seconds() if clock is not None else 0.0
        self.last_used_at = self.model_since
        #: How long the last load of its model took, seen from loading to loaded (None: not seen).
        self.load_seconds: float | None = None
        #: A router whose ``/models/sse`` is followed now (L{paddler.fleet.router_events}).
        self.events_live = False
        #: A router's model that --model-placement never evicts (management API pin).
        self.pinned = False
        #: A router's model: its slot count the last time it was seen loaded (0: never).
        self.slots_when_loaded = 0
        #: For a router: C{max_instances} and C{models_autoload} from its /props.
        self.max_instances = 0
        self.autoload = True
        self.raw_slots: list[Any] = []
        self.probe_method = "slots"
        self.last_probe_at: float | None = None
        self.last_report_at: float | None = None
        self.last_error: str | None = None
        self.consecutive_failures = 0
        self.last_chosen = 0
        self.requests_served = 0
        self.requests_failed = 0
        #: kept-alive connections closed for bytes HTTP/1.1 does not allow there (docs/reliability.md)
        self.connections_dropped = 0
        self.added_at = clock.seconds() if clock is not None else 0.0
        self.state_since = self.added_at
        self._next_lease = 0
        self._leases: set[int] = set()
        # Leases whose client left while llama.cpp goes on with the request
        # (non-streaming), with the mark from which a probe sees that for itself.
        self._ghosts: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"<Upstream {self.name} {self.url} {self.state.value}>"

    # -- slots ------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests this balancer has sent and not yet finished (their clients still there)."""
        return len(self._leases) - len(self._ghosts)

    @property
    def slots_held(self) -> int:
        """Slots our requests hold, counting those still running for a client that left."""
        return len(self._leases)

    @property
    def slots_processing(self) -> int:
        return min(self.slots_total, self.external_processing + len(self._leases))

    @property
    def slots_idle(self) -> int:
        return self.slots_total - self.slots_processing

    @property
    def model(self) -> str | None:
        return self.models[0] if self.models else None

    def take_lease(self) -> int:
        """Count one of our requests as running here; return its lease number."""
        lease = self._next_lease
        self._next_lease += 1
        self._leases.add(lease)
        self._used()
        return lease

    def return_lease(self, lease: int) -> None:
        """Count the request with lease number C{lease} as finished (once)."""
        self._leases.remove(lease)
        self._used()

    def _used(self) -> None:
        if self._clock is not None:
            self.last_used_at = self._clock.seconds()

    def ghost_lease(self, lease: int) -> None:
        """
        The client of lease C{lease} left, but llama.cpp goes on with the
        request (it does not stop a non-streaming one): keep its slot counted
        as busy until a probe sent from now on reads the server's own figure.
        """
        self._next_lease += 1
        self._ghosts[lease] = self._next_lease

    def _settle_ghosts(self, mark: int | None) -> None:
        """Return the ghost leases a reading taken at C{mark} accounts for (all with C{None})."""
        for lease, seen_from in list(self._ghosts.items()):
            if mark is None or seen_from <= mark:
                del self._ghosts[lease]
                self._leases.discard(lease)

    def probe_mark(self) -> int:
        """Taken when a probe is sent: leases numbered below it predate the probe."""
        return self._next_lease

    def apply_slots(self, total: int, processing: int | None, mark: int) -> None:
        """
        Take an absolute slot report. C{processing} is C{None} when the server
        does not say (then every busy slot is assumed to be ours).
        """
        self.slots_total = max(0, int(total))
        if processing is None:
            self._settle_ghosts(None)  # the server does not say: count only what we know
            self.external_processing = 0
            return
        self._settle_ghosts(mark)
        ours_at_probe = sum(1 for lease in self._leases if lease < mark)
        self.external_processing = max(0, int(processing) - ours_at_probe)

    def serves(self, model: str) -> bool:
        return model in self.models

    # -- state ------------------------------------------------------------

    @property
    def accepts_requests(self) -> bool:
        if self.role == "router":
            return False  # its models' child upstreams take the requests
        if self.model_state is not None and self.model_state not in ("loaded", "sleeping"):
            # a router's model that is not loaded takes requests only when the router autoloads
            if self.model_state == "failed" or not self.autoload:
                return False
        return self.state is UpstreamState.HEALTHY and not self.draining

    @property
    def loaded(self) -> bool:
        """Serves its model now: a single-model server, or a router's loaded (or sleeping) model."""
        return self.model_state is None or self.model_state in ("loaded", "sleeping")

    @property
    def status(self) -> str:
        """What a person wants to see: draining, busy (no idle slot) or the state."""
        if self.draining:
            return "draining"
        if self.state is UpstreamState.HEALTHY and self.slots_total and not self.slots_idle:
            return "busy"
        return self.state.value

    @property
    def state(self) -> UpstreamState:
        """The health state; it changes only through L{record} (see L{TRANSITIONS})."""
        return self._state

    def record(self, observation: Observation, now: float) -> bool:
        """
        Take one observation: the slot figures it carries, the failure count,
        the time, and the state L{TRANSITIONS} gives. Return whether the state
        changed (logged once per change). L{paddler.fleet.pool.UpstreamPool.observe}
        calls it and tells everyone; nothing else should.
        """
        if isinstance(observation, SlotsSeen):
            event = Event.SERVING
            self.consecutive_failures = 0
            self.last_error = None
            self.apply_slots(observation.total, observation.processing, observation.mark)
            if observation.models is not None:
                self.set_models(observation.models)
            if observation.raw_slots is not None:
                self.raw_slots = observation.raw_slots
            if observation.method is not None:
                self.probe_method = observation.method
        elif isinstance(observation, LoadingSeen):
            event = Event.LOADING
            self.consecutive_failures = 0
            self.last_error = LOADING_REASON
        else:
            self.consecutive_failures += 1
            self.last_error = observation.reason
            enough = self.consecutive_failures >= observation.unreachable_after
            event = Event.UNREACHABLE if enough else Event.FAILING
            if enough:
                self._settle_ghosts(None)  # nothing runs for us on a server we cannot reach
        if observation.source == "agent":
            self.last_report_at = now
        elif observation.source == "probe" and not isinstance(observation, FailureSeen):
            self.last_probe_at = now
        return self._move(TRANSITIONS[self._state, event], now)

    def _move(self, state: UpstreamState, now: float) -> bool:
        if state is self._state:
            return False
        previous, self._state = self._state, state
        self.state_since = now
        self.log.info(
            "upstream {name} ({url}) {previous} -> {state}{reason}",
            name=self.name,
            url=self.url,
            previous=previous.value,
            state=state.value,
            reason=f": {self.last_error}" if self.last_error and state is not UpstreamState.HEALTHY else "",
            upstream_id=self.id,
        )
        return True

    def set_models(self, models: Iterable[str]) -> None:
        self.models = tuple(dict.fromkeys(m for m in models if m))

    def describe(self, now: float) -> dict[str, Any]:
        """Every field of this upstream, JSON-ready (management API, dashboard)."""
        return {
            "id": self.id,
            "name": self.name,
            "url": self.url,
            "source": self.source,
            "state": self.state.value,
            "status": self.status,
            "draining": self.draining,
            "slots_idle": self.slots_idle,
            "slots_processing": self.slots_processing,
            "slots_total": self.slots_total,
            "requests_in_flight": self.in_flight,
            "model": self.model,
            "models": list(self.models),
            "role": self.role,
            "parent_id": self.parent_id,
            "model_state": self.model_state,
            "load_seconds": self.load_seconds,
            "pinned": self.pinned,
            "probe_method": self.probe_method,
            "last_update_age": None
            if self.last_update_at is None
            else max(0.0, now - self.last_update_at),
            "last_error": self.last_error,
            "consecutive_failures": self.consecutive_failures,
            "requests_served": self.requests_served,
            "requests_failed": self.requests_failed,
            "connections_dropped": self.connections_dropped,
            "has_api_key": self.api_key is not None,
        }

    @property
    def last_update_at(self) -> float | None:
        times = [t for t in (self.last_probe_at, self.last_report_at) if t is not None]
        return max(times) if times else None
