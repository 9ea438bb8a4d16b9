"""The --workers supervisor: its restart backoff starts afresh after a worker ran steadily (60 s),
and a reload reaches every worker (SIGUSR1 from worker 0; SIGHUP on a worker goes to worker 0)."""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from paddler.balancer.workers import STEADY, SUPERVISOR_PID, WorkerSupervisor, forward_reload_to_supervisor


class FakeTransport:
    def __init__(self, pid: int, protocol: Any) -> None:
        self.pid = pid
        self.protocol = protocol
        self.signals: list[Any] = []

    def signalProcess(self, name: Any) -> None:
        self.signals.append(name)
        if name == "TERM":  # the worker stops gracefully
            self.protocol.processEnded(Failure(ProcessTerminated(exitCode=0)))


class ProcessReactor(Clock):
    """A Clock that records spawnProcess calls (the workers) instead of starting processes."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, FakeTransport, dict[str, str]]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str],
                     childFDs: Any = None) -> FakeTransport:
        transport = FakeTransport(1000 + len(self.spawned), protocol)
        self.spawned.append((protocol, transport, env))
        return transport


def crash(reactor: ProcessReactor, index: int) -> None:
    protocol = [p for p, _, _ in reactor.spawned if p.index == index][-1]
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))


def restart_delay(reactor: ProcessReactor) -> float:
    (call,) = reactor.getDelayedCalls()
    return call.getTime() - reactor.seconds()


def test_the_restart_backoff_doubles_in_a_crash_loop_and_resets_after_a_steady_run():
    """Crashes at once: 1, 2, 4 s; a crash after 60 s of running: 1 s again (it was 30 s forever)."""
    reactor = ProcessReactor()
    supervisor = WorkerSupervisor(reactor, ["balancer"], workers=3, stop_timeout=1.0)
    supervisor.startService()
    assert len(reactor.spawned) == 2
    delays = []
    for _ in range(3):
        crash(reactor, 1)
        delays.append(restart_delay(reactor))
        reactor.advance(delays[-1])
    assert delays == [1.0, 2.0, 4.0]
    reactor.advance(STEADY)  # worker 1 has now run for a minute
    crash(reactor, 1)
    assert restart_delay(reactor) == 1.0
    reactor.advance(1.0)
    reactor.advance(STEADY - 1)  # not quite steady: the count goes on
    crash(reactor, 1)
    assert restart_delay(reactor) == 2.0
    reactor.advance(2.0)
    # worker 2 has its own count, untouched by worker 1's crashes
    crash(reactor, 2)
    assert restart_delay(reactor) == 1.0
    reactor.advance(1.0)
    supervisor.stopService()
    assert reactor.getDelayedCalls() == []


def test_a_reload_asks_every_running_worker_and_workers_know_their_supervisor():
    """reload_workers sends SIGUSR1 to workers 1 and 2; each was started with PADDLER_SUPERVISOR_PID."""
    reactor = ProcessReactor()
    supervisor = WorkerSupervisor(reactor, ["balancer"], workers=3, stop_timeout=1.0)
    supervisor.startService()
    assert supervisor.reload_workers() == 2
    assert [t.signals for _, t, _ in reactor.spawned] == [[signal.SIGUSR1], [signal.SIGUSR1]]
    assert all(env[SUPERVISOR_PID] == str(os.getpid()) for _, _, env in reactor.spawned)
    crash(reactor, 2)  # a worker that is down is not asked (it reads the new configuration as it starts)
    assert supervisor.reload_workers() == 1
    supervisor.stopService()


def test_sighup_on_a_worker_goes_to_its_supervisor_only(monkeypatch):
    """A worker passes SIGHUP to its parent when the parent is its supervisor; else it reloads alone."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append((pid, signum)))
    parent = os.getppid()
    assert forward_reload_to_supervisor({SUPERVISOR_PID: str(parent)}) is True
    assert sent == [(parent, signal.SIGHUP)]
    assert forward_reload_to_supervisor({SUPERVISOR_PID: str(parent + 1)}) is False  # not its parent
    assert forward_reload_to_supervisor({}) is False
    assert sent == [(parent, signal.SIGHUP)]
