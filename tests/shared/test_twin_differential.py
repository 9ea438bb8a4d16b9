"""The Python twin of the Lua scripts against the scripts on a real redis-server, side by side.

Hypothesis draws random sequences of operations (register, reading,
acquire, release as done or as still running, renew, hello, poll, adopt,
drain, unregister, reap, snapshot, model placement claims and their end, time passing; two owners, three servers,
a few request ids, now and then an invalid argument) and replays each one on
L{paddler.sharedstate.memory.MemorySlotState} and as the production script of
L{paddler.sharedstate.scripts} on Redis; every reply must be the same, errors
included.

The one change to the scripts under test is their clock: Redis ``TIME``
cannot be stopped, so the test loads the scripts with C{now_ms()} reading a
key it sets to the twin's clock before each operation (both then see the
same millisecond). Everything else is the text production loads. The
session's redis-server (tests/shared/conftest.py) runs them; each example
gets its own key prefix. The test talks to Redis over a blocking socket: it
runs no reactor.
"""

from __future__ import annotations

import itertools
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from paddler.sharedstate import scripts
from paddler.sharedstate.memory import MemorySlotState
from paddler.sharedstate.resp import RedisError, ReplyParser, encode_command

_REAL_CLOCK = """local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""
_TEST_CLOCK = """local function now_ms()
  return tonumber(redis.call('GET', K_EPOCH .. ':test-now'))
end
"""
assert scripts.PRELUDE.count(_REAL_CLOCK) == 1, "the scripts' clock changed: update this test's replacement"
PRELUDE = scripts.PRELUDE.replace(_REAL_CLOCK, _TEST_CLOCK)
SOURCES = {name: PRELUDE + getattr(scripts, name.upper()) for name in scripts.SCRIPTS}
assert all(SOURCES[name] == script.source.replace(_REAL_CLOCK, _TEST_CLOCK) for name, script in scripts.SCRIPTS.items())

START_MS = 1_700_000_000_000
OWNERS = ("owner-a", "owner-b")
SERVERS = ("s1", "s2", "s3")
IDS = tuple(f"r{i}" for i in range(10))
EPOCHS = ("e1", "e2")
BAD = "bad id!"  # not a valid id: every script refuses it before writing


class BlockingRedis:
    """A plain RESP connection: one command, its reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.parser = ReplyParser()
        self.shas: dict[str, str] = {}

    def call(self, *args: Any) -> Any:
        self.sock.sendall(encode_command(args))
        while True:
            data = self.sock.recv(65536)
            assert data, "redis-server closed the connection"
            replies = self.parser.feed(data)
            if replies:
                assert len(replies) == 1
                return replies[0]

    def close(self) -> None:
        self.sock.close()


def normalised(reply: Any) -> Any:
    """A reply as both sides can be compared: text for bytes, the message for an error."""
    if isinstance(reply, RedisError):
        return ("error", str(reply))
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, list):
        return [normalised(item) for item in reply]
    return reply


def snapshot_rows_sorted(name: str, reply: Any) -> Any:
    """A snapshot lists servers in hash order on Redis and insertion order in the twin: compare them sorted."""
    if name == "snapshot" and isinstance(reply, list) and reply:
        return [reply[0], *sorted(reply[1:])]
    return reply


def mostly(values: tuple[str, ...], odd: str) -> st.SearchStrategy[str]:
    """One of C{values}, and now and then C{odd} (an invalid value the scripts must refuse alike)."""
    return st.sampled_from(values * 6 + (odd,))


ids = st.sampled_from(IDS)
owner = st.sampled_from(OWNERS)
server = st.sampled_from(SERVERS)
ttl = mostly(("500", "2000"), "49")  # 49 ms: below the minimum
slots = st.integers(0, 3).map(str)
acquire = st.builds(
    lambda o, r, t, wait, maxw, model, cands: ("acquire", o, r, t, wait, maxw, model, *cands),
    owner, mostly(IDS, BAD), ttl, st.sampled_from(["0", "300", "3000", "3000"]),
    st.sampled_from(["0", "1", "3", "3"]), st.sampled_from(["", "m"]),
    st.lists(server, unique=True, min_size=1, max_size=2),
)
release = st.tuples(st.just("release"), mostly(IDS, BAD), st.sampled_from(["0", "1"]))

OPERATIONS = st.one_of(
    acquire,
    acquire,
    acquire,
    acquire,
    release,
    release,
    release,
    st.tuples(st.just("register"), server, slots, st.sampled_from(["", "m"]), st.sampled_from(["0", "0", "1", "2"])),
    st.tuples(st.just("unregister"), server),
    st.tuples(st.just("drain"), server, st.sampled_from(["0", "1"])),
    st.tuples(
        st.just("reading"), server, slots, st.sampled_from(["", "0", "1", "2", "3"]),
        st.integers(0, 12).map(str), st.sampled_from(["", "", "1", "2"]),
    ),
    st.builds(
        lambda o, t, e, rids: ("renew", o, t, e, *rids),
        owner, ttl, mostly(("e1",), "e2"), st.lists(ids, unique=True, max_size=4),
    ),
    st.tuples(st.just("hello"), owner, ttl, mostly(("e1",), "e2")),
    st.builds(
        lambda o, e, rids: ("poll", o, e, *rids), owner, mostly(("e1",), "e2"), st.lists(ids, unique=True, max_size=4)
    ),
    st.tuples(st.just("adopt"), owner, ids, mostly(SERVERS, BAD), ttl, st.sampled_from(["", "m"])),
    st.tuples(st.just("reap"), mostly(("1", "2", "100"), "0")),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("wait"), st.sampled_from([0, 1, 49, 50, 300, 600, 2500])),
    st.tuples(
        st.just("place"), owner, mostly(("m", "n"), ""), mostly(SERVERS, BAD), st.sampled_from(["", *SERVERS]),
        ttl, st.sampled_from(["0", "300", "2000", "-1"]),
    ),
    st.tuples(st.just("finish_place"), owner, mostly(("m", "n"), ""), st.sampled_from(["0", "300", "x"])),
)
#: Every sequence starts from a fleet: three servers of 1 or 2 slots, both owners said hello (epoch e1).
OPENING = st.tuples(*(st.tuples(st.just("register"), st.just(s), st.integers(1, 2).map(str), st.just(""), st.just("0"))
                      for s in SERVERS)).map(
    lambda registers: [*registers, ("hello", OWNERS[0], "2000", "e1"), ("hello", OWNERS[1], "2000", "e1")]
)
SEQUENCES = st.builds(lambda opening, rest: opening + rest, OPENING, st.lists(OPERATIONS, min_size=20, max_size=60))

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_link(redis_server: Any) -> Any:
    link = BlockingRedis(redis_server.port)
    link.shas = {name: link.call("SCRIPT", "LOAD", source).decode() for name, source in SOURCES.items()}
    yield link
    link.close()


def replay(redis_link: BlockingRedis, operations: list) -> None:
    """Run C{operations} on a fresh twin and on Redis under a fresh prefix; every reply must be the same."""
    prefix = "{difftest-%d}" % next(_prefixes)
    keys = scripts.key_names(prefix)
    channel = prefix + ":grant:"
    clock = Clock()
    clock.advance(START_MS / 1000)
    twin = MemorySlotState(clock)
    now_key = keys[scripts.KEY_NAMES.index("epoch")] + ":test-now"
    done: list[tuple[Any, Any]] = []
    try:
        for operation in operations:
            name, *args = operation
            if name == "wait":
                clock.advance(args[0] / 1000)
                continue
            redis_link.call("SET", now_key, str(twin._now()))
            try:
                expected = twin.run(name, channel, args)
            except RedisError as e:
                expected = e
            got = redis_link.call("EVALSHA", redis_link.shas[name], str(len(keys)), *keys, channel, *args)
            mine, theirs = (snapshot_rows_sorted(name, normalised(r)) for r in (expected, got))
            assert theirs == mine, f"{operation} after {done}: Redis answered {theirs!r}, the twin {mine!r}"
            done.append((operation, mine))
    finally:
        redis_link.call("DEL", *keys, now_key)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=SEQUENCES)
def test_the_twin_and_the_lua_scripts_give_the_same_reply_to_every_operation(redis_link: Any, operations: list) -> None:
    """Every reply (errors included) of a random operation sequence is the same from the twin and from Redis."""
    replay(redis_link, operations)


FLEET = [("register", "s1", "1", "", "0"), ("hello", "owner-a", "2000", "e1"), ("hello", "owner-b", "2000", "e1")]


@pytest.mark.parametrize(
    "operations",
    [
        pytest.param(
            [*FLEET, ("register", "s2", "1", "", "0"), ("acquire", "owner-a", "r0", "500", "0", "0", "", "s1"),
             ("acquire", "owner-a", "r9", "500", "300", "1", "", "s1"), ("wait", 300),
             ("acquire", "owner-a", "r9", "500", "0", "0", "", "s2")],
            id="a waiter asking again past its deadline with a free new candidate: [2, seq, nil]",
        ),
        pytest.param(
            [*FLEET, ("wait", 1), ("hello", "owner-a", "2000", "e1"), ("snapshot",)],
            id="the snapshot lists the owners alive by heartbeat expiry, not by name",
        ),
        pytest.param(
            [("register", "s1", "2", "", "0"), ("register", "s3", "1", "", "0"),
             ("adopt", "owner-b", "r8", "s1", "500", "m"), ("adopt", "owner-a", "r0", "s1", "500", ""),
             ("adopt", "owner-a", "r4", "s3", "500", ""), ("wait", 600), ("reap", "2"), ("snapshot",)],
            id="a reap with a limit takes leases expiring in the same millisecond in id order, like a ZSET",
        ),
    ],
)
def test_what_the_differential_test_found_stays_fixed(redis_link: Any, operations: list) -> None:
    """Twin drifts it found: the twin crashed (KeyError) where the script answers [2, seq, nil]; the twin listed
    the owners by name where the script lists them by expiry; a reap up to its limit took the leases, waiters
    and owners of equal expiry in insertion order where the script's ZSETs take them by id."""
    replay(redis_link, operations)
