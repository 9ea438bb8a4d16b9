"""The lean epoll reactor (paddler/lean_reactor.py): real sockets, a reactor object turned by the test.

Events dispatched without C{log.callWithLogger}; a handler's error logged
with the selectable that raised it; L{callBeforePoll}; the copies of
Twisted's code pinned to the source they were taken from; installed by the
``paddler`` command (a subprocess: a process installs one reactor) and
offered to ``twistd``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import epollreactor
from twisted.internet.base import ReactorBase
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import globalLogPublisher
from twisted.python import log as legacy_log
from zope.interface.verify import verifyObject

from paddler.interfaces import IReactorBeforePoll
from paddler.lean_reactor import LeanEPollReactor

from .driven_reactor import Driven, Recorder, drain

ROOT = Path(__file__).resolve().parents[1]

#: sha256 of the source of the Twisted methods paddler/lean_reactor.py copies or relies on, as in each
#: Twisted it was tested with (25.5.0, 26.10.0). A new Twisted that changes one of them fails here:
#: compare, port the change, add the new hash.
PINNED_SOURCES = {
    "EPollReactor.doPoll": {"09b62ae68ef01b4bc5eaa170827e2baf0a2a5098e7e7ce7b5e1c80cda187c827"},
    "_PollLikeMixin._doReadOrWrite": {"5ffee55b79492b0037fc7bedacfc3aaa6d1f173122c738f8274b8be12d8d2be3"},
    "callWithLogger": {"802f8564bca3531fe46ea2098450b784ad60ff5bf0365c9fb06dda1c7ff668a6"},
    "ReactorBase.timeout": {
        "347720436ca8713cdebe17b9510dcea7cf6ef8a487924a654a08fc3b4a23908a",  # 26.10.0
        "e5a72ff1b121ba0142fb678c7ca7f42d88a511a00eb9b44730ce2c6cb476145f",  # 25.5.0: Optional[float]
    },
}


@pytest.fixture
def lean():
    d = Driven(LeanEPollReactor)
    try:
        yield d
    finally:
        d.close()


def test_the_lean_reactor_provides_before_poll():
    d = Driven(LeanEPollReactor)
    try:
        assert verifyObject(IReactorBeforePoll, d.reactor)
        assert isinstance(d.reactor, EPollReactor)
    finally:
        d.close()


def test_the_twisted_code_it_copies_is_the_code_it_was_copied_from():
    sources = {
        "EPollReactor.doPoll": EPollReactor.doPoll,
        "_PollLikeMixin._doReadOrWrite": EPollReactor._doReadOrWrite,
        "callWithLogger": legacy_log.callWithLogger,
        "ReactorBase.timeout": ReactorBase.timeout,  # its _newTimedCalls tell the lean doPoll a call is new
    }
    for name, function in sources.items():
        assert function.__qualname__ == name
        digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
        assert digest in PINNED_SOURCES[name], f"Twisted changed {name}: port the change to paddler/lean_reactor.py"


@pytest.mark.parametrize("cls, wrapped", [(LeanEPollReactor, False), (EPollReactor, True)], ids=["lean", "epoll"])
def test_events_are_dispatched_without_a_logging_context_per_event(monkeypatch, cls, wrapped):
    """Two connections' bytes arrive; only Twisted's own reactor goes through callWithLogger for them."""
    contexts: list[Any] = []
    original = epollreactor.log.callWithLogger

    def recording(logger: Any, func: Any, *args: Any, **kw: Any) -> Any:
        contexts.append(logger)
        return original(logger, func, *args, **kw)

    monkeypatch.setattr(epollreactor.log, "callWithLogger", recording)
    d = Driven(cls)
    try:
        port, built = d.listen(Recorder)
        clients = [d.accept(port, built) for _ in range(2)]
        for i, (sock, server) in enumerate(clients):
            sock.sendall(b"hello %d" % i)
        d.until(lambda: all(s.received for _, s in clients), what="both connections' bytes")
        assert [s.received for _, s in clients] == [b"hello 0", b"hello 1"]
        assert bool(contexts) is wrapped
    finally:
        d.close()


class Raises(Recorder):
    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"boom"):
            raise RuntimeError("handler broke")
        super().dataReceived(data)


@pytest.mark.allow_logged_errors
def test_an_error_in_a_handler_is_logged_with_its_selectable_and_drops_only_that_connection(lean):
    port, built = lean.listen(Raises)
    (bad_sock, bad), (good_sock, good) = lean.accept(port, built), lean.accept(port, built)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        bad_sock.sendall(b"boom")
        good_sock.sendall(b"fine")
        lean.until(lambda: bad.lost is not None and good.received == b"fine", what="the error and the other bytes")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert bad.lost.check(RuntimeError) and good.lost is None
    [event] = [e for e in events if e.get("log_namespace") == "paddler.lean_reactor"]
    assert event["log_system"] == bad.transport.logPrefix() == "Raises,0,127.0.0.1"
    assert event["log_failure"].check(RuntimeError) and event["selectable"] is bad.transport
    got = bytearray()
    lean.until(lambda: not drain(bad_sock, got), what="the broken connection closed")


class LosesBadly(Recorder):
    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        raise ValueError("connectionLost broke")


@pytest.mark.allow_logged_errors
def test_an_error_escaping_the_dispatch_is_logged_and_the_other_events_of_the_poll_still_run(lean):
    port, built = lean.listen(LosesBadly)
    clients = [lean.accept(port, built) for _ in range(2)]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for sock, _ in clients:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            lean.clients.remove(sock)
        lean.until(lambda: all(s.lost is not None for _, s in clients), what="both connections lost")
    finally:
        globalLogPublisher.removeObserver(events.append)
    mine = [e for e in events if e.get("log_namespace") == "paddler.lean_reactor"]
    assert len(mine) == 2
    assert {e["log_system"] for e in mine} == {s.transport.logPrefix() for _, s in clients}
    assert all(e["log_failure"].check(ValueError) for e in mine)


class RecordingPoller:
    """The reactor's epoll object, recording each poll's timeout."""

    def __init__(self, poller: Any) -> None:
        self._poller = poller
        self.timeouts: list[float] = []

    def poll(self, timeout: float, maxevents: int) -> Any:
        self.timeouts.append(timeout)
        return self._poller.poll(timeout, maxevents)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)


def test_call_before_poll_runs_before_the_next_wait_and_a_call_added_meanwhile_makes_it_not_wait(lean):
    poller = lean.reactor._poller = RecordingPoller(lean.reactor._poller)
    order: list[str] = []

    def first() -> None:
        order.append("first")
        lean.reactor.callBeforePoll(lambda: order.append("second"))

    lean.reactor.callBeforePoll(first)
    lean.reactor.doIteration(0.5)
    assert order == ["first"] and poller.timeouts == [0]  # more to run: the poll did not wait
    lean.reactor.doIteration(0.002)
    assert order == ["first", "second"] and poller.timeouts == [0, 0.002]
    lean.reactor._poller = poller._poller


def test_a_timed_call_made_before_poll_shortens_that_polls_wait(lean):
    poller = lean.reactor._poller = RecordingPoller(lean.reactor._poller)
    ran: list[str] = []
    lean.reactor.callBeforePoll(lambda: lean.reactor.callLater(0.002, ran.append, "due"))
    lean.reactor.doIteration(5.0)  # what mainLoop would pass with nothing due for 5 s
    assert poller.timeouts and poller.timeouts[0] <= 0.002
    lean.reactor.doIteration(0.001)  # no before-poll call: the timeout given is used as it is
    assert poller.timeouts[1] == 0.001
    lean.reactor._poller = poller._poller
    lean.until(lambda: ran, what="the timed call")


@pytest.mark.allow_logged_errors
def test_a_before_poll_call_that_raises_is_logged_and_the_others_still_run(lean):
    ran: list[int] = []

    def broken() -> None:
        raise RuntimeError("before poll broke")

    for f in (lambda: ran.append(1), broken, lambda: ran.append(3)):
        lean.reactor.callBeforePoll(f)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        lean.reactor.doIteration(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert ran == [1, 3]
    assert [e["log_failure"].type for e in events if e.get("log_namespace") == "paddler.lean_reactor"] == [
        RuntimeError
    ]


def _reactor_in_subprocess(code: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


PADDLER_COMMAND = """
import json, sys
from paddler.cli import install_reactor, parse
install_reactor(parse(sys.argv[1:] or {args!r}, sys.stderr))
from twisted.internet import reactor
print(json.dumps({{"reactor": type(reactor).__name__}}))
"""


@pytest.mark.parametrize(
    "args, expected",
    [
        (["balancer"], "LeanEPollReactor"),
        (["balancer", "--no-lean-reactor"], "EPollReactor"),
        (["simulate"], "EPollReactor"),
    ],
)
def test_the_paddler_command_installs_the_lean_reactor_for_a_balancer_unless_told_not_to(args, expected):
    assert _reactor_in_subprocess(PADDLER_COMMAND.format(args=args))["reactor"] == expected


def test_the_lean_reactor_runs_a_real_reactor_loop_in_its_own_process():
    """Installed for real: a server and a client on it exchange bytes, then the reactor stops."""
    code = """
import json
from paddler.lean_reactor import install
reactor = install()
from twisted.internet import reactor as installed
from twisted.internet.protocol import ClientFactory, Factory, Protocol
got = []
class Echo(Protocol):
    def dataReceived(self, data): self.transport.write(data)
class Client(Protocol):
    def connectionMade(self): self.transport.write(b"ping")
    def dataReceived(self, data):
        got.append(data); reactor.stop()
port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
reactor.connectTCP("127.0.0.1", port.getHost().port, ClientFactory.forProtocol(Client))
reactor.callLater(10, reactor.stop)
reactor.run()
print(json.dumps({"same": installed is reactor, "reactor": type(reactor).__name__, "got": b"".join(got).decode()}))
"""
    assert _reactor_in_subprocess(code) == {"same": True, "reactor": "LeanEPollReactor", "got": "ping"}


def test_twistd_offers_the_lean_reactor_by_name():
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
         "--help-reactors"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert "paddler-lean" in result.stdout, result.stdout + result.stderr
