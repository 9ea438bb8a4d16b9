"""A small Redis client on Twisted: one pipelined command connection (and one
pub/sub connection) that reconnect with capped backoff, with a deadline on
every command and an injected reactor and clock.

Why not txredisapi: it imports the global reactor at import time and uses it
for its timers (no injected clock, so no deterministic tests), and during an
outage its commands neither fail nor time out (they wait for the reconnection;
a first connect to a dead port never errbacks). Every caller would have to add
its own deadline and up/down tracking on top anyway; doing it here, on
Twisted's own ``ClientService``, costs ~400 lines and no dependency.
Measured figures are in docs/shared-state.md.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    TimeoutError,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from paddler.sharedstate.errors import StoreTimeout, StoreUnavailable
from paddler.sharedstate.resp import (
    RedisConnectionLost,
    NoScriptError,
    RedisError,
    RedisProtocol,
    Reply,
    SubscriberProtocol,
)

#: Environment variable holding the Redis password when the URL has none (the
#: C{state_password} setting of L{paddler.config.BalancerConfig} reads it).
PASSWORD_ENV = "PADDLER_STATE_PASSWORD"
DEFAULT_PORT = 6379


class InvalidStateURL(ValueError):
    """A ``--state`` URL that is not ``redis://`` or ``rediss://`` with a host, port and db."""


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is and how to log in, parsed from a ``redis://`` URL."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_certs: str | None = None
    verify: bool = True

    def display(self) -> str:
        """The address without the password, for logs."""
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"


def parse_state_url(url: str, password: str | None = None) -> RedisAddress:
    """
    Parse C{redis://[[user]:password@]host[:port][/db]} or C{rediss://...}
    (TLS; query C{ssl_ca_certs=PATH} for a private CA, C{ssl_cert_reqs=none}
    to skip verification). The password comes from the URL, else from
    C{password} (the C{--state} password setting, C{PADDLER_STATE_PASSWORD}).
    """
    if not isinstance(url, str) or len(url) > 2048:
        raise InvalidStateURL("the state URL must be a string of at most 2048 characters")
    try:
        parts = urlsplit(url.strip())
    except ValueError as e:  # "Invalid IPv6 URL"...
        raise InvalidStateURL(f"the state URL is not a valid URL ({e})") from None
    if parts.scheme not in ("redis", "rediss"):
        raise InvalidStateURL(f"the state URL must start with redis:// or rediss://, got {url!r}")
    if not parts.hostname:
        raise InvalidStateURL("the state URL has no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise InvalidStateURL("the state URL has a bad port")
    path = parts.path.strip("/")
    if not path:
        db = 0
    elif path.isdigit() and len(path) <= 5:
        db = int(path)
    else:
        raise InvalidStateURL(f"the state URL's path must be a database number, got {parts.path!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"ssl_ca_certs", "ssl_cert_reqs"}
    if unknown:
        raise InvalidStateURL(f"unknown state URL options: {', '.join(sorted(unknown))}")
    tls = parts.scheme == "rediss"
    if not tls and query:
        raise InvalidStateURL("ssl_* options need a rediss:// URL")
    ca_certs = query.get("ssl_ca_certs", [None])[-1]
    reqs = query.get("ssl_cert_reqs", ["required"])[-1].lower()
    if reqs not in ("required", "none"):
        raise InvalidStateURL("ssl_cert_reqs must be 'required' or 'none'")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else (password or None)
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=db,
        username=username or None,
        password=password,
        tls=tls,
        ca_certs=ca_certs,
        verify=reqs == "required",
    )


def endpoint_for(reactor: Any, address: RedisAddress, connect_timeout: float) -> IStreamClientEndpoint:
    """A client endpoint for C{address}: TCP, or TLS wrapped around it for C{rediss://}."""
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    tcp = HostnameEndpoint(reactor, address.host.encode("idna"), address.port, timeout=connect_timeout)
    if not address.tls:
        return tcp
    from twisted.internet import ssl

    options: Any
    if not address.verify:
        options = ssl.CertificateOptions(verify=False)
    else:
        trust = None
        if address.ca_certs:
            with open(address.ca_certs, "rb") as pem:
                trust = ssl.Certificate.loadPEM(pem.read())
        options = ssl.optionsForClientTLS(address.host, trustRoot=trust)
    return wrapClientTLS(options, tcp)


def _first_error(failure: Failure) -> Failure:
    """The failure inside a L{FirstError} of C{gatherResults}."""
    if failure.check(FirstError):
        return failure.value.subFailure  # type: ignore[union-attr,no-any-return]
    return failure


class LinkState(enum.Enum):
    """Whether Redis answers: not known yet, answering, or not."""

    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """Tells the client when a connection attempt fails (ClientService only retries)."""

    def __init__(self, endpoint: IStreamClientEndpoint, on_failure: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._on_failure = on_failure

    def connect(self, factory: Any) -> Deferred[Any]:
        attempt = self._endpoint.connect(factory)

        def failed(failure: Failure) -> Failure:
            if not failure.check(CancelledError):
                self._on_failure(failure)
            return failure

        return attempt.addErrback(failed)


class _ProtocolFactory(Factory):
    noisy = False

    def __init__(self, make: Callable[[], RedisProtocol]) -> None:
        self._make = make

    def buildProtocol(self, addr: Any) -> RedisProtocol:
        return self._make()


class Script:
    """A Lua script known by its SHA1; loaded with SCRIPT LOAD, re-loaded on NOSCRIPT."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"<Script {self.name} {self.sha[:8]}>"


class _Link(Service):
    """What the command and the pub/sub connection share: reconnection, state, logs."""

    log = Logger()
    kind = "commands"

    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        clock: IReactorTime | None = None,
        endpoint: IStreamClientEndpoint | None = None,
        connect_timeout: float = 2.0,
        command_timeout: float = 0.25,
        max_backoff: float = 2.0,
        initial_backoff: float = 0.05,
        max_timeouts: int = 3,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.address = address
        self.command_timeout = command_timeout
        self.max_timeouts = max_timeouts
        self.state = LinkState.CONNECTING
        self.last_error: str | None = None
        self.changed_at = self.clock.seconds()
        self._listeners: list[Callable[[LinkState], None]] = []
        self._protocol: RedisProtocol | None = None
        self._timeouts_in_a_row = 0
        if endpoint is None:
            endpoint = endpoint_for(reactor, address, connect_timeout)
        self._service = ClientService(
            _WatchedEndpoint(endpoint, self._attempt_failed),
            _ProtocolFactory(self._build),
            retryPolicy=backoffPolicy(
                initialDelay=initial_backoff,
                maxDelay=max_backoff,
                factor=2.0,
                jitter=lambda: random.random() * max_backoff / 10,  # the default adds up to 1 s
            ),
            clock=self.clock,
        )
        self._ready: list[Deferred[RedisProtocol]] = []

    # -- lifetime ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._service.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        waiting, self._ready = self._ready, []
        for waiter in waiting:
            waiter.errback(StoreUnavailable("the shared state client is stopping"))
        return self._service.stopService()

    def subscribe_state(self, listener: Callable[[LinkState], None]) -> Callable[[], None]:
        """Call C{listener(state)} on every change of state; return an unsubscriber."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    @property
    def is_up(self) -> bool:
        return self.state is LinkState.UP

    def _set_state(self, state: LinkState, error: str | None = None) -> None:
        if error is not None:
            self.last_error = error
        if state is self.state:
            return
        previous, self.state = self.state, state
        self.changed_at = self.clock.seconds()
        if state is LinkState.UP:
            self.log.info(
                "shared state {kind} connection to {address} up", kind=self.kind, address=self.address.display()
            )
        else:
            self.log.warn(
                "shared state {kind} connection to {address} {state} (was {previous}): {error}",
                kind=self.kind,
                address=self.address.display(),
                state=state.value,
                previous=previous.value,
                error=self.last_error,
            )
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                self.log.failure("shared state listener failed")

    # -- connections ------------------------------------------------------

    def _build(self) -> RedisProtocol:
        protocol = self.protocol_class()
        protocol.on_lost = self._lost
        protocol.on_made = self._made
        return protocol

    protocol_class: type[RedisProtocol] = RedisProtocol

    def _attempt_failed(self, failure: Failure) -> None:
        self._set_state(LinkState.DOWN, failure.getErrorMessage() or getattr(failure.type, "__name__", "error"))

    def _lost(self, protocol: RedisProtocol, reason: Failure) -> None:
        if protocol is self._protocol:
            self._protocol = None
            if self.running:
                self._set_state(LinkState.DOWN, "connection lost: " + (reason.getErrorMessage() or "closed"))

    def _made(self, protocol: RedisProtocol) -> None:
        """
        A TCP (or TLS) connection is there: log in, select the db, load the
        scripts, and only then call the link up. This is not ClientService's
        C{prepareConnection}: a connection closed after a failed preparation
        (or a stop during one) trips its state machine (NoTransition).
        """
        steps: list[Deferred[Reply]] = []
        if self.address.password is not None:
            if self.address.username:
                steps.append(protocol.send("AUTH", self.address.username, self.address.password))
            else:
                steps.append(protocol.send("AUTH", self.address.password))
        steps.extend(self._setup_commands(protocol))
        ready: Deferred[Any] = gatherResults(steps, consumeErrors=True) if steps else succeed([])
        ready.addTimeout(max(self.command_timeout, 1.0) * 4, self.clock)

        def done(_: Any) -> None:
            if not protocol.connected_ or not self.running:
                return
            self._protocol = protocol
            self._timeouts_in_a_row = 0
            self._set_state(LinkState.UP)
            waiting, self._ready = self._ready, []
            for waiter in waiting:
                waiter.callback(protocol)
            self._connected(protocol)

        def failed(failure: Failure) -> None:
            error = _first_error(failure).value
            if self._protocol is None and self.running:
                self._set_state(LinkState.DOWN, f"setting up the connection failed: {error}")
            if protocol.connected_ and protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]

        ready.addCallbacks(done, failed)

    def _wait_ready(self) -> Deferred[RedisProtocol]:
        def cancel(waiter: Deferred[RedisProtocol]) -> None:
            if waiter in self._ready:
                self._ready.remove(waiter)

        waiter: Deferred[RedisProtocol] = Deferred(cancel)
        self._ready.append(waiter)
        return waiter

    def _setup_commands(self, protocol: RedisProtocol) -> list[Deferred[Reply]]:
        return []

    def _connected(self, protocol: RedisProtocol) -> None:
        pass

    # -- commands ---------------------------------------------------------

    def _send(self, args: Sequence[Any], timeout: float | None) -> Deferred[Reply]:
        """Send on the live connection, or wait for one within the deadline; never while down."""
        timeout = self.command_timeout if timeout is None else timeout
        if self.state is LinkState.DOWN or not self.running:
            return fail(
                StoreUnavailable(
                    f"shared state store {self.address.display()} is down: {self.last_error}"
                )
            )
        protocol = self._protocol
        if protocol is not None and protocol.connected_:
            result = protocol.send(*args)
        else:
            result = self._wait_ready().addCallback(lambda ready: ready.send(*args))
        command = str(args[0]) if args else "?"

        def timed_out(failure: Failure) -> Failure:
            if failure.check(TimeoutError):
                self._timed_out(protocol)
                raise StoreTimeout(
                    f"Redis did not answer {command} within {timeout * 1000:.0f} ms"
                )
            if failure.check(RedisConnectionLost):
                raise StoreUnavailable(str(failure.value))
            return failure

        def answered(reply: Reply) -> Reply:
            self._timeouts_in_a_row = 0
            return reply

        result.addTimeout(timeout, self.clock)
        return result.addCallbacks(answered, timed_out)

    def _timed_out(self, protocol: RedisProtocol | None) -> None:
        if protocol is None or protocol is not self._protocol:
            return
        self._timeouts_in_a_row += 1
        if self._timeouts_in_a_row >= self.max_timeouts:
            self._timeouts_in_a_row = 0
            self.log.warn(
                "Redis at {address} missed {count} deadlines in a row; reconnecting",
                address=self.address.display(),
                count=self.max_timeouts,
            )
            self._set_state(LinkState.DOWN, f"{self.max_timeouts} commands in a row timed out")
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]


class RedisClient(_Link):
    """
    Commands to one Redis over one pipelined connection. Every command has a
    deadline (C{timeout}, default C{command_timeout}) and fails with
    L{StoreTimeout} when it passes, or at once with L{StoreUnavailable} while
    the link is down; it never waits for a reconnection beyond its deadline.
    """

    kind = "commands"

    def __init__(self, reactor: Any, address: RedisAddress, scripts: Iterable[Script] = (), **kwargs: Any) -> None:
        super().__init__(reactor, address, **kwargs)
        self.scripts: dict[str, Script] = {script.sha: script for script in scripts}
        self.script_reloads = 0

    def _setup_commands(self, protocol: RedisProtocol) -> list[Deferred[Reply]]:
        steps = []
        if self.address.db:
            steps.append(protocol.send("SELECT", self.address.db))
        for script in self.scripts.values():
            steps.append(protocol.send("SCRIPT", "LOAD", script.source))
        return steps

    def execute(self, *args: Any, timeout: float | None = None) -> Deferred[Reply]:
        """Run one command; the Deferred fires with its reply, L{RedisError}, L{StoreTimeout} or L{StoreUnavailable}."""
        return self._send(args, timeout)

    def evalsha(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], timeout: float | None = None
    ) -> Deferred[Reply]:
        """
        Run C{script} by SHA; on NOSCRIPT (Redis restarted, failed over or
        SCRIPT FLUSH) load it and run it once more, all within one deadline.
        A NOSCRIPT reply means the script did not run, so the retry is safe.
        """
        timeout = self.command_timeout if timeout is None else timeout
        started = self.clock.seconds()
        self.scripts.setdefault(script.sha, script)
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)

        def reload(failure: Failure) -> Deferred[Reply]:
            failure.trap(NoScriptError)
            self.script_reloads += 1
            self.log.info("Redis lost script {name}; loading it again", name=script.name)
            left = max(0.001, timeout - (self.clock.seconds() - started))
            loaded = self._send(("SCRIPT", "LOAD", script.source), left)
            rerun = self._send(command, left)  # pipelined right behind the load
            both = gatherResults([loaded, rerun], consumeErrors=True)
            return both.addCallbacks(lambda results: results[1], _first_error)

        return self._send(command, timeout).addErrback(reload)


class RedisSubscriber(_Link):
    """
    A pub/sub connection: C{subscribe(channel, callback)} calls
    C{callback(data)} for each message. Channels are subscribed again after
    every reconnection, and C{on_connected} listeners are told (messages
    published while disconnected are lost: pub/sub is at most once).
    """

    kind = "pub/sub"
    protocol_class = SubscriberProtocol

    def __init__(self, reactor: Any, address: RedisAddress, **kwargs: Any) -> None:
        super().__init__(reactor, address, **kwargs)
        self._channels: dict[bytes, Callable[[bytes], None]] = {}
        self._connected_listeners: list[Callable[[], None]] = []

    def _build(self) -> RedisProtocol:
        protocol = super()._build()
        assert isinstance(protocol, SubscriberProtocol)
        protocol.on_message = self._message
        return protocol

    def _setup_commands(self, protocol: RedisProtocol) -> list[Deferred[Reply]]:
        return [protocol.send("SUBSCRIBE", channel) for channel in self._channels]

    def _connected(self, protocol: RedisProtocol) -> None:
        for listener in list(self._connected_listeners):
            try:
                listener()
            except Exception:
                self.log.failure("pub/sub reconnection listener failed")

    def on_connected(self, listener: Callable[[], None]) -> None:
        """Call C{listener()} after each (re)connection, once subscribed."""
        self._connected_listeners.append(listener)

    def _message(self, channel: bytes, data: bytes) -> None:
        callback = self._channels.get(channel)
        if callback is not None:
            callback(data)

    def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> Deferred[Any]:
        """Receive C{channel}'s messages from now on (and after every reconnection)."""
        key = channel.encode("utf-8")
        self._channels[key] = callback
        protocol = self._protocol
        if protocol is not None and protocol.connected_:
            return self._send(("SUBSCRIBE", key), None)
        return succeed(None)  # subscribed when the connection is made

    def unsubscribe(self, channel: str) -> Deferred[Any]:
        key = channel.encode("utf-8")
        self._channels.pop(key, None)
        protocol = self._protocol
        if protocol is not None and protocol.connected_:
            return self._send(("UNSUBSCRIBE", key), None)
        return succeed(None)

    def ping(self, timeout: float | None = None) -> Deferred[Reply]:
        """A PING on the pub/sub connection (answered ``[pong, ""]``)."""
        return self._send(("PING",), timeout)


__all__ = [
    "InvalidStateURL",
    "LinkState",
    "RedisAddress",
    "RedisClient",
    "RedisError",
    "RedisSubscriber",
    "Script",
    "endpoint_for",
    "parse_state_url",
    "PASSWORD_ENV",
]
