"""Health and slot probes: one ``LoopingCall`` per upstream, each probe with a deadline.

Probe methods, per upstream:

- ``slots`` (default): ``GET /slots``. A server answering 501 (started with
  ``--no-slots``) or 404 falls back to ``props``.
- ``props``: ``GET /props`` for ``total_slots`` and ``GET /metrics`` for
  ``llamacpp:requests_processing`` where metrics are on; else our own count.
- ``health`` (``--probe-mode health``): ``GET /health`` plus ``GET /props``.
  Neither wakes a server started with ``--sleep-idle-seconds`` (``/slots``
  does), at the price of not seeing other clients' requests.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    ensureDeferred,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from paddler.web.body import read_body
from paddler.interfaces import IUpstreamProber
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import Upstream, UpstreamState

PROBE_MODES = ("slots", "health")


class ProbeError(Exception):
    """A probe answer that says the upstream cannot serve."""


class Loading(Exception):
    """The server answered 503 "Loading model"."""


_Loading = Loading


def _error_message(body: bytes) -> str:
    try:
        parsed = json.loads(body)
        return str(parsed["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


def count_processing(slots: list[Any]) -> int:
    """Busy slots in a C{/slots} answer: ``is_processing`` (new) or ``state`` 0/1 (old)."""
    busy = 0
    for slot in slots:
        if not isinstance(slot, dict):
            raise ProbeError("/slots entries must be objects")
        if "is_processing" in slot:
            busy += bool(slot["is_processing"])
        elif "state" in slot:
            busy += slot["state"] != 0
        else:
            raise ProbeError("/slots entry has neither is_processing nor state")
    return busy


def parse_metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                return float(line.rsplit(None, 1)[1])
            except (IndexError, ValueError):
                return None
    return None


# -- reading a llama.cpp server's slots, shared by probes and the agent -----

#: C{get(path)} -> C{(status, body)}; raises L{Loading} on 503 "Loading model".
Getter = Callable[[str], Awaitable[tuple[int, bytes]]]


def http_getter(http_client: Any, base_url: str, api_key: str | None = None) -> Getter:
    """A L{Getter} for the llama.cpp server at C{base_url} (C{http_client} is a treq C{HTTPClient})."""
    headers = {b"authorization": [b"Bearer " + api_key.encode("utf-8")]} if api_key else {}

    async def get(path: str) -> tuple[int, bytes]:
        response = await http_client.get(base_url + path, headers=headers)
        body = await read_body(response)
        if response.code == 503 and _error_message(body) == "Loading model":
            raise Loading()
        return response.code, body

    return get


@dataclass
class SlotReading:
    """One look at a server's slots.

    C{processing} is C{None} when the server does not say; C{models} is
    C{None} when they were not read this time; C{method} is how the slots
    were read (``slots`` or, after a 404/501 on C{/slots}, ``props``);
    C{mark} is what C{mark()} returned just before the request whose answer
    gave C{processing} was sent.
    """

    total: int
    processing: int | None
    method: str
    models: tuple[str, ...] | None = None
    raw_slots: list[Any] | None = None
    mark: int = 0


def _require_ok(path: str, code: int, body: bytes) -> None:
    if code != 200:
        raise ProbeError(f"{path} answered {code}: {_error_message(body)}")


async def _read_props(get: Getter) -> tuple[int, tuple[str, ...]]:
    code, body = await get("/props")
    _require_ok("/props", code, body)
    try:
        props = json.loads(body)
        total = int(props["total_slots"])
    except (ValueError, KeyError, TypeError):
        raise ProbeError("/props has no total_slots")
    models = (str(props.get("model_alias") or ""), str(props.get("model_path") or ""))
    return total, models


async def _read_models(get: Getter) -> tuple[str, ...] | None:
    """The model names from C{/props}, else C{/v1/models}; never fatal."""
    try:
        _, models = await _read_props(get)
        return models
    except (ProbeError, Loading):
        pass
    code, body = await get("/v1/models")
    if code != 200:
        return None
    try:
        data = json.loads(body)["data"]
        names: list[str] = []
        for entry in data:
            names.append(str(entry["id"]))
            names.extend(str(alias) for alias in entry.get("aliases", []))
    except (ValueError, KeyError, TypeError):
        return None
    return tuple(names)


async def read_slots(
    get: Getter,
    method: str = "slots",
    mode: str = "slots",
    want_models: bool = True,
    mark: Callable[[], int] = lambda: 0,
) -> SlotReading:
    """
    Read the slots of the server behind C{get}: C{/slots}, falling back to
    C{/props} + C{/metrics} on 404/501 (or directly when C{method} is
    ``props``); in C{mode} ``health``, C{/health} + C{/props}. Raises
    L{Loading} or L{ProbeError}.
    """
    if mode == "health":
        taken = mark()
        code, body = await get("/health")
        _require_ok("/health", code, body)
        total, models = await _read_props(get)
        return SlotReading(total, None, "health", models, mark=taken)
    if method != "props":
        taken = mark()
        code, body = await get("/slots")
        if code not in (404, 501):
            _require_ok("/slots", code, body)
            try:
                slots = json.loads(body)
            except ValueError:
                raise ProbeError("/slots answered invalid JSON")
            if not isinstance(slots, list):
                raise ProbeError("/slots answer is not a list")
            busy = count_processing(slots)
            names = await _read_models(get) if want_models else None
            return SlotReading(len(slots), busy, "slots", names, slots, taken)
    taken = mark()
    total, models = await _read_props(get)
    code, body = await get("/metrics")
    processing: int | None = None
    if code == 200:
        value = parse_metric(body.decode("utf-8", "replace"), "llamacpp:requests_processing")
        processing = None if value is None else int(value)
    return SlotReading(total, processing, "props", models, mark=taken)


@implementer(IUpstreamProber)
class HTTPProber:
    """Probes one upstream over HTTP with C{http_client} (a treq C{HTTPClient})."""

    log = Logger()

    def __init__(
        self,
        http_client: Any,
        clock: IReactorTime,
        pool: UpstreamPool,
        timeout: float = 2.0,
        unhealthy_after: int = 2,
        mode: str = "slots",
        api_key: str | None = None,
    ) -> None:
        self._http = http_client
        self._clock = clock
        self._pool = pool
        self.timeout = timeout
        self.unhealthy_after = unhealthy_after
        self.mode = mode
        self.api_key = api_key

    def probe(self, upstream: Upstream) -> Deferred[None]:
        d = ensureDeferred(self._probe(upstream))
        d.addTimeout(self.timeout, self._clock, onTimeoutCancel=_timed_out)
        d.addCallbacks(lambda _: self._succeeded(upstream), lambda f: self._failed(upstream, f))
        return d

    async def _probe(self, upstream: Upstream) -> None:
        get = http_getter(self._http, upstream.url, upstream.api_key or self.api_key)
        reading = await read_slots(
            get,
            method=upstream.probe_method,
            mode=self.mode,
            want_models=not upstream.models,
            mark=upstream.probe_mark,
        )
        if self.mode == "health":
            upstream.probe_method = "health"
        elif reading.method == "props" and upstream.probe_method != "props":
            upstream.probe_method = "props"
            self.log.info(
                "upstream {name}: /slots not available, probing /props and /metrics instead",
                name=upstream.name,
            )
        if reading.models is not None:
            upstream.set_models(reading.models)
        if reading.raw_slots is not None:
            upstream.raw_slots = reading.raw_slots
        upstream.apply_slots(reading.total, reading.processing, reading.mark)

    def _succeeded(self, upstream: Upstream) -> None:
        upstream.last_probe_at = self._clock.seconds()
        upstream.consecutive_failures = 0
        upstream.set_state(UpstreamState.HEALTHY)
        self._pool.notify("changed", upstream)
        self._pool.capacity_changed()

    def _failed(self, upstream: Upstream, failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # the probe service stopped it (upstream removed, balancer stopping)
        if failure.check(_Loading):
            upstream.last_probe_at = self._clock.seconds()
            upstream.consecutive_failures = 0
            upstream.set_state(UpstreamState.LOADING, "Loading model")
            self._pool.notify("changed", upstream)
            return
        upstream.consecutive_failures += 1
        error = describe_failure(failure, self.timeout)
        if upstream.consecutive_failures >= self.unhealthy_after:
            upstream.set_state(UpstreamState.UNREACHABLE, error)
        else:
            upstream.last_error = error
        self._pool.notify("changed", upstream)


def _timed_out(result: object, timeout: float) -> None:
    """addTimeout fired: whatever the cancelled HTTP client failed with (ResponseNeverReceived([CancelledError]), ConnectingCancelledError), it is a timeout."""
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    raise DeferredTimeout(f"no answer within {timeout:g} s")


def describe_failure(failure: Failure, timeout: float | None = None) -> str:
    """A short human reason for a failed request to an upstream."""
    from twisted.internet.defer import CancelledError, TimeoutError as DeferredTimeout
    from twisted.internet.error import ConnectionRefusedError, TimeoutError as ConnectTimeout

    if failure.check(DeferredTimeout, CancelledError, ConnectTimeout):
        return f"no answer within {timeout:g} s" if timeout else "timed out"
    if failure.check(ConnectionRefusedError):
        return "connection refused"
    if failure.check(ProbeError):
        return str(failure.value)
    name = type(failure.value).__name__
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return f"{name}: {reasons[0].getErrorMessage()}"
    return f"{name}: {failure.getErrorMessage()}"


class ProbeService(Service):
    """Runs one probe loop per probed upstream; loops come and go with the pool."""

    log = Logger()

    def __init__(
        self, pool: UpstreamPool, prober: IUpstreamProber, clock: IReactorTime, interval: float = 1.0
    ) -> None:
        self._pool = pool
        self._prober = prober
        self._clock = clock
        self.interval = interval
        self._loops: dict[str, LoopingCall] = {}
        self._in_flight: dict[str, Deferred[None]] = {}
        self._unsubscribe: Any = None

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self._pool.subscribe(self._on_pool_event)
        for upstream in list(self._pool.upstreams.values()):
            self._start(upstream)

    def _on_pool_event(self, event: str, upstream: Upstream | None) -> None:
        if upstream is None:
            return
        if event == "added":
            self._start(upstream)
        elif event == "removed":
            self._stop(upstream.id)

    def _start(self, upstream: Upstream) -> None:
        if upstream.source == "agent" or upstream.id in self._loops:
            return
        loop = LoopingCall(self._probe_once, upstream)
        loop.clock = self._clock
        self._loops[upstream.id] = loop
        loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("probe loop for {name} died", f, name=upstream.name)
        )

    def _probe_once(self, upstream: Upstream) -> Deferred[None]:
        d = maybeDeferred(self._prober.probe, upstream)
        self._in_flight[upstream.id] = d

        def done(result: object) -> None:
            if self._in_flight.get(upstream.id) is d:
                del self._in_flight[upstream.id]
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.log.failure("probe of {name} failed unexpectedly", result, name=upstream.name)

        d.addBoth(done)
        return d

    def probe_now(self, upstream: Upstream) -> Deferred[None]:
        """
        Probe C{upstream} at once, or join the probe of it already running.
        The result fires with C{None} when that probe is done; cancelling it
        (a client that stopped waiting) leaves the probe alone.
        """
        running = self._in_flight.get(upstream.id)
        if running is None:
            running = self._probe_once(upstream)
        done: Deferred[None] = Deferred()

        def finished(result: object) -> object:
            if not done.called:
                done.callback(None)
            return result

        running.addBoth(finished)
        return done

    def _stop(self, upstream_id: str) -> Deferred[Any]:
        loop = self._loops.pop(upstream_id, None)
        if loop is not None and loop.running:
            loop.stop()
        in_flight = self._in_flight.pop(upstream_id, None)
        if in_flight is not None:
            in_flight.cancel()
            return in_flight
        return succeed(None)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        return DeferredList([self._stop(uid) for uid in set(self._loops) | set(self._in_flight)])
