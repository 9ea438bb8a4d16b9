"""StatsD: names, types and datagrams received by a real UDP listener; a dead server is harmless."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.usage import UsageError

from paddler.config import ConfigError, build_config, parse_statsd_address
from paddler.observability.requests import RequestStats
from paddler.observability.statsd import (
    MAX_DATAGRAM,
    StatsDClient,
    StatsDService,
    format_number,
    graphite_name,
    graphite_prefix,
    pack_datagrams,
)
from paddler.tap import Options

from .helpers import healthy_upstream, make_pool, mark_unreachable

DEADLINE = 5.0


@pytest.fixture
def caplog_twisted():  # type: ignore[no-untyped-def]
    """Every Twisted log event emitted during the test."""
    events: list[dict] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


class Receiver(DatagramProtocol):
    """A StatsD server stand-in: collects datagrams and fires when C{expected} lines came."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.waiting: list[tuple[int, Deferred[None]]] = []

    @property
    def lines(self) -> list[str]:
        return [line for d in self.datagrams for line in d.decode("ascii").split("\n")]

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.datagrams.append(datagram)
        self._check()

    def _check(self) -> None:
        for entry in list(self.waiting):
            count, d = entry
            if len(self.lines) >= count:
                self.waiting.remove(entry)
                d.callback(None)

    def until(self, count: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiting.append((count, d))
        self._check()
        return d.addTimeout(DEADLINE, global_reactor)


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    """A UDP listener on 127.0.0.1 (a random port), closed afterwards."""
    protocol = Receiver()
    port = global_reactor.listenUDP(0, protocol, interface="127.0.0.1")
    protocol.port = port.getHost().port  # type: ignore[attr-defined]
    yield protocol
    pytest_twisted.blockon(port.stopListening())


def fleet_with_requests(clock: Clock):  # type: ignore[no-untyped-def]
    pool = make_pool(clock)
    stats = RequestStats(clock)
    a = healthy_upstream("http://10.0.0.1:8080", total=4, processing=1)
    a.name = "gpu-1.example.com"
    b = healthy_upstream("http://10.0.0.2:8080", total=2)
    b.name = "big box/2"
    mark_unreachable(b, "refused")
    pool.add(a)
    pool.add(b)
    return pool, stats


def record_requests(stats: RequestStats, pool: Any) -> None:
    """Two served requests on gpu-1, one 502 on big box/2, one 429 from the balancer."""
    stats.record(200, 1.5, ttfb=0.25, upstream=pool.find("gpu-1.example.com"))
    stats.record(200, 0.5, ttfb=0.125, upstream=pool.find("gpu-1.example.com"))
    stats.record(502, 0.01, upstream=pool.find("big box/2"))
    stats.record(429, 0.002)


EXPECTED = {
    "paddler.slots_idle:3|g",
    "paddler.slots_processing:1|g",
    "paddler.slots_total:4|g",
    "paddler.requests_buffered:0|g",
    "paddler.buffer_capacity:30|g",
    "paddler.requests_in_flight:0|g",
    "paddler.upstreams_healthy:1|g",
    "paddler.upstreams_total:2|g",
    "paddler.upstream.gpu-1_example_com.slots_idle:3|g",
    "paddler.upstream.gpu-1_example_com.slots_processing:1|g",
    "paddler.upstream.gpu-1_example_com.slots_total:4|g",
    "paddler.upstream.gpu-1_example_com.requests_in_flight:0|g",
    "paddler.upstream.gpu-1_example_com.healthy:1|g",
    "paddler.upstream.big_box_2.slots_idle:2|g",
    "paddler.upstream.big_box_2.slots_processing:0|g",
    "paddler.upstream.big_box_2.slots_total:2|g",
    "paddler.upstream.big_box_2.requests_in_flight:0|g",
    "paddler.upstream.big_box_2.healthy:0|g",
    "paddler.requests.total:4|c",
    "paddler.requests.2xx:2|c",
    "paddler.requests.4xx:1|c",
    "paddler.requests.5xx:1|c",
    "paddler.errors:1|c",
    "paddler.upstream.gpu-1_example_com.requests:2|c",
    "paddler.upstream.big_box_2.requests:1|c",
    "paddler.upstream.big_box_2.errors:1|c",
    "paddler.time_to_first_token:250|ms",
    "paddler.time_to_first_token:125|ms",
    "paddler.request_duration:1500|ms",
    "paddler.request_duration:500|ms",
    "paddler.request_duration:10|ms",
    "paddler.request_duration:2|ms",
}


@pytest_twisted.ensureDeferred
async def test_a_udp_listener_receives_every_gauge_counter_and_timer(receiver: Receiver) -> None:
    """One report sends the fleet gauges (the original's names and more), per-upstream gauges
    with Graphite-safe names, request/error counters by status class and TTFT/duration timers,
    with exactly these names and types."""
    clock = Clock()
    client = StatsDClient(global_reactor, "127.0.0.1", receiver.port, "paddler")
    pool, stats = fleet_with_requests(clock)
    service = StatsDService(client, pool, stats, clock, interval=1.0)
    service.startService()
    try:
        record_requests(stats, pool)
        assert receiver.datagrams == []
        clock.advance(1.0)
        await receiver.until(len(EXPECTED))
        assert sorted(receiver.lines) == sorted(EXPECTED)
        assert all(len(d) <= MAX_DATAGRAM for d in receiver.datagrams)

        # The next report has the gauges again but no counters or timers.
        receiver.datagrams.clear()
        clock.advance(1.0)
        await receiver.until(18)
        assert all(line.endswith("|g") for line in receiver.lines)
        assert len(receiver.lines) == 18  # the fleet and per-upstream gauges, no counter or timer
    finally:
        await service.stopService()
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_prefix_with_dots_is_kept_as_a_path(receiver: Receiver) -> None:
    """--statsd-prefix prod.paddler puts the metrics under prod.paddler.*."""
    client = StatsDClient(global_reactor, "127.0.0.1", receiver.port, "prod.paddler")
    await client.start()
    client.gauge("slots_idle", 2)
    client.flush()
    await receiver.until(1)
    assert receiver.lines == ["prod.paddler.slots_idle:2|g"]
    await client.stop()


@pytest_twisted.ensureDeferred
async def test_a_statsd_server_that_is_down_breaks_nothing() -> None:
    """Sending to a port where nothing listens raises nothing, logs no error and the
    reports go on."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    clock = Clock()
    pool, stats = fleet_with_requests(clock)
    client = StatsDClient(global_reactor, "127.0.0.1", dead_port)
    service = StatsDService(client, pool, stats, clock, interval=1.0)
    service.startService()
    try:
        for _ in range(5):
            record_requests(stats, pool)
            clock.advance(1.0)
            # let the reactor see any ICMP error in between
            d: Deferred[None] = Deferred()
            global_reactor.callLater(0.01, d.callback, None)
            await d
        assert client.sent >= 5  # at least one datagram per report
    finally:
        await service.stopService()


class FailingUDP:
    """A UDP port whose every write fails like a full send buffer."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, datagram: bytes, addr: Any) -> None:
        self.writes += 1
        raise OSError(errno.ENOBUFS, "No buffer space available")

    def stopListening(self) -> None:
        pass


def test_send_errors_are_counted_and_logged_at_most_once_a_minute(caplog_twisted: list) -> None:
    """A failing send is swallowed: lines are counted as dropped and one warning is logged
    per minute however many sends fail."""
    clock = Clock()
    client = StatsDClient(clock, "127.0.0.1", 8125)
    client.address = ("127.0.0.1", 8125)
    client._udp = FailingUDP()
    for _ in range(3):
        client.gauge("slots_idle", 1)
        client.gauge("slots_processing", 1)
        assert client.flush() == 0
        clock.advance(10)
    assert client.dropped == 6
    warnings = [e for e in caplog_twisted if "cannot send StatsD" in e.get("log_format", "")]
    assert len(warnings) == 1
    clock.advance(60)
    client.gauge("slots_idle", 1)
    client.flush()
    warnings = [e for e in caplog_twisted if "cannot send StatsD" in e.get("log_format", "")]
    assert len(warnings) == 2
    assert warnings[1]["count"] == 3


class FakeUDPReactor(Clock):
    """resolve() answers from a table; listenUDP() records and returns a port that records writes."""

    def __init__(self, names: dict[str, str]) -> None:
        super().__init__()
        self.names = names
        self.resolved: list[str] = []
        self.listening: list[tuple[int, str]] = []
        self.pending: Deferred[str] | None = None
        self.written: list[tuple[bytes, Any]] = []

    def resolve(self, name: str) -> Deferred[str]:
        self.resolved.append(name)
        if name == "slow.example":
            self.pending = Deferred()
            return self.pending
        if name in self.names:
            return succeed(self.names[name])
        return fail(OSError(f"{name}: no such host"))

    def listenUDP(self, port: int, protocol: Any, interface: str = "") -> Any:
        self.listening.append((port, interface))
        reactor = self

        class Port:
            def write(self, datagram: bytes, addr: Any) -> None:
                reactor.written.append((datagram, addr))

            def stopListening(self) -> None:
                pass

        return Port()


def test_a_host_name_is_resolved_once_without_blocking() -> None:
    """A host name goes through reactor.resolve once; datagrams go to the address found."""
    reactor = FakeUDPReactor({"statsd.local": "10.1.2.3"})
    client = StatsDClient(reactor, "statsd.local", 8125)
    client.start()
    for _ in range(3):
        client.increment("requests")
        client.flush()
    assert reactor.resolved == ["statsd.local"]
    assert reactor.listening == [(0, "0.0.0.0")]
    assert [addr for _, addr in reactor.written] == [("10.1.2.3", 8125)] * 3


def test_an_ip_address_is_not_resolved_and_ipv6_gets_an_ipv6_socket() -> None:
    """IP literals skip resolution; an IPv6 server gets a socket bound to ::."""
    reactor = FakeUDPReactor({})
    StatsDClient(reactor, "::1", 8125).start()
    assert reactor.resolved == [] and reactor.listening == [(0, "::")]


def test_an_unresolvable_host_turns_statsd_off_with_a_warning(caplog_twisted: list) -> None:
    """When the name does not resolve, a warning is logged, no socket is opened and lines are dropped."""
    reactor = FakeUDPReactor({})
    client = StatsDClient(reactor, "nowhere.invalid", 8125)
    client.start()
    client.gauge("slots_idle", 1)
    assert client.flush() == 0
    assert reactor.listening == []
    assert any("does not resolve" in e.get("log_format", "") for e in caplog_twisted)


def test_stopping_before_the_name_resolves_opens_no_socket() -> None:
    """A resolution that completes after stop() opens nothing."""
    reactor = FakeUDPReactor({})
    client = StatsDClient(reactor, "slow.example", 8125)
    client.start()
    client.stop()
    assert reactor.pending is not None
    reactor.pending.callback("10.0.0.9")
    assert reactor.listening == []


@pytest.mark.allow_logged_errors
def test_a_failing_report_is_logged_and_the_next_one_runs(fail_on_logged_errors: list) -> None:
    """An exception inside a report is logged; the loop keeps reporting."""
    reactor = FakeUDPReactor({})
    pool = make_pool(reactor)
    stats = RequestStats(reactor)
    client = StatsDClient(reactor, "127.0.0.1", 8125)
    service = StatsDService(client, pool, stats, reactor, interval=1.0)
    calls = []
    real_totals = pool.totals

    def totals() -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_totals()

    pool.totals = totals  # type: ignore[method-assign]
    service.startService()
    reactor.advance(1.0)
    reactor.advance(1.0)
    assert len(calls) == 2
    assert len(reactor.written) == 1
    assert any("StatsD report failed" in e.get("log_format", "") for e in fail_on_logged_errors)
    service.stopService()
    assert reactor.getDelayedCalls() == []


def test_timers_per_interval_are_bounded() -> None:
    """A flood of requests between two reports keeps at most a fixed number of timer samples."""
    reactor = FakeUDPReactor({})
    pool = make_pool(reactor)
    stats = RequestStats(reactor)
    service = StatsDService(StatsDClient(reactor, "127.0.0.1", 8125), pool, stats, reactor)
    service.startService()
    for _ in range(10_000):
        stats.record(200, 0.1, ttfb=0.01)
    assert len(service._timers) <= 2_000
    service.stopService()


# -- names and datagrams ------------------------------------------------------


@pytest.mark.parametrize(
    "name, safe",
    [("gpu-1", "gpu-1"), ("a.b.c", "a_b_c"), ("big box/2", "big_box_2"), ("<script>", "_script_"),
     ("", "_"), ("ünï", "_n_")],
)
def test_graphite_names_are_one_safe_path_component(name: str, safe: str) -> None:
    """Upstream names become one Graphite component of letters, digits, _ and -."""
    assert graphite_name(name) == safe


def test_prefix_components_are_made_safe() -> None:
    """A prefix keeps its dots; each component is sanitised and empty ones dropped."""
    assert graphite_prefix("prod..pad dler.") == "prod.pad_dler"


@pytest.mark.parametrize("value, text", [(3, "3"), (2.0, "2"), (0.1234, "0.123"), (1500.0, "1500"), (0.0004, "0")])
def test_numbers_are_plain_decimals(value: float, text: str) -> None:
    """Values never use exponents; whole numbers have no point."""
    assert format_number(value) == text


def test_lines_are_packed_into_datagrams_of_at_most_512_bytes() -> None:
    """Lines are joined by newlines, never split, and no datagram exceeds the limit."""
    lines = [f"paddler.upstream.u{i:04d}.slots_idle:{i}|g".encode() for i in range(200)]
    datagrams = pack_datagrams(lines)
    assert all(len(d) <= 512 for d in datagrams)
    assert b"\n".join(datagrams).split(b"\n") == lines
    assert len(datagrams) < len(lines) / 5


# -- settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("udp:127.0.0.1:8125", ("127.0.0.1", 8125)), ("127.0.0.1:8125", ("127.0.0.1", 8125)),
     ("statsd.local:9125", ("statsd.local", 9125)), ("udp:[::1]:8125", ("::1", 8125))],
)
def test_statsd_addresses_accepted(text: str, expected: tuple[str, int]) -> None:
    """--statsd takes udp:HOST:PORT or HOST:PORT (IPv6 in brackets)."""
    assert parse_statsd_address(text) == expected


@pytest.mark.parametrize("text", ["localhost", "udp:localhost", "host:0", "host:70000", "host:abc", "::1:8125", ":8125"])
def test_bad_statsd_addresses_name_the_flag(text: str) -> None:
    """A bad --statsd is a ConfigError that names --statsd."""
    with pytest.raises(ConfigError, match="--statsd"):
        build_config({"statsd": text}, [], {})


def test_statsd_flags_reach_the_config() -> None:
    """--statsd HOST:PORT is stored as udp:HOST:PORT with the prefix and interval."""
    options = Options()
    options.parseOptions(["balancer", "--statsd", "127.0.0.1:8125", "--statsd-prefix", "prod.paddler",
                          "--statsd-interval", "2.5"])
    config = options.subOptions.config
    assert (config.statsd, config.statsd_prefix, config.statsd_interval) == ("udp:127.0.0.1:8125", "prod.paddler", 2.5)


@pytest.mark.parametrize("args, flag", [(["--statsd", "nohost"], "--statsd"),
                                        (["--statsd-prefix", "bad prefix"], "--statsd-prefix"),
                                        (["--statsd-interval", "0"], "--statsd-interval")])
def test_bad_statsd_flags_are_usage_errors(args: list[str], flag: str) -> None:
    """Bad StatsD flags stop the balancer with a usage error naming the flag."""
    with pytest.raises(UsageError, match=flag):
        Options().parseOptions(["balancer", *args])


def test_statsd_is_off_by_default() -> None:
    """Without --statsd nothing is sent."""
    assert build_config({}, [], {}).statsd is None


@pytest_twisted.ensureDeferred
async def test_counters_of_the_last_interval_are_sent_on_stop(receiver: Receiver) -> None:
    """Stopping the service sends what was counted since the last report, instead of losing it."""
    clock = Clock()
    client = StatsDClient(global_reactor, "127.0.0.1", receiver.port, "paddler")
    pool, stats = fleet_with_requests(clock)
    service = StatsDService(client, pool, stats, clock, interval=1.0)
    service.startService()
    record_requests(stats, pool)
    await service.stopService()
    await receiver.until(len(EXPECTED))
    assert sorted(receiver.lines) == sorted(EXPECTED)
    assert clock.getDelayedCalls() == []


class RecordingClient:
    """A StatsD client that keeps the lines it was given (without the prefix)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def start(self) -> None:
        pass

    def stop(self) -> Any:
        from twisted.internet.defer import succeed

        return succeed(None)

    def gauge(self, name: str, value: float) -> None:
        self.lines.append(f"{name}:{format_number(max(0.0, value))}|g")

    def increment(self, name: str, count: int = 1) -> None:
        self.lines.append(f"{name}:{count}|c")

    def timing(self, name: str, milliseconds: float) -> None:
        self.lines.append(f"{name}:{format_number(milliseconds)}|ms")

    def flush(self) -> int:
        return 0


def test_refusals_timeouts_and_cancellations_are_counted_by_reason_and_a_removed_upstream_is_zeroed():
    """requests.refused.buffer_full etc. count per interval; an upstream that left sends zeros once."""
    clock = Clock()
    pool, stats = fleet_with_requests(clock)
    client = RecordingClient()
    service = StatsDService(client, pool, stats, clock, interval=1.0)
    service.startService()
    stats.record(503, 0.0, outcome=("refused", "buffer_full"))
    stats.record(504, 30.0, outcome=("timed_out", "buffer"))
    stats.record(0, 1.0, outcome=("cancelled", "buffered"))
    clock.advance(1)
    lines = set(client.lines)
    assert {"requests.refused.buffer_full:1|c", "requests.timed_out.buffer:1|c",
            "requests.cancelled.buffered:1|c"} <= lines
    client.lines.clear()
    pool.remove(pool.find("big box/2").id)
    clock.advance(1)
    assert "upstream.big_box_2.slots_idle:0|g" in client.lines
    assert "upstream.big_box_2.healthy:0|g" in client.lines
    client.lines.clear()
    clock.advance(1)
    assert not [line for line in client.lines if "big_box_2" in line]
    service.stopService()
