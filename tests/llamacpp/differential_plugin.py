"""A pytest plugin for llama.cpp's own server tests (``tools/server/tests``), loaded by
L{tests.llamacpp.differential} with ``-p differential_plugin``; not a paddler test module.

It patches ``utils.ServerProcess``, the one place those tests start and reach a server:

- every model the tests would download (``--hf-repo``, ``--model-url``, a draft
  model) is the tiny model built beside the cached llama-server
  (``PADDLER_DIFF_MODEL``): nothing can be downloaded here;
- each server gets a free port (the tests default to 8080 for all);
- in mode ``paddler1`` / ``paddler2`` (``PADDLER_DIFF_MODE``) the llama-server
  (one, or two started alike) listens on a hidden port, and the test's
  ``server_port`` becomes the proxy port of a ``paddler balancer`` that has
  the server(s) as its upstream(s): every request of the test, its
  ``requests``, ``OpenAI`` clients and raw sockets alike, goes through
  paddler. Balancers are kept for the session (a Python process start costs
  seconds on a loaded machine) and the servers are registered and removed
  through the management API, as an operator's tooling would; a test that
  asks for other addresses than 127.0.0.1 gets balancers of its own on them
  (started with ``--upstream``). With the server's ``--api-key`` the
  balancer gets it as the upstream's ``api_key`` (or ``--llamacpp-api-key``),
  the key of its probes, as an operator would configure it.
  ``PADDLER_DIFF_PADDLER_ARGS`` adds flags.
- ``ServerPreset.load_all`` (the model download of the session) does nothing.

With ``PADDLER_DIFF_ONLY`` (a file of node ids, one a line) only those tests run: the
runner passes the ones that passed directly.

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


def _request(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int | None, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"null")
        except ValueError:
            return error.code, None
    except (OSError, ValueError):
        return None, None


class Balancer:
    """One ``paddler balancer`` process: its proxy port, its management API."""

    def __init__(self, host: str, port: int, upstreams: list[str] = (), api_key: str | None = None) -> None:
        self.host, self.port = host, port
        management = _free_port()
        self.management = f"http://127.0.0.1:{management}"
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
        self.log = open(LOG_DIR / f"balancer-{port}.log", "ab")
        env = dict(os.environ, PYTHONPATH=str(PADDLER_ROOT), PYTHONUNBUFFERED="1")
        for variable in ("PADDLER_CONFIG", "PADDLER_UPSTREAMS", "PADDLER_LLAMACPP_API_KEY"):
            env.pop(variable, None)
        self.process = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=str(PADDLER_ROOT), start_new_session=True,
        )
        deadline = time.monotonic() + BALANCER_READY
        while _request("GET", self.management + "/api/v1/upstreams", timeout=2.0)[0] != 200:
            if self.process.poll() is not None:
                raise RuntimeError(f"paddler balancer exited with {self.process.returncode} at start")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"paddler balancer not listening within {BALANCER_READY:.0f} s")
            time.sleep(0.02)

    def note(self, text: str) -> None:
        """A line in the balancer's log saying which test comes now."""
        self.log.write(f"==== {text}\n".encode())
        self.log.flush()

    def register(self, url: str, api_key: str | None) -> None:
        body = {"url": url, "name": url.rsplit(":", 1)[1]}
        if api_key:
            body["api_key"] = api_key
        status, answer = _request("POST", self.management + "/api/v1/upstreams", body)
        if status not in (200, 201):
            raise RuntimeError(f"paddler refused to register {url}: {status} {answer}")

    def remove(self, url: str) -> None:
        _request("DELETE", self.management + "/api/v1/upstreams/" + url.rsplit(":", 1)[1] + "?force=1")

    def wait_probed(self, count: int) -> None:
        """Until each of the C{count} upstreams is healthy or a probe of it failed (what a client meets)."""
        deadline = time.monotonic() + PROBED
        while time.monotonic() < deadline:
            _, body = _request("GET", self.management + "/api/v1/upstreams", timeout=2.0)
            upstreams = body.get("upstreams") if isinstance(body, dict) else None
            if isinstance(upstreams, list) and len(upstreams) == count and all(
                isinstance(u, dict) and (u.get("state") == "healthy" or u.get("consecutive_failures"))
                for u in upstreams
            ):
                return
            time.sleep(0.02)

    def stop(self) -> None:
        _stop(self.process)
        self.log.close()


#: Balancers on 127.0.0.1 with no upstream, ready for the next server (last released first, so
#: that a test that stops and starts its server again gets the same port).
_idle: list[Balancer] = []
_all: list[Balancer] = []


class Front:
    """What is in front of one test server: a balancer (one of the idle ones, with the server(s)
    registered through its management API; one started for the test when the test asks for
    other addresses than 127.0.0.1), and the second server of ``paddler2``."""

    def __init__(self) -> None:
        self.shared: Balancer | None = None
        self.own: list[Balancer] = []
        self.upstreams: list[str] = []
        self.twins: list[Any] = []

    def start(self, hosts: list[str], preferred_port: int, upstreams: list[str], api_key: str | None) -> int:
        """Put a balancer in front of C{upstreams}; return the port the test's client uses."""
        self.upstreams = upstreams
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        if hosts == ["127.0.0.1"]:
            reused = next((b for b in _idle if b.port == preferred_port), None) or (_idle[-1] if _idle else None)
            if reused is not None and reused.process.poll() is None:
                _idle.remove(reused)
                self.shared = reused
            else:
                if reused is not None:
                    _idle.remove(reused)
                self.shared = Balancer("127.0.0.1", _free_port())
                _all.append(self.shared)
            self.shared.note(test)
            for url in upstreams:
                self.shared.register(url, api_key)
            self.shared.wait_probed(len(upstreams))
            return self.shared.port
        port = preferred_port
        for host in hosts:
            balancer = Balancer(host, port, upstreams, api_key)
            balancer.note(test)
            self.own.append(balancer)
            balancer.wait_probed(len(upstreams))
        return port

    def stop(self, stop_server: Any) -> None:
        for balancer in self.own:
            balancer.stop()
        if self.shared is not None:
            for url in self.upstreams:
                self.shared.remove(url)
            _idle.append(self.shared)
        for twin in self.twins:
            stop_server(twin)
        self.shared, self.own, self.upstreams, self.twins = None, [], [], []


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
        self.server_port = front.start(hosts, self.server_port, upstreams, self.api_key)

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


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    only = os.environ.get("PADDLER_DIFF_ONLY")
    if not only:
        return
    wanted = set(Path(only).read_text().splitlines())
    kept = [item for item in items if item.nodeid in wanted]
    dropped = [item for item in items if item.nodeid not in wanted]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


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


def _write_report(finished: bool) -> None:
    path = os.environ.get("PADDLER_DIFF_REPORT")
    if path:
        partial = Path(path + ".partial")
        partial.write_text(json.dumps({"mode": MODE, "finished": finished, "tests": _results}, indent=1))
        partial.replace(path)


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    _write_report(False)  # so that an interrupted run still says what ran (in order)


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    for balancer in _all:
        balancer.stop()
    _write_report(True)
