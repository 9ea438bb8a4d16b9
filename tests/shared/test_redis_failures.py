"""The Redis store when Redis misbehaves: killed, restarted empty, paused, absent,
its script cache flushed, or behind a password; and the NOSCRIPT path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from paddler.sharedstate.client import LinkState, RedisClient, parse_state_url
from paddler.sharedstate.errors import StoreTimeout, StoreUnavailable
from paddler.sharedstate.model import Release
from paddler.sharedstate.redisstore import RedisSlotStore
from paddler.sharedstate.scripts import SCRIPTS, key_names
from paddler.sharedstate.store import SharedLease, Waiter

from .conftest import RedisServer, free_port


async def until(predicate: Any, deadline: float = 5.0, what: str = "condition") -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError(f"{what} not reached within {deadline} s")


@pytest.fixture
def log_events() -> Iterator[list[dict]]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def link_lines(events: list[dict], kind: str = "commands") -> list[str]:
    return [
        ("up" if e["log_format"].endswith(" up") else e.get("state", "?"))
        for e in events
        if e.get("log_namespace", "").startswith("paddler.sharedstate.client") and e.get("kind") == kind
        and "connection to" in e.get("log_format", "")
    ]


def make_store(url: Any, prefix: str, owner: str, **kwargs: Any) -> RedisSlotStore:
    kwargs.setdefault("timeout", 0.5)
    kwargs.setdefault("reap_interval", 3600.0)
    kwargs.setdefault("max_backoff", 0.2)
    store = RedisSlotStore(reactor, url, owner, prefix=prefix, **kwargs)
    store.startService()
    return store


@pytest_twisted.ensureDeferred
async def test_killed_redis_fails_calls_within_their_deadline_and_state_is_rebuilt_when_it_returns(
    own_redis: RedisServer, prefix: str, log_events: list[dict]
) -> None:
    """kill -9 mid-test: no call hangs; on return (empty) each owner re-registers, adopts and re-queues."""
    a = make_store(own_redis.url, prefix, "replica-a")
    b = make_store(own_redis.url, prefix, "replica-b")
    resets: list[str] = []
    a.subscribe_reset(lambda: resets.append("a"))
    b.subscribe_reset(lambda: resets.append("b"))
    try:
        await until(lambda: a.is_up and b.is_up and a.epoch and b.epoch, what="both stores up")
        await a.register_server("s1", 1)
        await b.register_server("s2", 2)
        await b.drain("s2")
        held = await a.acquire("held", ["s1"])
        queued_b = await b.acquire("queued-b", ["s1"])
        queued_a = await a.acquire("queued-a", ["s1"])
        assert isinstance(held, SharedLease) and isinstance(queued_b, Waiter) and isinstance(queued_a, Waiter)
        await b.snapshot()  # b learns of s1 (registered by a) as well

        own_redis.kill()
        await until(lambda: not a.is_up and not b.is_up, what="both stores see Redis down")
        durations = []
        for call in (
            lambda: a.acquire("during", ["s1"]),
            lambda: a.snapshot(),
            lambda: b.register_server("s3", 1),
            lambda: a.reap(),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            durations.append(time.monotonic() - started)
        assert max(durations) < 0.5, f"calls while down took {durations}"
        started = time.monotonic()
        assert await held.release() is None, "kept for later, not failed"
        assert time.monotonic() - started < 0.5
        assert "held" in a._unsettled

        own_redis.start()  # same port, empty
        await until(lambda: len(resets) == 2, deadline=10.0, what="both owners rebuilt the state")
        snapshot = await a.snapshot()
        assert set(snapshot.servers) == {"s1", "s2", "s3"}, "s3, registered while down, too"
        assert snapshot.servers["s2"].draining
        # a's release of "held" was retried after the rebuild, or the adoption happened first:
        # either way the slot went to the first re-queued waiter and nothing is above its slots
        await a.renew()
        snapshot = await a.snapshot()
        assert snapshot.servers["s1"].leased <= 1
        waiting = {w.id for store in (a, b) for w in store.waiters.values()}
        leased = {lid for store in (a, b) for lid in store.leases}
        assert waiting | leased >= {"queued-a", "queued-b"}
        assert "held" not in a._unsettled
        lines = link_lines(log_events)
        assert lines.count("down") == 2 and lines.count("up") >= 4, lines
    finally:
        for waiter in [*a.waiters.values(), *b.waiters.values()]:
            waiter.deferred.addErrback(lambda f: None)
        await a.stopService()
        await b.stopService()


@pytest_twisted.ensureDeferred
async def test_a_paused_redis_times_calls_out_and_the_link_goes_down_then_up(own_redis: RedisServer, prefix: str) -> None:
    """SIGSTOP: the port is open but mute; each call fails at its deadline, three in a row drop the link."""
    store = make_store(own_redis.url, prefix, "replica-a", timeout=0.15)
    try:
        await until(lambda: store.is_up and store.epoch, what="store up")
        await store.register_server("s1", 1)
        own_redis.pause()
        timings = []
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                await store.snapshot()
            timings.append(time.monotonic() - started)
            if not store.is_up:
                break
        assert isinstance(caught.value, (StoreTimeout, StoreUnavailable))
        assert all(t < 0.4 for t in timings), timings
        await until(lambda: not store.is_up, what="link down after repeated timeouts")
        own_redis.resume()
        await until(lambda: store.is_up, deadline=5.0, what="link up after SIGCONT")
        assert "s1" in (await store.snapshot()).servers, "the data survived the pause"
    finally:
        own_redis.resume()
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_dead_port_fails_at_once_and_never_hangs() -> None:
    """No Redis listening: the first attempt fails, the link is down and calls fail immediately."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    store = make_store(url, "{dead}", "replica-a")
    try:
        await until(lambda: store.client.state is LinkState.DOWN, deadline=3.0, what="link down")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.acquire("r1", ["s1"])
        assert time.monotonic() - started < 0.05
        assert await store.release("r1") is None
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_call_waiting_for_the_first_connection_still_has_a_deadline() -> None:
    """A blackholed connect (never answers) is bounded by the command deadline, not the TCP timeout."""
    from twisted.internet.protocol import Factory, Protocol

    class Mute(Protocol):
        pass

    port = reactor.listenTCP(0, Factory.forProtocol(Mute), interface="127.0.0.1")
    try:
        client = RedisClient(
            reactor, parse_state_url(f"redis://127.0.0.1:{port.getHost().port}/0"), command_timeout=0.1, scripts=SCRIPTS.values()
        )
        client.startService()
        started = time.monotonic()
        with pytest.raises(StoreTimeout):
            await client.execute("PING")
        assert 0.09 < time.monotonic() - started < 0.5
        await client.stopService()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_scripts_are_loaded_again_after_script_flush(redis_server: RedisServer, prefix: str) -> None:
    """NOSCRIPT (SCRIPT FLUSH, a restart, a failover) is answered by SCRIPT LOAD and one retry."""
    store = make_store(redis_server.url, prefix, "replica-a")
    try:
        await until(lambda: store.is_up and store.epoch, what="store up")
        await store.register_server("s1", 1)
        await store.client.execute("SCRIPT", "FLUSH")
        lease = await store.acquire("r1", ["s1"])
        assert isinstance(lease, SharedLease)
        assert store.client.script_reloads == 1
        assert await lease.release() is Release.RELEASED
        assert store.client.script_reloads == 2
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_scripts_check_raw_arguments_before_any_write(redis_server: RedisServer, prefix: str) -> None:
    """Called directly with bad ARGV (no Python checks in front), every script errors and writes nothing."""
    store = make_store(redis_server.url, prefix, "replica-a")
    try:
        await until(lambda: store.is_up and store.epoch, what="store up")
        await store.register_server("s1", 2)
        keys = key_names(prefix)

        async def dump() -> dict[str, Any]:
            return {key: await store.client.execute("DUMP", key) for key in keys}

        before = await dump()
        channel = store.channel_prefix
        bad = [
            ("acquire", ["o", "r", "49", "0", "1", ""]),  # ttl below the minimum
            ("acquire", ["o", "r", "1000", "1e3", "1", ""]),
            ("acquire", ["o", "r", "1000", "0", "1", "", "s1", "s1"]),
            ("acquire", ["o", "r|x", "1000", "0", "1", ""]),
            ("acquire", ["o", "r", "1000", "0", "1", "m" * 300, "s1"]),
            ("acquire", ["o", "r", "1000", "0", "1", "", *[f"s{i}" for i in range(300)]]),
            ("register", ["s2", "-1", "", "0"]),
            ("register", ["s2", "4097", "", "0"]),
            ("register", ["s2", "2.5", "", "0"]),
            ("register", ["s2", "0x10", "", "0"]),
            ("register", ["s2", "2", "", "yes"]),
            ("register", ["x" * 129, "2", "", "0"]),
            ("reading", ["s1", "2", "-1", "0", ""]),
            ("reading", ["s1", "2", "1", "99999999999999999", ""]),
            ("reading", ["s1", "2", "1", "0", "0"]),
            ("drain", ["s1", "2"]),
            ("renew", ["o", "10", "e"]),
            ("adopt", ["o", "r", "s1", "1000", "m" * 300]),
            ("reap", ["0"]),
            ("reap", ["100000"]),
            ("release", [""]),
            ("poll", ["o", "e", "a,b"]),
        ]
        for name, args in bad:
            with pytest.raises(Exception) as caught:
                await store.client.evalsha(SCRIPTS[name], keys, [channel, *args])
            assert str(caught.value).startswith("PDARG"), (name, args, caught.value)
        assert await dump() == before
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_the_password_comes_from_the_url_or_the_environment(
    redis_binary: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, log_events: list[dict]
) -> None:
    """AUTH with the URL's password or the state_password setting (PADDLER_STATE_PASSWORD); a wrong one keeps
    the link down, loudly."""
    from paddler.config import build_config

    server = RedisServer(redis_binary, tmp_path, extra=["--requirepass", "s3cret"])
    stores = []
    try:
        server.start()
        with_url = make_store(f"redis://:s3cret@127.0.0.1:{server.port}/2", "{pw}", "a")
        url = f"redis://127.0.0.1:{server.port}/2"
        for password, owner in (("s3cret", "b"), ("wrong", "c")):
            config = build_config({"state": url}, [], {"PADDLER_STATE_PASSWORD": password})
            stores.append(make_store(parse_state_url(config.state, config.state_password), "{pw}", owner))
        with_env, wrong = stores
        stores = [with_url, with_env, wrong]  # all stopped at the end
        await until(lambda: with_url.is_up and with_env.is_up, what="both logged in")
        await until(lambda: wrong.client.state is LinkState.DOWN, what="wrong password: down")
        assert "WRONGPASS" in (wrong.client.last_error or "") or "invalid" in (wrong.client.last_error or "")
        assert await with_url.register_server("s1", 1) == 1
        assert "s1" in (await with_env.snapshot()).servers
        assert "s3cret" not in repr(with_url.address) and "s3cret" not in with_url.address.display()
        assert "s3cret" not in str([e.get("log_format") for e in log_events] + [e.get("error") for e in log_events])
    finally:
        for store in stores:
            await store.stopService()
        server.stop()


def _self_signed(directory: Any) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


@pytest_twisted.ensureDeferred
async def test_rediss_talks_tls_and_checks_the_certificate(redis_binary: str, tmp_path: Any) -> None:
    """rediss:// with ssl_ca_certs works; without the CA the certificate is refused and the link stays down."""
    cert, key = _self_signed(tmp_path)
    tls_port = free_port()
    server = RedisServer(
        redis_binary,
        tmp_path,
        extra=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", cert,
            "--tls-key-file", key,
            "--tls-ca-cert-file", cert,
            "--tls-auth-clients", "no",
        ],
    )
    try:
        server.start()
    except RuntimeError as e:
        server.stop()
        pytest.skip(f"this redis-server cannot serve TLS: {e}")
    stores = []
    try:
        good = make_store(f"rediss://localhost:{tls_port}/0?ssl_ca_certs={cert}", "{tls}", "a")
        untrusted = make_store(f"rediss://localhost:{tls_port}/0", "{tls}", "b")
        stores = [good, untrusted]
        await until(lambda: good.is_up and good.subscriber.is_up, what="TLS link up")
        assert await good.register_server("s1", 1) == 1
        lease = await good.acquire("r1", ["s1"])
        assert isinstance(lease, SharedLease)
        await until(lambda: untrusted.client.state is LinkState.DOWN, what="untrusted certificate refused")
        assert not untrusted.is_up
    finally:
        for store in stores:
            await store.stopService()
        server.stop()
