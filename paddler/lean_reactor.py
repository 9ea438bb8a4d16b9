"""An epoll reactor that dispatches I/O events without a logging context per event.

Twisted's epoll reactor runs every read and write event inside
C{log.callWithLogger(selectable, ...)}: per event, the selectable's
C{logPrefix()}, a context dictionary copied and pushed on the context
tracker and popped again, so that a legacy C{log.msg} made while handling
the event is stamped with the connection's name. For a relay that is pure
overhead: measured side by side (issue 26, 512 SSE streams x 50 events/s,
one core), a plain Twisted forwarder with write-through used 0.026 CPU s
per 1,000 chunks on the epoll reactor and 0.020-0.023 on this one
(sglang-router: 0.023). L{LeanEPollReactor} is C{EPollReactor} with:

- C{doPoll} dispatching each event straight to C{_doReadOrWrite};
- C{_doReadOrWrite} as Twisted's, except that an exception raised by a
  handler (C{doRead}, C{doWrite}) is logged with the selectable that
  raised it (C{log_system} is its C{logPrefix()}, as C{callWithLogger}
  would have stamped it) and the selectable is disconnected as before; an
  exception escaping the dispatch itself (a C{connectionLost} that raises)
  is logged the same way and the other events of the poll still run;
- L{callBeforePoll} (L{paddler.interfaces.IReactorBeforePoll}): callables
  run once just before the next wait, for L{paddler.flush}; a timed
  call they schedule shortens that wait (C{mainLoop} computed it before
  they ran).

What is lost: a legacy C{twisted.python.log.msg} made inside an event
handler is stamped C{system="-"} instead of the connection's prefix;
C{twisted.logger} events (all of paddler's) never carried it.

The two methods are copies of Twisted's with those changes, so they are
pinned: C{tests/test_lean_reactor.py} checks the source of
C{EPollReactor.doPoll} and C{_PollLikeMixin._doReadOrWrite} against the
one copied, and L{install} falls back to Twisted's own epoll reactor (and
says so) on a Twisted outside L{paddler.flush.TESTED_TWISTED}.

Installed by the ``paddler`` command (C{--no-lean-reactor} or
C{PADDLER_LEAN_REACTOR=false} keep Twisted's default); ``twistd`` keeps
its own choice: C{twistd --reactor=paddler-lean paddler balancer ...}
selects this one (C{twisted/plugins/paddler_reactors.py}).
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from paddler.interfaces import IReactorBeforePoll

_log = Logger(namespace="paddler.lean_reactor")


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except BaseException:  # noqa: BLE001 - what log.callWithLogger says of a broken logPrefix
        return "(buggy logPrefix method)"


@implementer(IReactorBeforePoll)
class LeanEPollReactor(EPollReactor):
    """C{EPollReactor} without C{log.callWithLogger} around each event, and with L{callBeforePoll}."""

    def __init__(self) -> None:
        self._before_poll: list[Callable[[], object]] = []
        super().__init__()

    def callBeforePoll(self, f: Callable[[], object]) -> None:
        """Call C{f()} once just before the reactor next waits for I/O."""
        self._before_poll.append(f)

    def _run_before_poll(self) -> bool:
        """Run the callables added since the last poll; whether new ones were added meanwhile."""
        calls, self._before_poll = self._before_poll, []
        for f in calls:
            try:
                f()
            except BaseException:
                _log.failure("Unhandled error in {call!r} before poll", Failure(), call=f)
        return bool(self._before_poll)

    def doPoll(self, timeout: float | None) -> None:
        """Poll for events and dispatch each one (Twisted's C{doPoll} without the logging context)."""
        if self._before_poll:
            if self._run_before_poll():
                timeout = 0  # more to flush: look at the sockets, do not wait
            elif self._newTimedCalls and timeout != 0:
                # a call made by them (a producer resumed, an abort's connectionLost) is due
                # sooner than the timeout mainLoop computed before they ran
                due = self.timeout()
                if due is not None and (timeout is None or due < timeout):
                    timeout = due
        if timeout is None:
            timeout = -1  # Wait indefinitely.
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # what log.callWithLogger did with an error escaping the dispatch
                _log.failure("Unhandled error dispatching an event to {selectable!r}", Failure(),
                             selectable=selectable, log_system=_prefix(selectable))

    doIteration = doPoll

    def _doReadOrWrite(self, selectable: Any, fd: Any, event: int) -> None:
        """Twisted's C{_doReadOrWrite}; a handler's error is logged with the selectable that raised it."""
        why: Any = None
        inRead = False
        if event & self._POLL_DISCONNECTED and not (event & self._POLL_IN):
            # Handle disconnection, only once the pending input is processed.
            if fd in self._reads:
                # reading: a clean shutdown (maybe a half-close)
                inRead = True
                why = CONNECTION_DONE
            else:
                why = CONNECTION_LOST
        else:
            try:
                if selectable.fileno() == -1:
                    why = _NO_FILEDESC
                else:
                    if event & self._POLL_IN:
                        why = selectable.doRead()
                        inRead = True
                    if not why and event & self._POLL_OUT:
                        why = selectable.doWrite()
                        inRead = False
            except BaseException:
                # Any exception from application code gets logged and disconnects the selectable.
                why = sys.exc_info()[1]
                _log.failure("Unhandled error in {selectable!r}", Failure(), selectable=selectable,
                             log_system=_prefix(selectable))
        if why:
            self._disconnectSelectable(selectable, why, inRead)


def install() -> Any:
    """
    Install L{LeanEPollReactor} as the global reactor (Twisted's own
    C{EPollReactor} on a Twisted this module was not tested with, logged);
    the reactor installed.
    """
    from twisted.internet.main import installReactor

    from paddler.flush import SUPPORTED, TESTED_TWISTED

    if SUPPORTED:
        reactor: Any = LeanEPollReactor()
    else:
        import twisted

        reactor = EPollReactor()
        (low, high) = TESTED_TWISTED
        _log.warn(
            "Twisted {version} is not one paddler's lean reactor was tested with "
            "({low[0]}.{low[1]} to {high[0]}.{high[1]}): running Twisted's epoll reactor",
            version=twisted.__version__, low=low, high=high,
        )
    installReactor(reactor)
    return reactor


__all__ = ["LeanEPollReactor", "install"]
