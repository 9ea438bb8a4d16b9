"""A real redis-server for the shared-state tests.

``redis_server`` (session) runs ``install-redis`` beside this file (quick when
redis-server is there; apt-get install otherwise; exit 3 = cannot install
here, and every test that needs Redis is skipped with that reason), then
starts ``redis-server --port <free> --bind 127.0.0.1 --save "" --appendonly
no`` in a temporary directory and stops it at the end of the session. The
``RedisServer`` helper can ``kill()`` (SIGKILL) and ``restart()`` it on the same
port mid-test. ``redis_url`` gives each test its own database-free namespace:
a fresh key prefix, so tests never see each other's keys.

These fixtures block (subprocess, sockets) outside the reactor's work.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..installers import run_installer

INSTALL_SCRIPT = Path(__file__).with_name("install-redis")
INSTALL_DEADLINE = 600.0
EXIT_ENVIRONMENT = 3
READY_DEADLINE = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1:port, in its own directory, with no persistence."""

    def __init__(self, binary: str, directory: Path, port: int | None = None, extra: list[str] | None = None) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        log = open(self.directory / f"redis-{self.starts}.log", "wb")
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--protected-mode", "no",
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.directory,
        )
        log.close()
        try:
            self.wait_ready()
        except Exception:
            self.stop()  # never leave a half-started server behind
            raise

    def wait_ready(self) -> None:
        end = time.monotonic() + READY_DEADLINE
        while time.monotonic() < end:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.directory}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64)[:1] in (b"+", b"-"):  # PONG, or NOAUTH behind a password
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {READY_DEADLINE} s")

    def kill(self) -> None:
        """SIGKILL: Redis vanishes with everything it held (no persistence)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self) -> None:
        """Start again on the same port, empty."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def command(self, *args: str) -> bytes:
        """One command with redis-cli (blocking; for test set-up and checks)."""
        result = subprocess.run(
            [os.path.join(os.path.dirname(self.binary), "redis-cli"), "-p", str(self.port), *args],
            capture_output=True,
            timeout=10,
            check=True,
        )
        return result.stdout

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """Path of a working redis-server (installed on first use)."""
    return run_installer(INSTALL_SCRIPT, INSTALL_DEADLINE)


@pytest.fixture(scope="session")
def redis_server(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server for the whole session (tests separate themselves by key prefix)."""
    server = RedisServer(redis_binary, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis(redis_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may kill, pause and restart."""
    server = RedisServer(redis_binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


_prefixes = itertools.count()


@pytest.fixture
def prefix() -> str:
    """A key prefix (one hash tag) that no other test uses."""
    return "{pdt%d-%d}" % (os.getpid(), next(_prefixes))
