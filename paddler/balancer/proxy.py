"""The reverse proxy: takes a slot, sends the request upstream, relays the answer, gives the slot back.

Retries: a refused or reset connection before any response byte, and a 503
to a slot-taking request, go to another upstream (at most
``--max-retries``); nothing is retried once a byte reached the client.
C{/health} is answered here for the whole fleet. C{/slots}, C{/slots/{id}}
and slot-taking requests that name an C{id_slot} address the slots of one
server: they go to the slot home (L{ProxyResource.slot_home}), the first
serving upstream in configuration order, so that the ids a client reads are
the ids it names (``--slots-endpoint-enable`` answers C{GET /slots} here
instead, with every upstream's slots as last probed). Every other path
goes to an upstream untouched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource

from paddler.balancer.relay import Relay, RelayedHead, UpstreamIdleTimeout, timings_in
from paddler.config import BalancerConfig
from paddler.errors import (
    BadRequest,
    InternalError,
    NoUpstreamAvailable,
    PaddlerHTTPError,
    ShuttingDown,
    UpstreamFailed,
    UpstreamTimeout,
    body_too_large,
    error_response,
    json_response as _json,
    outcome_of,
)
from paddler.fleet.models import ModelNotFound, fleet_models, is_multi_model, parse_model_aliases, resolve_model
from paddler.fleet.pool import Lease, UpstreamPool
from paddler.interfaces import IBoundedRequest, IUpstreamClient
from paddler.fleet.upstream import FailureSeen, LoadingSeen, Upstream
from paddler.llamacpp.endpoints import ENDPOINTS, SLOT_PATHS, addresses_slots
from paddler.llamacpp.errors import LOADING_MESSAGE, error_message
from paddler.observability.requests import RequestStats
from paddler.upstream.body import BodyTooLarge, read_body
from paddler.upstream.failures import describe_failure
from paddler.server.target import TargetRejected, origin_form
from paddler.turn_clock import TurnClock

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Request headers not forwarded besides the hop-by-hop ones: the body's length is set again,
#: and C{Expect: 100-continue} was answered by the balancer (the body is sent whole).
_NOT_FORWARDED = HOP_BY_HOP | {b"content-length", b"expect", b"host"}
#: What a client says about where a request came from: an upstream can trust only what paddler wrote.
#: C{Via} is not among them: every hop appends to it, and loop detection reads it (paddler.server.instance).
_FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"})

RETRYABLE = (ConnectError, ConnectionLost, ResponseNeverReceived, ResponseFailed)
#: Methods tried on another upstream after their request was written (nothing else is: the first
#: upstream may be running a completion that a second try would run again).
IDEMPOTENT = frozenset({b"GET", b"HEAD"})


class BodyLost(Exception):
    """The upstream's answer broke off before its first body byte: nothing reached the client."""


@dataclass
class ProxyConfig:
    """How the proxy talks to upstreams (see ``paddler balancer --help``); the defaults are the settings table's."""

    api_key: str | None = BalancerConfig.llamacpp_api_key
    lend_api_key: bool = BalancerConfig.lend_api_key
    rewrite_host_header: bool = BalancerConfig.rewrite_host_header
    slots_endpoint_enable: bool = BalancerConfig.slots_endpoint_enable
    upstream_timeout: float = BalancerConfig.upstream_timeout
    idle_timeout: float = BalancerConfig.idle_timeout
    max_request_body: int = BalancerConfig.max_request_body
    max_retries: int = BalancerConfig.max_retries
    relay_passthrough: bool = BalancerConfig.relay_passthrough
    #: "replace": the client's X-Forwarded-*/Forwarded/X-Real-IP are dropped; "append": kept, extended
    forwarded_headers: str = BalancerConfig.forwarded_headers
    #: ``--model-alias NAME=TARGET``: a request naming NAME is for TARGET.
    model_aliases: Mapping[str, str] = field(default_factory=dict)
    #: ``--default-model``: the model of a request that names none (multi-model fleets).
    default_model: str | None = BalancerConfig.default_model

    @classmethod
    def from_balancer(cls, config: BalancerConfig) -> ProxyConfig:
        """The proxy's part of a L{paddler.config.BalancerConfig}."""
        return cls(
            api_key=config.llamacpp_api_key,
            lend_api_key=config.lend_api_key,
            rewrite_host_header=config.rewrite_host_header,
            slots_endpoint_enable=config.slots_endpoint_enable,
            upstream_timeout=config.upstream_timeout,
            idle_timeout=config.idle_timeout,
            max_request_body=config.max_request_body,
            max_retries=config.max_retries,
            relay_passthrough=config.relay_passthrough,
            forwarded_headers=config.forwarded_headers,
            model_aliases=_model_aliases(config.model_alias),
            default_model=config.default_model,
        )


def _model_aliases(text: str | None) -> dict[str, str]:
    """``--model-alias fast=alpha,big=gamma`` as a mapping (empty without it)."""
    return parse_model_aliases(text.split(",")) if text else {}


def _client_gone(request: server.Request) -> bool:
    """Whether the client's connection closed (L{paddler.server.request.BoundedRequest} flags it)."""
    return (IBoundedRequest.providedBy(request) and request.client_gone) or request.channel is None


def _was_cancelled(error: Exception) -> bool:
    """Twisted's HTTP client reports a cancelled request as ResponseNeverReceived([CancelledError])."""
    reasons = error.reasons if isinstance(error, (ResponseNeverReceived, ResponseFailed)) else []
    return any(reason.check(CancelledError) for reason in reasons)


def parse_body(body: bytes) -> dict[str, Any]:
    """A slot-taking request's body as a JSON object, or L{BadRequest}."""
    try:
        parsed = json.loads(body)
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise BadRequest("request body must be a JSON object")
    return parsed


def _names_a_slot(parsed: dict[str, Any]) -> bool:
    """Whether a slot-taking request asks for one slot by id (C{id_slot} >= 0; -1 is any slot)."""
    slot = parsed.get("id_slot")
    return isinstance(slot, int) and not isinstance(slot, bool) and slot >= 0


def request_model(parsed: dict[str, Any], field: str = "model") -> str | None:
    """The model a request names in C{field}, if it names one."""
    model = parsed.get(field)
    return model if isinstance(model, str) and model else None


class Exchange:
    """One client request on its way through the proxy: what it asked for and how far it got.

    @ivar stage: C{"buffered"} until a slot is granted, then C{"upstream"}.
    @ivar client_gone: the client's connection closed before the answer ended.
    """

    __slots__ = (
        "request", "body", "started", "takes_slot", "model", "streaming", "demand",
        "stage", "client_gone", "recorded", "pinned", "routers_only",
    )

    def __init__(self, request: server.Request, body: bytes, started: float) -> None:
        self.request = request
        self.body = body
        self.started = started
        self.takes_slot = False
        self.model: str | None = None
        self.streaming = False
        self.demand: Any = None
        self.stage = "buffered"
        self.client_gone = False
        self.recorded = False
        #: it names one server's slots (C{/slots...}, C{id_slot}): only the slot home serves it
        self.pinned = False
        #: it manages a model the fleet does not list (router-mode paths): only a router serves it
        self.routers_only = False

    @property
    def path(self) -> str:
        return self.request.path.decode("latin-1")

    def forget_body(self) -> None:
        """The answer began: the request will not be sent again, its body can go."""
        self.body = b""


class ProxyResource(Resource):
    """Every path of the proxy port: C{/health}, C{/slots}, and the rest proxied."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        pool: UpstreamPool,
        client: IUpstreamClient,
        clock: IReactorTime,
        config: ProxyConfig,
        stats: RequestStats | None = None,
    ) -> None:
        super().__init__()
        self._pool = pool
        #: the L{IUpstreamClient} requests go out with
        self._client = client
        self._clock = clock
        #: the relays' per-chunk time (the idle deadline), read once per reactor turn
        self._turn_clock = TurnClock(clock)
        self.config = config
        self.stats = stats or RequestStats(clock)
        self.stopping = False
        self.active: set[server.Request] = set()
        self._drained: list[Deferred[None]] = []

    # -- shutting down ----------------------------------------------------

    def stop_accepting(self) -> None:
        """Answer new requests with 503 and retry nothing from now on; running ones go on."""
        self.stopping = True

    def drained(self) -> Deferred[None]:
        """Fires when no proxied request is running any more."""
        d: Deferred[None] = Deferred()
        if self.active:
            self._drained.append(d)
        else:
            d.callback(None)
        return d

    def abort_active(self) -> int:
        """Cut every running request's client connection (the upstream requests are cancelled); return how many."""
        cut = 0
        for request in list(self.active):
            transport: Any = request.channel.transport if request.channel is not None else None
            if transport is not None:
                transport.abortConnection()
                cut += 1
        return cut

    def _track(self, request: server.Request) -> None:
        self.active.add(request)

        def untrack(result: object) -> None:
            self.active.discard(request)
            if not self.active:
                waiting, self._drained = self._drained, []
                for d in waiting:
                    d.callback(None)

        request.notifyFinish().addBoth(untrack)

    # -- requests ---------------------------------------------------------

    def render(self, request: server.Request) -> Any:
        request.defaultContentType = None
        started = self._clock.seconds()
        path = request.path
        if path == b"/health":
            if self.stopping:
                return self._shutting_down(request, started)
            status, payload = self._pool.health()
            return _json(request, status, payload)
        if path == b"/slots" and request.method == b"GET" and self.config.slots_endpoint_enable:
            return self._render_slots(request)
        if self.stopping:
            return self._shutting_down(request, started)
        if path in (b"/v1/models", b"/models") and request.method in (b"GET", b"HEAD") and not request.args:
            # with a query (``?reload=1``: a router rescans its models) the router answers itself
            if is_multi_model(self._pool.upstreams.values()):
                self.stats.record(200, 0.0, path=path.decode("latin-1"))
                return _json(request, 200, fleet_models(self._pool.upstreams.values(), int(self._clock.seconds())))
        content: Any = request.content
        content.seek(0)
        exchange = Exchange(request, content.read(), started)
        exchange.pinned = addresses_slots(path)
        try:
            if IBoundedRequest.providedBy(request) and request.body_too_large:
                raise body_too_large(self.config.max_request_body, "--max-request-body")
            if request.method == b"POST" and path in SLOT_PATHS:
                parsed = parse_body(exchange.body)
                exchange.takes_slot = True
                self._route_model(exchange, parsed, ENDPOINTS[path.decode("ascii")].model_field)
                exchange.streaming = parsed.get("stream") is True
                exchange.demand = self._pool.chooser.prepare(parsed, path, request.requestHeaders)
                exchange.pinned = _names_a_slot(parsed)
            elif is_multi_model(self._pool.upstreams.values()):
                self._route_other(exchange)
        except PaddlerHTTPError as error:
            self.stats.record(error.status, 0.0, path=exchange.path)
            return error_response(request, error)
        self._track(request)
        d = ensureDeferred(self._forward(exchange))

        def client_left(reason: Failure) -> None:
            exchange.client_gone = True
            d.cancel()

        request.notifyFinish().addErrback(client_left)
        d.addErrback(self._failed, exchange)
        return server.NOT_DONE_YET

    def _route_model(self, exchange: Exchange, parsed: dict[str, Any], field: str = "model") -> None:
        """The model a slot-taking request is for (its C{field}, aliases and the default
        applied); the body is rewritten when that is not the name it gave. Raises
        ModelNotFound / ModelRequired."""
        given = request_model(parsed, field)
        model = resolve_model(
            self._pool.upstreams.values(), given, self.config.model_aliases, self.config.default_model
        )
        if model is not None and model != given:
            parsed[field] = model
            exchange.body = json.dumps(parsed).encode("utf-8")
        exchange.model = model

    def _route_other(self, exchange: Exchange) -> None:
        """A request that takes no slot, in a multi-model fleet: the model of its ``?model=``
        (or its JSON body's ``model``) picks the upstream; none is fine (the router answers)."""
        request = exchange.request
        given: str | None = None
        values = (request.args or {}).get(b"model")
        if values:
            given = values[0].decode("utf-8", "replace") or None
        elif exchange.body and request.method == b"POST":
            try:
                parsed = json.loads(exchange.body)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                given = request_model(parsed)
        if given is None:
            return
        try:
            exchange.model = resolve_model(self._pool.upstreams.values(), given, self.config.model_aliases)
        except ModelNotFound:
            if request.path not in ROUTER_MANAGEMENT_PATHS:
                raise
            # a model the fleet does not list yet (POST /models downloads one, DELETE /models removes
            # one): a router decides
            exchange.routers_only = True

    def _shutting_down(self, request: server.Request, started: float) -> bytes:
        error = ShuttingDown(
            "the balancer is shutting down; retry on another balancer or after its restart",
            headers={b"retry-after": b"1", b"connection": b"close"},
        )
        if request.channel is not None:
            request.channel.persistent = False  # type: ignore[attr-defined]
        self.stats.record(
            error.status,
            self._clock.seconds() - started,
            path=request.path.decode("latin-1"),
            outcome=("refused", error.reason),
        )
        return error_response(request, error)

    def slot_home(self) -> Upstream | None:
        """The upstream whose slots C{/slots}, C{/slots/{id}} and C{id_slot} address: the first
        serving one in configuration order (the same one for every such request while it serves)."""
        for upstream in self._pool.upstreams.values():
            if upstream.accepts_requests:
                return upstream
        return None

    def _render_slots(self, request: server.Request) -> bytes:
        """C{GET /slots} with --slots-endpoint-enable: every upstream's slots as last probed, tagged."""
        slots = []
        for upstream in self._pool.upstreams.values():
            for slot in upstream.raw_slots:
                tagged = dict(slot) if isinstance(slot, dict) else {"slot": slot}
                tagged.update(upstream=upstream.name, upstream_id=upstream.id, upstream_url=upstream.url)
                slots.append(tagged)
        return _json(request, 200, slots)

    async def _forward(self, exchange: Exchange) -> None:
        """Take a slot (or pick an upstream), send, relay; try another upstream while nothing reached the client."""
        tried: list[str] = []
        last_error = "no upstream answered"
        only_refused = True
        request = exchange.request
        for _ in range(self.config.max_retries + 1):
            if tried and (exchange.pinned or not any(uid not in tried for uid in self._pool.upstreams)):
                break  # a slot id means one server: no other is tried
            lease: Lease | None = None
            home = self.slot_home() if exchange.pinned else None
            if exchange.pinned and home is None:
                raise NoUpstreamAvailable("no healthy upstream")
            if exchange.takes_slot:
                exchange.stage = "buffered"
                exclude = tried if home is None else [uid for uid in self._pool.upstreams if uid != home.id]
                lease = await self._pool.acquire(exchange.model, exclude=exclude, demand=exchange.demand)
                upstream = lease.upstream
            else:
                picked = home or self._pool.pick_any(
                    exclude=tried, model=exchange.model, routers_only=exchange.routers_only
                )
                if picked is None:
                    if tried:
                        break
                    raise self._pool.no_healthy_upstream_error()
                upstream = picked
            exchange.stage = "upstream"
            timings = None
            reached = False  # the request went out to the upstream (it may be running there)
            try:
                try:
                    response = await self._send(upstream, request, exchange.body)
                except RETRYABLE as e:
                    reached = isinstance(e, (ResponseNeverReceived, ResponseFailed))
                    raise
                reached = True
                if response.code == 503 and exchange.takes_slot and not exchange.pinned:
                    reason = await self._refused(upstream, response)
                    tried.append(upstream.id)
                    last_error = f"{upstream.name} answered 503: {reason}"
                    continue
                if response.code == 500 and exchange.takes_slot and upstream.parent_id is not None:
                    # a router's model that failed to load for this request: another copy may serve it
                    reason = await self._refused(upstream, response)
                    if reason.endswith(" failed to load"):
                        upstream.model_state = "failed"
                        self._pool.notify("changed", upstream)
                        tried.append(upstream.id)
                        last_error = f"{upstream.name} answered 500: {reason}"
                        continue
                    raise UpstreamFailed(f"{upstream.name} answered 500: {reason}")
                timings = await self._relay(exchange, response, upstream)
                return
            except (*RETRYABLE, BodyLost) as e:
                if exchange.client_gone or _was_cancelled(e):
                    raise CancelledError() from e
                if self.stopping:
                    raise ShuttingDown("the balancer is shutting down", headers={b"retry-after": b"1"}) from e
                only_refused = False
                reason = str(e) if isinstance(e, BodyLost) else describe_failure(Failure(e))
                self._upstream_failed(upstream, reason)
                tried.append(upstream.id)
                last_error = f"{upstream.name}: {reason}"
                if reached and request.method not in IDEMPOTENT:
                    # written: the upstream may have started it, a second try could run it twice
                    raise UpstreamFailed(
                        f"{last_error} (the request had been sent to it, so it is not tried elsewhere)"
                    ) from None
            except UpstreamTimeout:  # no headers, or no body byte, in time
                self.stats.upstream_failed(upstream)
                raise
            finally:
                if lease is not None:
                    # A client that left a non-streaming request does not stop llama.cpp.
                    running = exchange.client_gone and reached and not exchange.streaming
                    lease.release(timings, still_running=running)
        if tried and only_refused:
            raise NoUpstreamAvailable(
                f"every upstream tried is unavailable; last: {last_error}", headers={b"retry-after": b"1"}
            )
        raise UpstreamFailed(f"every upstream tried failed; last: {last_error}")

    def connection_dropped(self, origin: bytes, what: str) -> None:
        """The upstream client closed a connection to C{origin} for unexpected bytes: count it, warn."""
        url = origin.decode("ascii", "replace")
        for upstream in self._pool.upstreams.values():
            if upstream.url.rstrip("/") == url:
                upstream.connections_dropped += 1
                name = upstream.name
                break
        else:
            name = url
        self.log.warn(
            "upstream {name}: kept-alive connection dropped ({what}); "
            "its next requests get new connections (docs/reliability.md)",
            name=name,
            what=what,
        )

    def _upstream_failed(self, upstream: Upstream, reason: str) -> None:
        self.stats.upstream_failed(upstream)
        self._pool.observe(upstream, FailureSeen(reason, source="proxy"))

    async def _refused(self, upstream: Upstream, response: IResponse) -> str:
        """An upstream answered 503 before any byte reached the client: note why."""
        d = read_body(response, 64 * 1024)
        d.addTimeout(self.config.idle_timeout, self._clock)
        try:
            raw = await d
        except (BodyTooLarge, DeferredTimeout):
            return "503 with an unreadable body"
        reason = error_message(raw)
        if reason == LOADING_MESSAGE:
            self._pool.observe(upstream, LoadingSeen(source="proxy"))
        return reason

    def _upstream_headers(self, request: server.Request, upstream: Upstream) -> list[tuple[bytes, bytes]]:
        """The client's end-to-end headers, X-Forwarded-*, Host, and the upstream's key if lent (--lend-api-key)."""
        raw = request.requestHeaders
        connection = raw.getRawHeaders(b"connection")
        skip: Any = _NOT_FORWARDED
        if connection:
            # hop-by-hop: Connection and every header it names (RFC 9110 7.6.1)
            skip = _NOT_FORWARDED | {t.strip().lower() for v in connection for t in v.split(b",")}
        append = self.config.forwarded_headers == "append"
        headers: list[tuple[bytes, bytes]] = []
        forwarded_for: Sequence[bytes] = ()
        claimed: dict[bytes, Sequence[bytes]] = {}  # the client's X-Forwarded-Proto/-Host, Forwarded, X-Real-IP
        host: bytes | None = None
        has_authorization = False
        for name, values in raw.getAllRawHeaders():
            lower = name.lower()
            if lower in skip or lower.startswith(b"proxy-"):
                if lower == b"host":
                    host = values[-1]
                continue
            if lower in _FORWARDING:
                if not append:
                    continue  # replace: not passed on as if paddler had written them
                if lower == b"x-forwarded-for":
                    forwarded_for = values
                else:
                    claimed[lower] = values
                continue
            if lower in (b"authorization", b"x-api-key"):
                has_authorization = True
            for value in values:
                headers.append((name, value))
        client_host = getattr(request.getClientAddress(), "host", None)
        if client_host:
            headers.append((b"X-Forwarded-For", b", ".join([*forwarded_for, client_host.encode("ascii")])))
        elif forwarded_for:
            headers.extend((b"X-Forwarded-For", value) for value in forwarded_for)
        # append: what the trusted proxy in front said about the original request wins
        headers.extend((b"Forwarded", value) for value in claimed.get(b"forwarded", ()))
        headers.extend((b"X-Real-IP", value) for value in claimed.get(b"x-real-ip", ())[-1:])
        proto = claimed.get(b"x-forwarded-proto", ())
        headers.append((b"X-Forwarded-Proto", proto[-1] if proto else b"https" if request.isSecure() else b"http"))
        forwarded_host = claimed.get(b"x-forwarded-host", ())
        if forwarded_host:
            headers.append((b"X-Forwarded-Host", forwarded_host[-1]))
        elif host:
            headers.append((b"X-Forwarded-Host", host))
        if self.config.rewrite_host_header or not host:
            host = upstream.url.split("://", 1)[1].encode("ascii")
        headers.append((b"Host", host))
        # the probes' key is lent to key-less clients only when the operator says so
        key = upstream.api_key or self.config.api_key
        if key and not has_authorization and self.config.lend_api_key:
            headers.append((b"Authorization", b"Bearer " + key.encode("utf-8")))
        return headers

    async def _send(self, upstream: Upstream, request: server.Request, body: bytes) -> Any:
        method = request.method
        try:
            target = origin_form(request.uri)  # a BoundedRequest's is already; a plain Request's may not be
        except TargetRejected as e:
            raise BadRequest(e.message) from None
        d = self._client.send(
            method,
            upstream.url.encode("ascii"),
            target,
            self._upstream_headers(request, upstream),
            body if body or method in (b"POST", b"PUT", b"PATCH") else None,
        )
        timeout = self.config.upstream_timeout

        def timed_out(result: Any, _timeout: float) -> Any:
            raise UpstreamTimeout(
                f"{upstream.name} sent no response within {timeout:g} s (--upstream-timeout)"
            )

        d.addTimeout(timeout, self._clock, onTimeoutCancel=timed_out)
        try:
            return await d
        except ConnectingCancelledError as e:  # cancelled (client gone) while still connecting
            raise CancelledError() from e

    async def _relay(self, exchange: Exchange, response: Any, upstream: Upstream) -> Any:
        """Relay the answer; return llama.cpp's C{timings} from its end, if any."""
        request = exchange.request
        framing = response.framing
        head = _response_head(response)
        body = response.take_body()
        if body is not None:
            # the whole (small) answer came with its head: write it, no relay needed
            first_byte_at = self._clock.seconds()
            head.apply(request)
            if not _client_gone(request):
                request.write(body)
            self._record(exchange, response.code, upstream=upstream, first_byte_at=first_byte_at)
            if not request.finished and not _client_gone(request):
                request.finish()
            return timings_in(response.tail())
        # the request body is needed again only if this answer breaks before its first byte
        relay = Relay(request, self._clock, self.config.idle_timeout, head, exchange.forget_body,
                      self._turn_clock.seconds)
        raw = (
            self.config.relay_passthrough
            and framing in ("chunked", "length")
            and request.clientproto == b"HTTP/1.1"
            and request.method != b"HEAD"
        )
        # an event stream that takes no slot (/models/sse) may say nothing for long: its client
        # needs the head now; a generation's stream keeps its head until its first byte (a 502
        # instead of a broken stream when the upstream fails before it)
        relay.start(response, raw, head_now=not exchange.takes_slot and _is_event_stream(response.headers))
        try:
            await relay.done
        except UpstreamIdleTimeout as e:
            if relay.first_byte_at is None:
                raise UpstreamTimeout(f"{upstream.name}: {e} before the body began") from None
            self.log.warn(
                "upstream {name}: {error}; closing the client stream", name=upstream.name, error=str(e)
            )
            self._record(exchange, 504, relay, upstream, ("timed_out", "upstream_idle"))
            request.loseConnection()
            return None
        except CancelledError:
            raise
        except Exception as e:
            if exchange.client_gone:
                raise CancelledError() from e
            reason = describe_failure(Failure(e))
            if relay.first_byte_at is None:
                raise BodyLost(f"the answer broke off before its body began ({reason})") from e
            self.log.warn(
                "upstream {name} broke off its answer: {error}", name=upstream.name, error=reason
            )
            self._record(exchange, 502, relay, upstream)
            request.loseConnection()
            return None
        self._record(exchange, response.code, relay, upstream)
        if not request.finished and not _client_gone(request):
            request.finish()
        return timings_in(relay.tail())

    def _record(
        self,
        exchange: Exchange,
        status: int,
        relay: Relay | None = None,
        upstream: Upstream | None = None,
        outcome: tuple[str, str] | None = None,
        first_byte_at: float | None = None,
    ) -> None:
        if exchange.recorded:
            return
        exchange.recorded = True
        first = first_byte_at if relay is None else relay.first_byte_at
        self.stats.record(
            status,
            self._clock.seconds() - exchange.started,
            None if first is None else first - exchange.started,
            upstream,
            exchange.path,
            outcome,
        )

    def _failed(self, failure: Failure, exchange: Exchange) -> None:
        request = exchange.request
        if exchange.client_gone or failure.check(CancelledError):
            # Whatever the cancelled upstream request failed with (a DNS lookup
            # cut short, a connection aborted), the client leaving caused it.
            self._record(exchange, 0, outcome=("cancelled", exchange.stage))
            return
        if isinstance(failure.value, PaddlerHTTPError):
            error = failure.value
        else:
            self.log.failure("proxying {path} failed", failure, path=request.path)
            error = InternalError("internal error in the balancer")
        self._record(exchange, error.status, outcome=outcome_of(error))
        if request.finished or _client_gone(request):
            return
        if request.startedWriting:
            request.loseConnection()
            return
        request.responseHeaders = Headers()
        request.write(error_response(request, error))
        request.finish()


#: Response headers not relayed: hop-by-hop ones, and the length of a chunked answer (RFC 9112 6.3).
_NOT_RELAYED = HOP_BY_HOP
_NOT_RELAYED_CHUNKED = HOP_BY_HOP | {b"content-length"}


#: llama-server router-mode paths that manage models: their ``model`` may be one the fleet does
#: not list (being downloaded, removed, or in a models directory not rescanned yet).
ROUTER_MANAGEMENT_PATHS = frozenset({b"/models", b"/models/load", b"/models/unload"})


def _is_event_stream(headers: Any) -> bool:
    """Whether an answer's Content-Type is C{text/event-stream}."""
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


def _response_head(response: Any) -> RelayedHead:
    """The status and end-to-end headers of an upstream answer, values of one name grouped."""
    drop = _NOT_RELAYED_CHUNKED if response.framing == "chunked" else _NOT_RELAYED
    grouped: dict[bytes, tuple[bytes, list[bytes]]] = {}
    for name, value in response.headers:
        lower = name.lower()
        if lower in drop:
            continue
        entry = grouped.get(lower)
        if entry is None:
            grouped[lower] = (name, [value])
        else:
            entry[1].append(value)
    return RelayedHead(response.code, response.phrase, list(grouped.values()))
