"""RESP2, the Redis wire protocol: encoding commands, parsing replies, and two
Twisted protocols (one for commands, one for a pub/sub connection).

Only what paddler needs: commands are arrays of bulk strings; replies are
simple strings, errors, integers, bulk strings and (nested) arrays.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Union

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

#: A reply: bytes (bulk or simple string), int, None (nil) or a list of replies.
Reply = Union[bytes, int, None, list[Any]]

#: The largest reply paddler accepts (a snapshot of a big fleet is well below).
MAX_REPLY_BYTES = 64 * 1024 * 1024
MAX_ARRAY_ITEMS = 1_000_000
MAX_DEPTH = 8


class RedisError(Exception):
    """An error reply from Redis (``-ERR ...``)."""

    @property
    def code(self) -> str:
        return str(self.args[0]).split(" ", 1)[0] if self.args else ""


class NoScriptError(RedisError):
    """``NOSCRIPT``: the script cache does not hold this SHA (Redis restarted or SCRIPT FLUSH)."""


class ProtocolError(Exception):
    """Redis sent bytes that are not RESP2 (or too large a reply): the connection is dropped."""


class RedisConnectionLost(Exception):
    """The connection closed before Redis answered this command."""


def error_from_reply(message: str) -> RedisError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return RedisError(message)


def _as_bytes(arg: Any) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode("utf-8")
    if isinstance(arg, bool):
        raise TypeError("booleans are ambiguous in Redis commands; pass 0 or 1")
    if isinstance(arg, int):
        return str(arg).encode("ascii")
    if isinstance(arg, float):
        return repr(arg).encode("ascii")
    raise TypeError(f"cannot send {type(arg).__name__} to Redis")


def encode_command(args: Sequence[Any]) -> bytes:
    """The RESP2 array of bulk strings for one command."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _as_bytes(arg)
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


class _Incomplete(Exception):
    pass


class ReplyParser:
    """Incremental RESP2 reply parser: feed bytes, take whole replies."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data = b""
        self._pos = 0

    def feed(self, data: bytes) -> list[Reply | RedisError]:
        self._buffer += data
        if len(self._buffer) - self._pos > MAX_REPLY_BYTES:
            raise ProtocolError(f"a reply larger than {MAX_REPLY_BYTES} bytes")
        replies: list[Reply | RedisError] = []
        self._data = bytes(self._buffer)  # parse an immutable copy: slicing bytes is cheap
        while self._pos < len(self._data):
            try:
                reply, end = self._parse(self._pos, 0)
            except _Incomplete:
                break
            replies.append(reply)
            self._pos = end
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        return replies

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._data.find(b"\r\n", pos)
        if end < 0:
            if len(self._data) - pos > 65536:
                raise ProtocolError("a RESP header line longer than 64 KiB")
            raise _Incomplete()
        return self._data[pos:end], end + 2

    def _int(self, text: bytes) -> int:
        try:
            return int(text)
        except ValueError:
            raise ProtocolError(f"not an integer in a RESP header: {text[:40]!r}")

    def _parse(self, pos: int, depth: int) -> tuple[Any, int]:
        data = self._data
        if depth > MAX_DEPTH:
            raise ProtocolError("RESP arrays nested too deep")
        if pos >= len(data):
            raise _Incomplete()
        kind = data[pos]
        line, pos = self._line(pos + 1)
        if kind == 58:  # ':'
            return self._int(line), pos
        if kind == 36:  # '$'
            size = self._int(line)
            if size < 0:
                return None, pos
            if size > MAX_REPLY_BYTES:
                raise ProtocolError(f"a bulk string of {size} bytes")
            if len(data) < pos + size + 2:
                raise _Incomplete()
            if data[pos + size : pos + size + 2] != b"\r\n":
                raise ProtocolError("a bulk string not followed by CRLF")
            return data[pos : pos + size], pos + size + 2
        if kind == 42:  # '*'
            count = self._int(line)
            if count < 0:
                return None, pos
            if count > MAX_ARRAY_ITEMS:
                raise ProtocolError(f"an array of {count} items")
            items = []
            for _ in range(count):
                item, pos = self._parse(pos, depth + 1)
                items.append(item)
            return items, pos
        if kind == 43:  # '+'
            return line, pos
        if kind == 45:  # '-'
            return error_from_reply(line.decode("utf-8", "replace")), pos
        raise ProtocolError(f"unknown RESP type byte {bytes([kind])!r}")


class _Pending:
    __slots__ = ("deferred", "abandoned")

    def __init__(self) -> None:
        self.abandoned = False
        self.deferred: Deferred[Reply] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[Reply]) -> None:
        # The reply will still arrive (replies are in order): drop it then.
        self.abandoned = True


class RedisProtocol(Protocol):
    """
    One command connection. Commands are pipelined: each L{send} writes at
    once and returns a Deferred for its reply, answered in order. Cancelling
    that Deferred (a deadline) only forgets the reply; the command may still
    run in Redis.
    """

    log = Logger()

    def __init__(self) -> None:
        self._parser = ReplyParser()
        self._pending: deque[_Pending] = deque()
        self.connected_ = False
        self.on_lost: Callable[[RedisProtocol, Failure], None] | None = None
        self.on_made: Callable[[RedisProtocol], None] | None = None

    def connectionMade(self) -> None:
        self.connected_ = True
        if self.on_made is not None:
            self.on_made(self)

    def send(self, *args: Any) -> Deferred[Reply]:
        """Send one command; the Deferred fires with its reply or a L{RedisError}."""
        if not self.connected_:
            from twisted.internet.defer import fail

            return fail(RedisConnectionLost("the Redis connection is closed"))
        pending = _Pending()
        self._pending.append(pending)
        assert self.transport is not None
        self.transport.write(encode_command(args))
        return pending.deferred

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ProtocolError as e:
            self.log.error("bad reply from Redis, closing the connection: {error}", error=str(e))
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        for reply in replies:
            self.reply_received(reply)

    def reply_received(self, reply: Reply | RedisError) -> None:
        if not self._pending:
            self.log.error("Redis sent a reply no command asked for; closing the connection")
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        pending = self._pending.popleft()
        if pending.abandoned:
            return
        if isinstance(reply, RedisError):
            pending.deferred.errback(reply)
        else:
            pending.deferred.callback(reply)

    def connectionLost(self, reason: Failure = Failure(RedisConnectionLost())) -> None:  # noqa: B008
        self.connected_ = False
        pending, self._pending = self._pending, deque()
        for entry in pending:
            if not entry.abandoned:
                entry.deferred.errback(RedisConnectionLost(f"the Redis connection closed: {reason.getErrorMessage()}"))
        if self.on_lost is not None:
            self.on_lost(self, reason)


class SubscriberProtocol(RedisProtocol):
    """
    A connection in pub/sub mode. ``message`` pushes go to C{on_message};
    subscribe confirmations and PING answers (``pong``) complete the
    Deferred of the command that asked for them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.on_message: Callable[[bytes, bytes], None] | None = None

    def reply_received(self, reply: Reply | RedisError) -> None:
        if isinstance(reply, list) and reply and reply[0] in (b"message", b"pmessage"):
            if self.on_message is not None:
                channel, data = reply[-2], reply[-1]
                try:
                    self.on_message(channel, data)
                except Exception:
                    self.log.failure("handling a Redis pub/sub message failed")
            return
        super().reply_received(reply)
