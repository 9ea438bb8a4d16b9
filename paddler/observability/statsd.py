"""StatsD (to Graphite) over Twisted's UDP transport.

txstatsd does not install on Python 3, and a StatsD client is small: lines
such as C{paddler.slots_idle:3|g} batched into datagrams of at most 512
bytes, sent from one UDP socket with C{transport.write(datagram, (ip,
port))}. UDP never waits for the server, and every send error is counted and
logged at most once a minute, so a StatsD server that is down never slows or
breaks the balancer.

A host name is resolved once at start with C{reactor.resolve} (which does not
block the reactor; IPv4 only); give an IPv6 address literally.
Names are listed in C{docs/observability.md}.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import abstract
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from paddler.fleet.models import fleet_models, is_multi_model
from paddler.fleet.pool import UpstreamPool
from paddler.observability.requests import RequestStats

#: The largest datagram sent: safe on every network path (StatsD's advice).
MAX_DATAGRAM = 512
#: Lines kept while waiting for a flush; more are dropped (and counted).
MAX_PENDING_LINES = 20_000
#: Timer samples kept per reporting interval; beyond that the oldest are dropped.
MAX_TIMERS_PER_INTERVAL = 2_000
#: Seconds between two log lines about failing sends.
ERROR_LOG_INTERVAL = 60.0

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def graphite_name(name: str) -> str:
    """C{name} as one Graphite path component: dots, spaces, slashes... become C{_}."""
    return _UNSAFE.sub("_", name) or "_"


def graphite_prefix(prefix: str) -> str:
    """C{prefix} with each dot-separated component made safe (empty ones dropped)."""
    return ".".join(graphite_name(part) for part in prefix.split(".") if part)


def format_number(value: float) -> str:
    """A StatsD value: whole numbers without a point, others with up to 3 decimals."""
    if float(value).is_integer():
        return str(int(value))
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def pack_datagrams(lines: list[bytes], limit: int = MAX_DATAGRAM) -> list[bytes]:
    """Join lines with newlines into datagrams of at most C{limit} bytes (a longer line goes alone)."""
    datagrams: list[bytes] = []
    current = b""
    for line in lines:
        if current and len(current) + 1 + len(line) > limit:
            datagrams.append(current)
            current = b""
        current = current + b"\n" + line if current else line
    if current:
        datagrams.append(current)
    return datagrams


class _QuietDatagramProtocol(DatagramProtocol):
    noisy = False

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """Nothing is expected back from a StatsD server."""


class StatsDClient:
    """
    Buffers StatsD lines and sends them in datagrams on L{flush}. Lines given
    before L{start} has resolved the host, or while it failed to, are dropped.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        prefix: str = "paddler",
        max_datagram: int = MAX_DATAGRAM,
        max_pending: int = MAX_PENDING_LINES,
        error_log_interval: float = ERROR_LOG_INTERVAL,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.prefix = graphite_prefix(prefix)
        self.max_datagram = max_datagram
        self.max_pending = max_pending
        self.error_log_interval = error_log_interval
        self.address: tuple[str, int] | None = None
        self.sent = 0
        self.dropped = 0
        self._lines: list[bytes] = []
        self._udp: Any = None
        self._stopped = False
        self._last_error_log = float("-inf")
        self._errors_since_log = 0

    # -- lifetime ---------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Resolve the host (without blocking) and open the UDP socket; never fails."""
        self._stopped = False
        d: Deferred[Any]
        if abstract.isIPAddress(self.host) or abstract.isIPv6Address(self.host):
            d = succeed(self.host)
        else:
            d = self.reactor.resolve(self.host)
            d.addErrback(self._unresolved)
        d.addCallback(self._open)
        d.addErrback(self._cannot_open)
        return d

    def _open(self, ip: str | None) -> None:
        if ip is None or self._stopped or self._udp is not None:
            return
        interface = "::" if abstract.isIPv6Address(ip) else "0.0.0.0"
        self._udp = self.reactor.listenUDP(0, _QuietDatagramProtocol(), interface=interface)
        self.address = (ip, self.port)
        self.log.info(
            "sending StatsD metrics {prefix}.* to {ip}:{port}",
            prefix=self.prefix,
            ip=ip,
            port=self.port,
        )

    def _unresolved(self, failure: Failure) -> None:
        self.log.warn(
            "StatsD host {host} does not resolve ({error}); StatsD metrics are off",
            host=self.host,
            error=failure.getErrorMessage(),
        )
        return None

    def _cannot_open(self, failure: Failure) -> None:
        self.log.warn(
            "cannot open a UDP socket for StatsD ({error}); StatsD metrics are off",
            error=failure.getErrorMessage(),
        )

    def stop(self) -> Deferred[None]:
        """Close the UDP socket (pending lines are dropped)."""
        self._stopped = True
        self.address = None
        self._lines = []
        udp, self._udp = self._udp, None
        if udp is None:
            return succeed(None)
        return _maybe(udp.stopListening())

    # -- lines ------------------------------------------------------------

    def _add(self, name: str, value: str, kind: str) -> None:
        if self.address is None:
            return
        if len(self._lines) >= self.max_pending:
            self.dropped += 1
            return
        self._lines.append(f"{self.prefix}.{name}:{value}|{kind}".encode("ascii"))

    def gauge(self, name: str, value: float) -> None:
        """A gauge (C{|g}); negative values are sent as 0 (a sign would mean a delta)."""
        self._add(name, format_number(max(0.0, value)), "g")

    def increment(self, name: str, count: int = 1) -> None:
        """A counter (C{|c})."""
        self._add(name, format_number(count), "c")

    def timing(self, name: str, milliseconds: float) -> None:
        """A timer in milliseconds (C{|ms})."""
        self._add(name, format_number(max(0.0, milliseconds)), "ms")

    def flush(self) -> int:
        """Send every buffered line; return how many datagrams went out."""
        lines, self._lines = self._lines, []
        if self._udp is None or self.address is None or not lines:
            return 0
        sent = 0
        for datagram in pack_datagrams(lines, self.max_datagram):
            try:
                self._udp.write(datagram, self.address)
            except Exception as e:  # ENOBUFS, EWOULDBLOCK, network unreachable...
                self.dropped += datagram.count(b"\n") + 1
                self._send_failed(e)
            else:
                sent += 1
        self.sent += sent
        return sent

    def _send_failed(self, error: Exception) -> None:
        self._errors_since_log += 1
        now = self.reactor.seconds()
        if now - self._last_error_log < self.error_log_interval:
            return
        self.log.warn(
            "cannot send StatsD metrics to {ip}:{port}: {error} ({count} failed sends since the last warning)",
            ip=self.address[0] if self.address else self.host,
            port=self.port,
            error=str(error) or type(error).__name__,
            count=self._errors_since_log,
        )
        self._last_error_log = now
        self._errors_since_log = 0


def _maybe(result: Any) -> Deferred[None]:
    if isinstance(result, Deferred):
        return result.addCallback(lambda _: None)
    return succeed(None)


class StatsDService(Service):
    """
    Every C{interval} seconds: gauges of the fleet and of each upstream, the
    counters of the requests that finished since the last report and their
    timers, then one flush. The job logs its own errors and goes on.
    """

    log = Logger()

    def __init__(
        self,
        client: StatsDClient,
        pool: UpstreamPool,
        stats: RequestStats,
        clock: IReactorTime,
        interval: float = 1.0,
    ) -> None:
        self.client = client
        self.pool = pool
        self.stats = stats
        self.clock = clock
        self.interval = interval
        self._counters: dict[str, int] = {}
        self._timers: deque[tuple[str, float]] = deque(maxlen=MAX_TIMERS_PER_INTERVAL)
        self._reported_upstreams: set[str] = set()
        self._reported_models: set[str] = set()
        self._loop = LoopingCall(self._report)
        self._loop.clock = clock
        self._unsubscribe: Callable[[], None] | None = None

    def startService(self) -> None:
        super().startService()
        self.client.start()
        self._unsubscribe = self.stats.subscribe(self.record)
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: self.log.failure("StatsD reporting stopped", f)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._report()  # the last interval's counters and timers are not lost
        return self.client.stop()

    def _count(self, name: str) -> None:
        self._counters[name] = self._counters.get(name, 0) + 1

    def record(self, record: dict[str, Any]) -> None:
        """Count one finished request (a L{RequestStats} record) for the next report."""
        status = record["status"]
        error = status >= 500
        self._count("requests.total")
        if status:  # a client that left is counted under requests.cancelled.<stage> (a branch, not a leaf)
            self._count(f"requests.{status // 100}xx")
        outcome = record.get("outcome")
        if outcome is not None:
            kind, reason = outcome
            self._count(f"requests.{kind}.{graphite_name(reason)}")
        if error:
            self._count("errors")
        if record.get("upstream"):
            name = "upstream." + graphite_name(record["upstream"])
            self._count(name + ".requests")
            if error:
                self._count(name + ".errors")
        if record.get("ttfb") is not None:
            self._timers.append(("time_to_first_token", record["ttfb"] * 1000.0))
        self._timers.append(("request_duration", record["duration"] * 1000.0))

    def _report(self) -> None:
        try:
            self.report()
        except Exception:
            self.log.failure("StatsD report failed; trying again next time")

    def _report_models(self, client: Any) -> None:
        """With router-mode upstreams: ``model.NAME.requests_buffered``, ``.slots_idle``, ``.slots_busy``."""
        upstreams = list(self.pool.upstreams.values())
        reported: set[str] = set()
        if is_multi_model(upstreams):
            buffered = self.pool.buffered_by_model()
            figures: dict[str, list[int]] = {m["id"]: [0, 0] for m in fleet_models(upstreams, 0)["data"]}
            for upstream in upstreams:
                if upstream.role == "router" or not upstream.accepts_requests or not upstream.loaded:
                    continue
                model = upstream.router_model or upstream.model or ""
                if model in figures:
                    figures[model][0] += upstream.slots_idle
                    figures[model][1] += upstream.slots_processing
            for model, (idle, busy) in sorted(figures.items()):
                name = "model." + graphite_name(model)
                reported.add(name)
                client.gauge(name + ".requests_buffered", buffered.get(model, 0))
                client.gauge(name + ".slots_idle", idle)
                client.gauge(name + ".slots_busy", busy)
        for name in sorted(self._reported_models - reported):
            for gauge in ("requests_buffered", "slots_idle", "slots_busy"):
                client.gauge(f"{name}.{gauge}", 0)
        self._reported_models = reported

    def report(self) -> None:
        """Queue every gauge, counter and timer and send them."""
        client = self.client
        totals = self.pool.totals()
        client.gauge("slots_idle", totals["slots_idle"])
        client.gauge("slots_processing", totals["slots_processing"])
        client.gauge("slots_total", totals["slots_total"])
        client.gauge("requests_buffered", totals["requests_buffered"])
        client.gauge("buffer_capacity", self.pool.max_buffered)
        client.gauge("requests_in_flight", totals["requests_in_flight"])
        client.gauge("upstreams_healthy", totals["upstreams"]["healthy"])
        client.gauge("upstreams_total", totals["upstreams"]["total"])
        reported = set()
        for upstream in sorted(self.pool.upstreams.values(), key=lambda u: (u.name, u.url)):
            name = "upstream." + graphite_name(upstream.name)
            reported.add(name)
            client.gauge(name + ".slots_idle", upstream.slots_idle)
            client.gauge(name + ".slots_processing", upstream.slots_processing)
            client.gauge(name + ".slots_total", upstream.slots_total)
            client.gauge(name + ".requests_in_flight", upstream.in_flight)
            client.gauge(name + ".healthy", 1 if upstream.accepts_requests else 0)
            routing = self.pool.chooser.describe(upstream)
            if routing:
                client.gauge(name + ".prompt_tokens_per_second", routing["prompt_tokens_per_second"])
                client.gauge(name + ".generation_tokens_per_second", routing["generation_tokens_per_second"])
                client.gauge(name + ".prefix_hits", routing["prefix_hits"])
                client.gauge(name + ".prompt_tokens_saved", routing["tokens_saved"])
        self._report_models(client)
        # An upstream that left: its gauges go to zero once, instead of staying at their last value in Graphite.
        for name in sorted(self._reported_upstreams - reported):
            for gauge in ("slots_idle", "slots_processing", "slots_total", "requests_in_flight", "healthy"):
                client.gauge(f"{name}.{gauge}", 0)
        self._reported_upstreams = reported
        counters, self._counters = self._counters, {}
        for counter, count in sorted(counters.items()):
            client.increment(counter, count)
        timers = list(self._timers)
        self._timers.clear()
        for timer, milliseconds in timers:
            client.timing(timer, milliseconds)
        client.flush()
