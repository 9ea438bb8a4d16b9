"""``--workers N``: N balancer processes on one host, sharing the proxy port and the fleet.

Python runs one core per process. With ``--workers N`` the ``paddler
balancer`` process (worker 0) starts N-1 more processes of itself; each
binds the proxy port with C{SO_REUSEPORT}, so the kernel spreads new
connections over them, and all of them share the fleet's slots, leases and
buffer through ``--state`` (Redis): slot accounting stays exact and the
buffer stays one FIFO. Worker i serves the management API on the management
port + i (scrape each of them; the fleet figures are the same on all).

Worker 0 supervises the others: one that exits unexpectedly is started
again (after 1 s, doubling up to 30 s while it keeps failing; a worker that
ran for L{STEADY} seconds or more before it ended starts the count afresh
at 1 s); stopping worker 0 (SIGTERM) stops every worker gracefully and
waits for them.

Reloads act on every worker: SIGHUP on worker 0 reloads it and sends
SIGUSR1 to every other worker, which reloads on it; SIGHUP on any other
worker is passed to worker 0 (its parent, named in C{PADDLER_SUPERVISOR_PID}),
so every worker reloads whichever process got the signal.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from paddler.server.listeners import LISTEN_BACKLOG, ListenFailed, ListeningService, endpoint_fields


def reuse_port_endpoint(description: str) -> tuple[str, int, int] | None:
    """C{(interface, port, backlog)} of a plain C{tcp:} endpoint string, or C{None} for other kinds."""
    fields = endpoint_fields(description.strip())
    if fields[0].lower() not in ("tcp", "tcp6"):
        return None
    interface, port, backlog = "", None, LISTEN_BACKLOG
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if not sep:
            port = int(key)
        elif key == "port":
            port = int(value)
        elif key == "interface":
            interface = value
        elif key == "backlog":
            backlog = int(value)
    if port is None:
        return None
    return interface, port, backlog


def with_port(description: str, port: int) -> str:
    """C{description} (a tcp endpoint string) listening on C{port} instead."""
    interface, _, backlog = reuse_port_endpoint(description) or ("", 0, LISTEN_BACKLOG)
    kind = endpoint_fields(description.strip())[0].lower()
    parts = [kind, str(port)]
    if interface:
        parts.append("interface=" + interface.replace(":", "\\:"))
    parts.append(f"backlog={backlog}")
    return ":".join(parts)


class ReusePortListeningService(ListeningService):
    """A tcp listener bound with C{SO_REUSEPORT}, so several processes can accept on one port."""

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        parsed = reuse_port_endpoint(self.description)
        if parsed is None:
            raise ListenFailed(f"{self.what}: --workers needs a tcp: endpoint, got {self.description!r}")
        interface, port, backlog = parsed
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
            sock.listen(backlog)
            sock.setblocking(False)
            listening: IListeningPort = self.reactor.adoptStreamPort(sock.fileno(), family, self.factory)
        except OSError as e:
            raise ListenFailed(f"{self.what} cannot listen on {self.description}: {e.strerror or e}") from None
        finally:
            sock.close()  # the reactor holds its own duplicate of the descriptor
        self._listening(listening)


#: Seconds a worker must run for its restart backoff to start again from 1 s.
STEADY = 60.0
#: The environment variable that tells a worker its supervisor's pid.
SUPERVISOR_PID = "PADDLER_SUPERVISOR_PID"


def forward_reload_to_supervisor(environ: Any = os.environ) -> bool:
    """
    On a worker: pass a SIGHUP on to worker 0 (which reloads every worker);
    return whether it was passed (False when this process is not a worker of
    a living supervisor: then it reloads on its own).
    """
    pid = environ.get(SUPERVISOR_PID, "")
    if not pid.isdigit() or int(pid) != os.getppid():
        return False
    try:
        os.kill(int(pid), signal.SIGHUP)
    except OSError:
        return False
    return True


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor.worker_ended(self.index, reason)


class WorkerSupervisor(Service):
    """Starts workers 1..N-1 of this balancer and keeps them running (see the module docstring)."""

    log = Logger()

    def __init__(self, reactor: Any, argv: Sequence[str], workers: int, stop_timeout: float) -> None:
        self.reactor = reactor
        self.argv = list(argv)
        self.workers = workers
        self.stop_timeout = stop_timeout
        self.processes: dict[int, tuple[Any, _WorkerProtocol]] = {}
        self._backoff: dict[int, float] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._started_at: dict[int, float] = {}
        self.stopping = False

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.workers):
            self._start(index)

    def _start(self, index: int) -> None:
        self._restarts.pop(index, None)
        protocol = _WorkerProtocol(self, index)
        args = [sys.executable, "-m", "paddler", *self.argv, "--worker-index", str(index)]
        env = {**os.environ, SUPERVISOR_PID: str(os.getpid())}
        transport = self.reactor.spawnProcess(
            protocol, sys.executable, args, env=env, childFDs={0: "w", 1: 1, 2: 2}
        )
        self.processes[index] = (transport, protocol)
        self._started_at[index] = self.reactor.seconds()
        self.log.info("worker {index} started (pid {pid})", index=index, pid=transport.pid)

    def worker_ended(self, index: int, reason: Failure) -> None:
        self.processes.pop(index, None)
        if self.stopping or not self.running:
            return
        ran = self.reactor.seconds() - self._started_at.pop(index, self.reactor.seconds())
        if ran >= STEADY:
            self._backoff.pop(index, None)  # it ran steadily: this is a new failure, not a crash loop
        delay = self._backoff.get(index, 1.0)
        self._backoff[index] = min(30.0, delay * 2)
        self.log.warn(
            "worker {index} ended unexpectedly after {ran:.1f}s ({reason}); starting it again in {delay:g}s",
            index=index,
            reason=reason.getErrorMessage(),
            delay=delay,
            ran=ran,
        )
        self._restarts[index] = self.reactor.callLater(delay, self._start, index)

    def reload_workers(self) -> int:
        """Ask every running worker to reload (SIGUSR1); return how many were asked."""
        asked = 0
        for index, (transport, _) in sorted(self.processes.items()):
            try:
                transport.signalProcess(signal.SIGUSR1)
            except Exception:  # already gone: it reads the configuration anew when it starts again
                continue
            asked += 1
        self.log.info("reload: asked {asked} workers to reload too", asked=asked)
        return asked

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        ended = []
        for transport, protocol in list(self.processes.values()):
            ended.append(protocol.ended)
            try:
                transport.signalProcess("TERM")
            except Exception:  # already gone
                continue
            kill = self.reactor.callLater(self.stop_timeout + 5.0, _kill, transport)
            protocol.ended.addBoth(_cancel, kill)
        return DeferredList(ended) if ended else succeed(None)


def _cancel(result: object, call: IDelayedCall) -> object:
    if call.active():
        call.cancel()
    return result


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess(signal.SIGKILL)
    except Exception:
        pass
