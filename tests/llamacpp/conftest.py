"""Fixtures that run a real llama-server, built from the llama-cpp-python sdist.

``llama_server_binary`` (session) runs ``build-llama-server`` beside this file
once, which builds and caches the binary and a tiny model on first use
(several minutes) and answers in well under a second after that. When the
build cannot happen here (no compiler, PyPI unreachable, the vendored
llama.cpp does not compile) every test that needs it is skipped with the
script's reason; any other failure of the script is an error.

``start_llama_server`` starts servers on fresh free 127.0.0.1 ports and
always stops them at teardown; ``start_simulator`` does the same for
``paddler simulate`` subprocesses (no build needed). These fixtures block (subprocess + urllib):
they run outside the Twisted reactor, before and after the test body.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.llamacpp.clients import Streams

BUILD_SCRIPT = Path(__file__).with_name("build-llama-server")
#: The repository root, put on PYTHONPATH of the simulator processes.
ROOT = Path(__file__).resolve().parents[2]
#: Seconds the first build may take (about 7 minutes on 2 cores).
BUILD_DEADLINE = float(os.environ.get("PADDLER_LLAMA_BUILD_TIMEOUT", "2400"))
#: Seconds from spawning a server until ``/health`` must answer 200.
READY_DEADLINE = 30.0
#: Seconds between SIGTERM and SIGKILL at teardown.
STOP_GRACE = 5.0
#: Exit status of the build script for "cannot build here": skip, don't fail.
EXIT_ENVIRONMENT = 3


def _stop_group(process: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """SIGTERM the process group of ``process``, SIGKILL it after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """Path of a cached real ``llama-server``; ``tiny.gguf`` lies beside it."""
    env = dict(os.environ, PYTHON=sys.executable)
    process = subprocess.Popen(
        [str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        start_new_session=True,  # so a deadline kill reaches cmake and make too
    )
    try:
        out, err = process.communicate(timeout=BUILD_DEADLINE)
    except subprocess.TimeoutExpired:
        _stop_group(process)
        process.communicate()
        pytest.skip(f"building llama-server did not finish within {BUILD_DEADLINE:.0f} s")
    except BaseException:  # interrupted: don't leave a compiler running
        _stop_group(process)
        raise
    reason = next((line for line in reversed(err.splitlines()) if line.strip()), "")
    if process.returncode == EXIT_ENVIRONMENT:
        pytest.skip(reason or "build-llama-server cannot build here")
    if process.returncode != 0:
        pytest.fail(
            f"build-llama-server exited {process.returncode}: {reason}\n{err[-4000:]}",
            pytrace=False,
        )
    lines = out.strip().splitlines()
    binary = Path(lines[-1]) if lines else Path()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"build-llama-server printed no executable path: {out!r}", pytrace=False)
    if not binary.with_name("tiny.gguf").is_file():
        pytest.fail(f"no tiny.gguf beside {binary}", pytrace=False)
    return binary


@pytest.fixture(scope="session")
def llama_tiny_model(llama_server_binary: Path) -> Path:
    """Path of the tiny random-weight model (llama, 2 layers, width 128, ChatML)."""
    return llama_server_binary.with_name("tiny.gguf")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health_status(url: str) -> int | None:
    """HTTP status of ``GET url/health``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=1.0) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, urllib.error.URLError):
        return None


class _ServerProcesses:
    """Server processes started for one test, each on a fresh 127.0.0.1 port,
    ready (``/health`` 200) when started, and all stopped at teardown."""

    #: What the processes are called in failure messages and log file names.
    kind = "server"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._processes: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}

    def _spawn(self, argv: Sequence[str], port: int, env: dict[str, str] | None = None) -> str:
        url = f"http://127.0.0.1:{port}"
        log = self.log_dir / f"{self.kind}-{port}.log"
        with open(log, "wb") as log_file:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self._processes[url] = process
        self._logs[url] = log
        deadline = time.monotonic() + READY_DEADLINE
        while True:
            if _health_status(url) == 200:
                return url
            if process.poll() is not None:
                pytest.fail(
                    f"{self.kind} exited with {process.returncode} before it was ready:\n"
                    + self.log(url)[-3000:],
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                self.stop(url)
                pytest.fail(
                    f"{self.kind} at {url} not ready within {READY_DEADLINE:.0f} s:\n"
                    + self.log(url)[-3000:],
                    pytrace=False,
                )
            time.sleep(0.05)

    def process(self, url: str) -> subprocess.Popen:
        """The process serving ``url`` (to kill or signal it in a test)."""
        return self._processes[url]

    def log(self, url: str) -> str:
        """What the server at ``url`` has logged so far."""
        return self._logs[url].read_text(errors="replace")

    def stop(self, url: str) -> None:
        """Stop one server: SIGTERM, then SIGKILL after 5 s."""
        _stop_group(self._processes[url])

    def stop_all(self) -> None:
        for url in list(self._processes):
            self.stop(url)


class LlamaServers(_ServerProcesses):
    """Starts real llama-servers for one test and stops them all afterwards.

    Call it to start one: ``url = start_llama_server(slots=4, ctx=2048)``.
    ``ctx`` is the total context (``-c``), shared by the ``slots`` slots
    (``-np``). Each server listens on a fresh port, has ``--slots`` and
    ``--metrics`` on, and is ready (``/health`` 200) when the call returns.
    """

    kind = "llama-server"

    def __init__(self, binary: Path, model: Path, log_dir: Path) -> None:
        super().__init__(log_dir)
        self.binary = binary
        self.model = model

    def __call__(self, slots: int = 4, ctx: int = 2048, extra_args: Sequence[str] = ()) -> str:
        port = free_port()
        argv = [
            str(self.binary),
            "-m", str(self.model),
            "--host", "127.0.0.1",
            "--port", str(port),
            "-np", str(slots),
            "-c", str(ctx),
            "--slots",
            "--metrics",
            *extra_args,
        ]
        return self._spawn(argv, port)


class LlamaRouters(_ServerProcesses):
    """Starts real llama-servers in router mode for one test and stops them (and their
    model children, which share the process group) afterwards.

    ``url = start_llama_router(models=("alpha", "beta"), models_max=2, slots=2, ctx=2048,
    broken=("broken",), extra_args=())``: a ``--models-dir`` holding one copy (symlink) of
    the tiny model per name, and for each ``broken`` name a file that is not a GGUF, whose
    load fails.
    """

    kind = "llama-router"

    def __init__(self, binary: Path, model: Path, log_dir: Path) -> None:
        super().__init__(log_dir)
        self.binary = binary
        self.model = model

    def __call__(
        self,
        models: Sequence[str] = ("alpha", "beta", "gamma"),
        models_max: int = 2,
        slots: int = 2,
        ctx: int = 2048,
        broken: Sequence[str] = (),
        extra_args: Sequence[str] = (),
    ) -> str:
        port = free_port()
        models_dir = self.log_dir / f"models-{port}"
        models_dir.mkdir()
        for name in models:
            (models_dir / f"{name}.gguf").symlink_to(self.model)
        for name in broken:
            (models_dir / f"{name}.gguf").write_bytes(b"GGUF" + b"\0" * 64)
        argv = [
            str(self.binary),
            "--models-dir", str(models_dir),
            "--models-max", str(models_max),
            "--host", "127.0.0.1",
            "--port", str(port),
            "-np", str(slots),
            "-c", str(ctx),
            "-t", "1",
            "--slots",
            "--metrics",
            *extra_args,
        ]
        return self._spawn(argv, port)


class Simulators(_ServerProcesses):
    """Starts ``python -m paddler simulate`` processes for one test; stops them all afterwards.

    ``url = start_simulator(slots=4, n_ctx=2048, tokens_per_second=50.0,
    extra_args=())``: ``n_ctx`` is the context **of each slot** (the
    simulator's ``--n-ctx``), unlike ``start_llama_server``'s total ``ctx``.
    """

    kind = "simulator"

    def __call__(
        self,
        slots: int = 4,
        n_ctx: int = 2048,
        tokens_per_second: float = 50.0,
        extra_args: Sequence[str] = (),
    ) -> str:
        port = free_port()
        argv = [
            sys.executable, "-m", "paddler", "simulate",
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--slots", str(slots),
            "--n-ctx", str(n_ctx),
            "--tokens-per-second", str(tokens_per_second),
            *extra_args,
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        return self._spawn(argv, port, env)


@pytest.fixture
def start_llama_server(
    llama_server_binary: Path, llama_tiny_model: Path, tmp_path: Path
) -> Iterator[LlamaServers]:
    """Factory: ``start_llama_server(slots=4, ctx=2048, extra_args=())`` -> base URL."""
    servers = LlamaServers(llama_server_binary, llama_tiny_model, tmp_path)
    try:
        yield servers
    finally:
        servers.stop_all()


@pytest.fixture
def start_llama_router(
    llama_server_binary: Path, llama_tiny_model: Path, tmp_path: Path
) -> Iterator[LlamaRouters]:
    """Factory: ``start_llama_router(models=..., models_max=2, slots=2, ...)`` -> base URL of
    a real llama-server in router mode, stopped with its model children at teardown."""
    routers = LlamaRouters(llama_server_binary, llama_tiny_model, tmp_path)
    try:
        yield routers
    finally:
        routers.stop_all()


@pytest.fixture
def start_simulator(tmp_path: Path) -> Iterator[Simulators]:
    """Factory: ``start_simulator(slots=4, n_ctx=2048, tokens_per_second=50.0, extra_args=())``
    -> base URL of a ``paddler simulate`` subprocess, stopped at teardown."""
    simulators = Simulators(tmp_path)
    try:
        yield simulators
    finally:
        simulators.stop_all()


@pytest.fixture
def open_stream() -> Iterator[Streams]:
    """Factory: ``open_stream(url, path, body, read=True)`` -> a streaming request
    (``tests.llamacpp.clients.Stream``) read by a helper thread; all closed at teardown."""
    streams = Streams()
    try:
        yield streams
    finally:
        streams.close_all()
