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
hooked transport's C{write()} still queues in Twisted's buffer and marks
the transport, and once per turn, just before the reactor waits, the
L{TransportFlusher} sends what each marked transport queued with one
C{socket.send}. What the kernel did not take is left in Twisted's buffer
exactly as a partial C{doWrite()} leaves it (C{dataBuffer} from
C{offset}), and only then is the socket registered for write events, the
way Twisted always does it; when everything went, a paused producer is
resumed as C{doWrite()} resumes it. So ordering, producer pause and
resume, C{loseConnection} after pending writes, half-close and abort behave
exactly as before. Anything else goes Twisted's way at once, as if the
transport had never been hooked: a transport that is closing
(C{disconnecting}, C{_writeDisconnecting}) or carries TLS (C{startTLS}),
one with an older remainder waiting for a write event, a pull producer's
registration (nothing queued), a send that failed (Twisted's C{doWrite}
reports the error at the write event); an aborted one is skipped. Only
plain C{tcp.Server} and C{tcp.Client} transports are hooked: TLS endpoints
wrap the protocol in C{TLSMemoryBIOProtocol}, which the channel sees as its
transport, so they are left alone.

This module is the one place that touches Twisted's transport internals:
C{FileDescriptor.startWriting} (replaced on the hooked instance),
C{dataBuffer}/C{offset}/C{_tempDataBuffer}/C{_tempDataLen} (where bytes wait),
C{producer}/C{streamingProducer}/C{producerPaused} (when C{doWrite} resumes a
producer), C{disconnecting}/C{_writeDisconnecting}/C{_aborting}/C{TLS},
C{socket} and the reactor's C{_disconnectSelectable}. C{tests/test_flush_contract.py}
checks each of them against the installed Twisted, so an upgrade that
changes them fails loudly; and the module only works on the Twisted
versions it was tested with (L{TESTED_TWISTED}): on any other it does
nothing and says so once in the log.
"""

from __future__ import annotations

import errno
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

_log = Logger(namespace="paddler.flush")


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
            if (
                transport.disconnecting
                or transport._writeDisconnecting
                or transport.TLS
                or not transport._tempDataLen
                or len(transport.dataBuffer) > transport.offset
            ):
                # closing (write everything, then close or half-close), TLS, a pull producer just
                # registered (nothing buffered: Twisted's write event resumes it) or an older
                # remainder: Twisted's way, as if the transport had never been hooked
                self.handed_over += 1
                _twisted_start_writing(transport)
                continue
            try:
                if self._send(transport):
                    self.sent += 1
                else:
                    self.handed_over += 1
                    _twisted_start_writing(transport)
            except BaseException:
                # what the reactor does when doWrite raises (a producer's resumeProducing...)
                why = sys.exc_info()[1]
                _log.failure(
                    "Unhandled error writing to {transport!r}", Failure(), transport=transport,
                    log_system=_prefix(transport),
                )
                self.reactor._disconnectSelectable(transport, why, False)

    @staticmethod
    def _send(transport: Any) -> bool:
        """
        Send C{transport}'s queued bytes (Twisted's C{_tempDataBuffer}, its
        C{dataBuffer} being empty) with one C{socket.send}; whether all went.
        What the kernel did not take becomes Twisted's C{dataBuffer} from
        C{offset}, as C{doWrite} leaves a partial send. All sent: a paused
        (or pull) producer is resumed, as C{doWrite} does. A send that fails
        leaves the bytes queued: Twisted's own C{doWrite}, at the write event,
        reports it as it always has.
        """
        queued = transport._tempDataBuffer
        data = queued[0] if len(queued) == 1 else b"".join(queued)
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                return False  # ECONNRESET, EPIPE...: doWrite will return CONNECTION_LOST for it
            sent = 0
        transport._tempDataBuffer = []
        transport._tempDataLen = 0
        if sent < len(data):
            transport.dataBuffer = data
            transport.offset = sent
            return False
        transport.dataBuffer = b""
        transport.offset = 0
        producer = transport.producer
        if producer is not None and (not transport.streamingProducer or transport.producerPaused):
            transport.producerPaused = False
            producer.resumeProducing()
        return True


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
