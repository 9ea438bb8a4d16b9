"""Flush before poll: what a TCP transport buffered in one reactor turn goes out in one send, before the reactor waits.

Why this module exists. Twisted's C{transport.write()} only buffers: the
bytes are sent on the next reactor turn, after the socket has been
registered for write events (C{epoll_ctl}) and before it is unregistered
again (another C{epoll_ctl}). For a relay that forwards small chunks one by
one, that is two extra system calls and one more loop turn per chunk.
Measured side by side (issue 26: 512 SSE streams x 50 events/s, the proxy
pinned to one core, 3 repetitions interleaved; CPU seconds per 1,000
chunks / added p99): a plain Twisted forwarder 0.031 s / 5-7 ms; the same
writing straight to the socket when Twisted's buffer is empty 0.026 s /
~2 ms; plus an event loop without the per-event logging context
(L{paddler.lean_reactor}) 0.020-0.023 s, as low as sglang-router's 0.023
(HAProxy: 0.018). Counted with C{perf stat}: exactly 2 C{epoll_ctl} per
send in Twisted, 0.06 with write-through.

Writing at once on every C{write()} would turn an answer written as head
then body into two sends; so the send waits until the end of the turn: a
hooked transport's C{write()} still queues in Twisted's buffer, marks the
transport, and once per turn, just before the reactor waits, the
L{TransportFlusher} calls the transport's own C{doWrite()} for each marked
one, exactly what the reactor would have called at the next turn. What the
kernel did not take stays in Twisted's buffer and only then is the socket
registered for write events, the way Twisted always does it; so ordering,
producer pause and resume (C{doWrite} resumes a paused producer when the
buffer empties), C{loseConnection} after pending writes, half-close and
abort behave exactly as before. A transport that is closing (C{disconnecting},
C{_writeDisconnecting}), aborted, or carries TLS (C{startTLS}) goes Twisted's
way at once. Only plain C{tcp.Server} and C{tcp.Client} transports are
hooked: TLS endpoints wrap the protocol in C{TLSMemoryBIOProtocol}, which the
channel sees as its transport, so they are left alone.

This module is the one place that touches Twisted's transport internals:
C{FileDescriptor.startWriting} (replaced on the hooked instance),
C{dataBuffer}/C{offset}/C{_tempDataBuffer}/C{_tempDataLen} (where bytes wait),
C{disconnecting}/C{_writeDisconnecting}/C{_aborting}/C{TLS}, C{doWrite} and
the reactor's C{_disconnectSelectable}. C{tests/test_flush_contract.py}
checks each of them against the installed Twisted, so an upgrade that
changes them fails loudly; and the module only works on the Twisted
versions it was tested with (L{TESTED_TWISTED}): on any other it does
nothing and says so once in the log.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any
from weakref import WeakKeyDictionary

import twisted
from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure

from paddler.interfaces import IReactorBeforePoll

#: Twisted releases this module (and L{paddler.lean_reactor}) was tested with: (first, last), inclusive,
#: as (year, month) of Twisted's calendar versions.
TESTED_TWISTED = ((25, 5), (26, 10))

#: The transports that are hooked: plain TCP, exactly these classes (no subclass with its own writing).
PLAIN_TCP = (tcp.Server, tcp.Client)

_log = Logger(namespace="paddler.web.flush")


def twisted_release(version: str | None = None) -> tuple[int, int]:
    """(year, month) of a Twisted version string such as C{"26.10.0"} (default: the installed one)."""
    parts = (twisted.__version__ if version is None else version).split(".")
    try:
        return (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return (0, 0)  # not a release we know: never within the tested range


def twisted_tested(version: str | None = None) -> bool:
    """Whether the Twisted version (default: the installed one) is within L{TESTED_TWISTED}."""
    low, high = TESTED_TWISTED
    return low <= twisted_release(version) <= high


SUPPORTED = twisted_tested()

_twisted_start_writing = FileDescriptor.startWriting


def _buffered(transport: Any) -> bool:
    """Whether Twisted's write buffer of C{transport} holds bytes not sent yet."""
    return bool(transport._tempDataLen) or len(transport.dataBuffer) > transport.offset


class TransportFlusher:
    """
    Sends what the hooked transports of one reactor buffered during a turn,
    once per turn before the reactor waits (C{schedule} runs a callable
    then: the lean reactor's C{callBeforePoll}, or C{callLater(0, ...)} on any
    other reactor); what the kernel does not take is left to Twisted.
    """

    def __init__(self, reactor: Any, schedule: Callable[[Callable[[], None]], object] | None = None) -> None:
        self.reactor = reactor
        if schedule is None:
            if IReactorBeforePoll.providedBy(reactor):
                schedule = reactor.callBeforePoll
            else:
                schedule = partial(reactor.callLater, 0)
        self._schedule = schedule
        self._dirty: set[Any] = set()
        self._scheduled = False
        #: counters: transports written at once, and handed to Twisted (a remainder, closing, TLS)
        self.sent = 0
        self.handed_over = 0

    def hook(self, transport: Any) -> None:
        """Route C{transport}'s writes through this flusher (a plain TCP transport of this reactor)."""
        transport.startWriting = partial(self._mark, transport)

    def _mark(self, transport: Any) -> None:
        # Twisted's write()/writeSequence()/loseConnection()/loseWriteConnection() call this
        # instead of FileDescriptor.startWriting (reactor.addWriter)
        if transport in self._dirty:
            return
        if len(transport.dataBuffer) > transport.offset:
            # a remainder the kernel did not take is waiting for a write event: Twisted goes on
            _twisted_start_writing(transport)
            return
        self._dirty.add(transport)
        if not self._scheduled:
            self._scheduled = True
            self._schedule(self.flush)

    def flush(self) -> None:
        """Send what every transport marked since the last flush buffered; hand the rest to Twisted."""
        self._scheduled = False
        dirty, self._dirty = self._dirty, set()
        for transport in dirty:
            if not transport.connected or transport.disconnected or transport._aborting:
                continue  # lost or aborted since: Twisted dropped (or drops) the buffer
            if transport.disconnecting or transport._writeDisconnecting or transport.TLS:
                # closing (write everything, then close or half-close) or TLS: Twisted's way
                self.handed_over += 1
                _twisted_start_writing(transport)
                continue
            if not _buffered(transport):
                continue
            try:
                why = transport.doWrite()
            except BaseException:
                # what the reactor does when doWrite raises (a producer's resumeProducing...)
                why = sys.exc_info()[1]
                _log.failure(
                    "Unhandled error writing to {transport!r}", Failure(), transport=transport,
                    log_system=_prefix(transport),
                )
                self.reactor._disconnectSelectable(transport, why, False)
                continue
            if why or _buffered(transport):
                # a remainder (or a send that failed: the write event reports it, as before)
                self.handed_over += 1
                _twisted_start_writing(transport)
            else:
                self.sent += 1


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except BaseException:  # noqa: BLE001 - what log.callWithLogger says of a broken logPrefix
        return "(buggy logPrefix method)"


_flushers: WeakKeyDictionary[Any, TransportFlusher] = WeakKeyDictionary()
_said_unsupported: list[bool] = []


def enable(reactor: Any) -> TransportFlusher | None:
    """
    Flush before poll on C{reactor}'s hooked transports from now on; the
    flusher, or C{None} (logged once) when the installed Twisted is not one
    this module was tested with.
    """
    if not SUPPORTED:
        if not _said_unsupported:
            _said_unsupported.append(True)
            (low, high) = TESTED_TWISTED
            _log.warn(
                "Twisted {version} is not one paddler's write flush was tested with "
                "({low[0]}.{low[1]} to {high[0]}.{high[1]}): writes go through Twisted's own buffer",
                version=twisted.__version__, low=low, high=high,
            )
        return None
    flusher = _flushers.get(reactor)
    if flusher is None:
        flusher = _flushers[reactor] = TransportFlusher(reactor)
    return flusher


def disable(reactor: Any) -> None:
    """Stop hooking new transports of C{reactor} (hooked ones keep their flusher)."""
    _flushers.pop(reactor, None)


def hook(transport: Any) -> bool:
    """
    Flush C{transport} before poll if it is plain TCP and its reactor has
    L{enable}d it (a no-op for TLS wrappers, memory transports, unix
    sockets); whether it was hooked. Call it from C{connectionMade}.
    """
    if type(transport) not in PLAIN_TCP:
        return False
    flusher = _flushers.get(transport.reactor)
    if flusher is None:
        return False
    flusher.hook(transport)
    return True
