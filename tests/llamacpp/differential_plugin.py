"""A pytest plugin for llama.cpp's own server tests (``tools/server/tests``), loaded by
L{tests.llamacpp.differential} with ``-p differential_plugin``; not a paddler test module.

It patches ``utils.ServerProcess``, the one place those tests start and reach a server:

- every model the tests would download (``--hf-repo``, ``--model-url``, a draft
  model) is the tiny model built beside the cached llama-server
  (``PADDLER_DIFF_MODEL``): nothing can be downloaded here;
- each server gets a free port (the tests default to 8080 for all);
- in mode ``paddler1`` / ``paddler2`` (``PADDLER_DIFF_MODE``) the llama-server
  (one, or two started alike) listens on a hidden port and a ``paddler
  balancer`` listens on the port and address(es) the test asked for, with the
  server(s) as its upstream(s): every request of the test, its ``requests``,
  ``OpenAI`` clients and raw sockets alike, goes through paddler. With the
  server's ``--api-key`` the balancer gets it as ``--llamacpp-api-key``, as an
  operator would configure it. ``PADDLER_DIFF_PADDLER_ARGS`` adds flags.
- ``ServerPreset.load_all`` (the model download of the session) does nothing.

What every test did is written as JSON to ``PADDLER_DIFF_REPORT``:
``{node id: {"outcome": passed|failed|skipped, "duration": s, "message": ...}}``.

Modules the tests import that are missing here are replaced by minimal
stand-ins: ``wget`` (its download fails: there is no network) and ``filelock``
(an ``fcntl`` lock).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MODE = os.environ.get("PADDLER_DIFF_MODE", "direct")
MODES = ("direct", "paddler1", "paddler2")
#: The paddler checkout whose balancer goes in front (PYTHONPATH of the balancer processes).
PADDLER_ROOT = Path(os.environ.get("PADDLER_DIFF_ROOT", Path(__file__).resolve().parents[2]))
PADDLER_PYTHON = os.environ.get("PADDLER_DIFF_PYTHON", sys.executable)
LOG_DIR = Path(os.environ.get("PADDLER_DIFF_LOGS", "paddler-logs"))
#: Seconds a balancer may take to listen; then up to PROBED more until each upstream was probed.
BALANCER_READY = 20.0
PROBED = 5.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- stand-ins for modules this environment lacks ------------------------------------------


def _install_stand_ins() -> None:
    try:
        import wget  # noqa: F401
    except ImportError:
        wget = types.ModuleType("wget")

        def download(url: str, out: str | None = None, bar: Any = None) -> str:
            raise OSError(f"cannot download {url}: no network here (paddler differential run)")

        wget.download = download  # type: ignore[attr-defined]
        sys.modules["wget"] = wget
    try:
        import filelock  # noqa: F401
    except ImportError:
        import fcntl

        filelock = types.ModuleType("filelock")

        class FileLock:
            def __init__(self, path: str) -> None:
                self.path = path
                self._file: Any = None

            def __enter__(self) -> FileLock:
                self._file = open(self.path, "a")
                fcntl.flock(self._file, fcntl.LOCK_EX)
                return self

            def __exit__(self, *exc: object) -> None:
                fcntl.flock(self._file, fcntl.LOCK_UN)
                self._file.close()

        filelock.FileLock = FileLock  # type: ignore[attr-defined]
        sys.modules["filelock"] = filelock


# -- paddler in front ----------------------------------------------------------------------


def _get(url: str, headers: dict[str, str]) -> tuple[int | None, Any]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=2.0) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"null")
        except ValueError:
            return error.code, None
    except (OSError, ValueError):
        return None, None


class Front:
    """The balancer process(es) in front of one test server, and the second server of ``paddler2``."""

    def __init__(self) -> None:
        self.balancers: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        self.twins: list[Any] = []

    def start_balancer(self, host: str, port: int, upstreams: list[str], api_key: str | None) -> None:
        management = _free_port()
        listen = f"tcp6:{port}:interface=" + host.replace(":", "\\:") if ":" in host else f"tcp:{port}:interface={host}"
        argv = [
            PADDLER_PYTHON, "-m", "paddler", "balancer",
            "--listen", listen,
            "--management-listen", f"tcp:{management}:interface=127.0.0.1",
            "--shutdown-timeout", "2",
            "--no-dashboard",
        ]
        for url in upstreams:
            argv += ["--upstream", url]
        if api_key:
            argv += ["--llamacpp-api-key", api_key]
        argv += shlex.split(os.environ.get("PADDLER_DIFF_PADDLER_ARGS", ""))
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        test = os.environ.get("PYTEST_CURRENT_TEST", "session").split(" ")[0]
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in test)[-120:]
        log = open(LOG_DIR / f"{name}-{port}-{len(self.balancers)}.log", "ab")
        env = dict(os.environ, PYTHONPATH=str(PADDLER_ROOT), PYTHONUNBUFFERED="1")
        for variable in ("PADDLER_CONFIG", "PADDLER_UPSTREAMS", "PADDLER_LLAMACPP_API_KEY"):
            env.pop(variable, None)
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=str(PADDLER_ROOT), start_new_session=True,
        )
        self.balancers.append(process)
        self.logs.append(log)
        self._wait_ready(process, f"http://127.0.0.1:{management}", len(upstreams))

    def _wait_ready(self, process: subprocess.Popen, management: str, count: int) -> None:
        """Until the balancer listens and has probed every upstream (healthy, or a failed probe)."""
        deadline = time.monotonic() + BALANCER_READY
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"paddler balancer exited with {process.returncode} at start")
            status, body = _get(management + "/api/v1/upstreams", {})
            if status == 200:
                break
            time.sleep(0.02)
        else:
            raise TimeoutError(f"paddler balancer not listening within {BALANCER_READY:.0f} s")
        deadline = time.monotonic() + PROBED
        while time.monotonic() < deadline:
            status, body = _get(management + "/api/v1/upstreams", {})
            upstreams = body.get("upstreams", body) if isinstance(body, dict) else body
            if isinstance(upstreams, list) and len(upstreams) == count:
                # healthy, or a probe answered with a failure: what a client meets from now on
                if all(
                    isinstance(u, dict) and (u.get("state") == "healthy" or u.get("consecutive_failures"))
                    for u in upstreams
                ):
                    return
            time.sleep(0.02)

    def stop(self, stop_server: Any) -> None:
        for process in self.balancers:
            _stop(process)
        for log in self.logs:
            log.close()
        for twin in self.twins:
            stop_server(twin)
        self.balancers, self.logs, self.twins = [], [], []


def _stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
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


def _patch(utils: Any) -> None:
    server_process = utils.ServerProcess
    original_init = server_process.__init__
    original_start = server_process.start
    original_stop = server_process.stop
    model = os.environ["PADDLER_DIFF_MODEL"]

    def __init__(self: Any) -> None:
        original_init(self)
        if "PORT" not in os.environ:
            self.server_port = _free_port()
        self._paddler_front = None

    def use_tiny_model(self: Any) -> None:
        if self.model_hf_repo or self.model_hf_file or self.model_url:
            self.model_hf_repo = self.model_hf_file = self.model_url = None
            self.model_file = model
        if self.model_draft:
            self.model_draft = model

    def start(self: Any, *args: Any, **kwargs: Any) -> None:
        use_tiny_model(self)
        if MODE == "direct" or self.external_server:
            return original_start(self, *args, **kwargs)
        front = self._paddler_front = Front()
        hosts = [h.strip() for h in self.server_host.split(",") if h.strip()]
        public = (self.server_host, self.server_port)
        upstreams = []
        try:
            self.server_host, self.server_port = "127.0.0.1", _free_port()
            original_start(self, *args, **kwargs)
            upstreams.append(f"http://127.0.0.1:{self.server_port}")
            if MODE == "paddler2":
                twin = copy.copy(self)
                twin.process = None
                twin._paddler_front = None
                twin.server_port = _free_port()
                if self.log_path:
                    twin.log_path = self.log_path + ".second"
                front.twins.append(twin)
                original_start(twin, *args, **kwargs)
                upstreams.append(f"http://127.0.0.1:{twin.server_port}")
        finally:
            self.server_host, self.server_port = public
        for host in hosts:
            front.start_balancer(host, self.server_port, upstreams, self.api_key)

    def stop(self: Any) -> None:
        front, self._paddler_front = getattr(self, "_paddler_front", None), None
        if front is not None:
            front.stop(original_stop)
        original_stop(self)

    server_process.__init__ = __init__
    server_process.start = start
    server_process.stop = stop
    utils.ServerPreset.load_all = staticmethod(lambda: None)


# -- pytest hooks ----------------------------------------------------------------------------

# before pytest loads the suite's conftest.py, which imports filelock
_install_stand_ins()

_results: dict[str, dict[str, Any]] = {}


def pytest_configure(config: Any) -> None:
    if MODE not in MODES:
        raise ValueError(f"PADDLER_DIFF_MODE must be one of {', '.join(MODES)}, not {MODE!r}")
    import utils

    _patch(utils)


def pytest_runtest_logreport(report: Any) -> None:
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "duration": 0.0, "message": ""})
    entry["duration"] = round(entry["duration"] + report.duration, 3)
    if report.outcome == "failed" and entry["outcome"] != "failed":
        entry["outcome"] = "failed"
        text = getattr(report, "longreprtext", "") or ""
        lines = [line for line in text.splitlines() if line.startswith("E ")]
        entry["message"] = (lines[0][1:].strip() if lines else text[-300:])[:300]
        if report.when != "call":
            entry["message"] = f"({report.when}) " + entry["message"]
    elif report.outcome == "skipped" and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        longrepr = report.longrepr
        entry["message"] = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)[:300]


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get("PADDLER_DIFF_REPORT")
    if path:
        Path(path).write_text(json.dumps({"mode": MODE, "tests": _results}, indent=1, sort_keys=True))
