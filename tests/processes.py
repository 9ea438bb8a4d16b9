"""Real paddler processes on 127.0.0.1 for end-to-end tests: free ports, start, always stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_for(predicate, deadline: float = 30.0, what: str = "condition", interval: float = 0.05) -> Any:
    """Poll C{predicate} until it returns a true value or C{deadline} seconds pass."""
    end = time.monotonic() + deadline
    last_error: Exception | None = None
    while time.monotonic() < end:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ValueError) as e:
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {deadline} s (last error: {last_error})")


class PaddlerProcess:
    """``python -m paddler ARGS`` as a child process whose output goes to a log file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "paddler", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(log_path.parent),
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        self._log.close()
        return self.process.returncode


class Processes:
    """Starts paddler processes and stops every one of them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[PaddlerProcess] = []

    def start(self, *args: str, name: str = "proc") -> PaddlerProcess:
        process = PaddlerProcess(list(args), self.tmp_path / f"{name}-{len(self.started)}.log")
        self.started.append(process)
        return process

    def simulator(self, slots: int = 4, tokens_per_second: float = 50.0, *extra: str) -> tuple[PaddlerProcess, str]:
        port = free_port()
        process = self.start(
            "simulate", "--listen", f"tcp:{port}:interface=127.0.0.1", "--slots", str(slots),
            "--tokens-per-second", str(tokens_per_second), *extra, name="simulate",
        )
        url = f"http://127.0.0.1:{port}"
        self.wait_healthy(process, url + "/health")
        return process, url

    def balancer(self, *args: str) -> tuple[PaddlerProcess, str, str]:
        port, management = free_port(), free_port()
        process = self.start(
            "balancer", "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--management-listen", f"tcp:{management}:interface=127.0.0.1", *args, name="balancer",
        )
        url = f"http://127.0.0.1:{port}"
        self.wait_healthy(process, url + "/health", any_status=True)
        return process, url, f"http://127.0.0.1:{management}"

    def wait_healthy(self, process: PaddlerProcess, url: str, any_status: bool = False, deadline: float = 30.0) -> None:
        def ready() -> bool:
            if process.process.poll() is not None:
                raise AssertionError(f"process exited early:\n{process.log()}")
            status, _ = get_json(url, timeout=2)
            return any_status or status == 200

        wait_for(ready, deadline, f"{url} answering")

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()
