"""The chaos harness: real paddler processes on 127.0.0.1, clients that account for every request,
and what the balancer process holds (descriptors, memory), read from /proc.

Everything is bounded and stops itself: every request has a deadline, every
phase a duration, every process is stopped by the ``procs`` fixture.

``PADDLER_CHAOS=long`` selects the long form (``bench/run chaos``); the
default is the short form that runs in the test suite. With
``PADDLER_CHAOS_REPORT=FILE`` each test appends its figures to FILE as one
JSON line.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..processes import PaddlerProcess, Processes, free_port, get_json, wait_for

LONG = os.environ.get("PADDLER_CHAOS", "short") == "long"


def scaled(short: Any, long: Any) -> Any:
    """C{long} in the long form, C{short} otherwise."""
    return long if LONG else short


def report(test: str, **figures: Any) -> None:
    """Append C{figures} of C{test} to the report file (when one is set)."""
    path = os.environ.get("PADDLER_CHAOS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "form": "long" if LONG else "short", **figures}) + "\n")


# -- the balancer process as the kernel sees it ----------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _sockets() -> dict[str, tuple[int, int, str]]:
    """Every TCP socket of this host by inode: (local port, remote port, state as hex)."""
    table: dict[str, tuple[int, int, str]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                    table[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
        except OSError:
            continue
    return table


def held(pid: int, listen_ports: set[int]) -> dict[str, int]:
    """What a process holds: C{clients} (connections accepted on C{listen_ports}), C{outbound}
    (other TCP connections: upstreams, pools), C{other} (files, listeners, the reactor's own)."""
    table = _sockets()
    counts = {"clients": 0, "outbound": 0, "other": 0}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            entry = table.get(target[8:-1])
            if entry is not None and entry[2] != "0A":  # not a listening socket
                counts["clients" if entry[0] in listen_ports else "outbound"] += 1
                continue
        counts["other"] += 1
    return counts


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


_PROBLEM = re.compile(r"Traceback|#critical\]|#error\]|Unhandled [Ee]rror|CRITICAL")


def log_problems(text: str) -> list[str]:
    """Lines of a paddler log that show a traceback, a critical or an error-level event."""
    return [line for line in text.splitlines() if _PROBLEM.search(line)]


class Sampler:
    """Samples a process's descriptors and memory every C{interval} seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.fds: list[int] = []
        self.rss: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.fds.append(open_fds(self.pid))
                self.rss.append(rss_mib(self.pid))
            except OSError:
                return


# -- processes -----------------------------------------------------------------------


@dataclass
class Simulated:
    """A ``paddler simulate`` process on a fixed port, restartable (after kill -9) on that port."""

    procs: Processes
    port: int
    slots: int
    speed: float
    process: PaddlerProcess | None = None
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, speed: float | None = None) -> None:
        if speed is not None:
            self.speed = speed
        self.process = self.procs.start(
            "simulate", "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--slots", str(self.slots),
            "--tokens-per-second", str(self.speed), "--prompt-tokens-per-second", "200000",
            name=f"simulate-{self.port}",
        )
        self.stopped = False

    def wait_up(self) -> None:
        assert self.process is not None
        self.procs.wait_healthy(self.process, self.url + "/health")

    def alive(self) -> bool:
        return self.process is not None and self.process.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        try:
            os.kill(self.process.process.pid, signum)
        except ProcessLookupError:
            pass
        if signum == signal.SIGKILL:
            self.process.process.wait(10)
        self.stopped = signum == signal.SIGSTOP

    def busy(self) -> int:
        status, slots = get_json(self.url + "/slots")
        return sum(bool(s["is_processing"]) for s in slots)


@dataclass
class AgentProc:
    """A ``paddler agent`` reporting one simulator to the balancer; restartable."""

    procs: Processes
    sim: Simulated
    management: str
    name: str
    process: PaddlerProcess | None = None

    def start(self) -> None:
        self.process = self.procs.start(
            "agent", "--llamacpp", self.sim.url, "--balancer", self.management, "--name", self.name,
            "--interval", "0.25", "--timeout", "1", "--max-backoff", "1", "--drain-timeout", "3",
            name=f"agent-{self.name}",
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        try:
            os.kill(self.process.process.pid, signum)
        except ProcessLookupError:
            pass


def start_balancer(procs: Processes, *args: str, port: int | None = None,
                   management_port: int | None = None) -> tuple[PaddlerProcess, str, str]:
    """A balancer on free (or given) loopback ports; returns (process, proxy URL, management URL)."""
    port = port or free_port()
    management_port = management_port or free_port()
    process = procs.start(
        "balancer", "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--management-listen", f"tcp:{management_port}:interface=127.0.0.1", *args, name="balancer",
    )
    url = f"http://127.0.0.1:{port}"
    procs.wait_healthy(process, url + "/health", any_status=True)
    return process, url, f"http://127.0.0.1:{management_port}"


def upstreams(management: str) -> list[dict[str, Any]]:
    return get_json(management + "/api/v1/upstreams")[1]["upstreams"]


# -- clients that account for every request ----------------------------------------------


@dataclass
class Outcome:
    """What became of one request.

    C{kind}: C{completed} (2xx, whole body), C{json_error} (an error status
    with a JSON error body), C{broken} (a 200 stream that ended early),
    C{bad_error} (an error without a JSON body), C{no_answer} (the
    connection closed or failed before a status line), C{hung} (no end
    within the client's deadline).
    """

    kind: str
    status: int = 0
    detail: str = ""
    seconds: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None


def call(base: str, method: str, path: str, payload: Any = None, stream: bool = False,
         timeout: float = 30.0, headers: dict[str, str] | None = None) -> Outcome:
    """One request on its own connection, classified (see L{Outcome})."""
    parts = urlsplit(base)
    started = time.monotonic()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    body = None if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    sent_headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        try:
            conn.request(method, path, body, sent_headers)
            response = conn.getresponse()
        except socket.timeout:
            return Outcome("hung", detail="no status line", seconds=time.monotonic() - started)
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            return Outcome("no_answer", detail=repr(e), seconds=time.monotonic() - started)
        status = response.status
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
        try:
            data = response.read()
        except socket.timeout:
            return Outcome("hung", status, "body never ended", time.monotonic() - started, answer_headers)
        except (http.client.IncompleteRead, ConnectionError, OSError) as e:
            return Outcome("broken", status, repr(e)[:200], time.monotonic() - started, answer_headers)
        seconds = time.monotonic() - started
        if status >= 400:
            try:
                parsed = json.loads(data)
                message = parsed["error"]["message"]
            except (ValueError, KeyError, TypeError):
                return Outcome("bad_error", status, data[:200].decode("latin-1"), seconds, answer_headers)
            return Outcome("json_error", status, message, seconds, answer_headers, parsed)
        if stream:
            complete = b"data: [DONE]" in data
            return Outcome("completed" if complete else "broken", status, "" if complete else "no [DONE]",
                           seconds, answer_headers)
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            return Outcome("broken", status, "truncated JSON", seconds, answer_headers)
        return Outcome("completed", status, "", seconds, answer_headers, parsed)
    finally:
        conn.close()


def chat(base: str, tokens: int, stream: bool, timeout: float = 30.0, prompt: str = "hello") -> Outcome:
    payload = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "stream": stream}
    return call(base, "POST", "/v1/chat/completions", payload, stream=stream, timeout=timeout)


class Load:
    """C{threads} clients sending a mix of requests until stopped; every outcome is kept."""

    def __init__(self, base: str, threads: int, seed: int = 1, timeout: float = 30.0,
                 mix: Callable[[random.Random, str], Outcome] | None = None) -> None:
        self.base = base
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._mix = mix or self.default_mix
        self._threads = [
            threading.Thread(target=self._run, args=(random.Random(seed * 1000 + i),), daemon=True)
            for i in range(threads)
        ]

    def default_mix(self, rng: random.Random, base: str) -> Outcome:
        roll = rng.random()
        if roll < 0.55:
            return chat(base, rng.randint(4, 24), True, self.timeout, f"q{rng.random()}")
        if roll < 0.85:
            return call(base, "POST", "/completion", {"prompt": f"p{rng.random()}", "n_predict": rng.randint(2, 12)},
                        timeout=self.timeout)
        if roll < 0.95:
            return call(base, "GET", "/v1/models", timeout=self.timeout)
        return call(base, "GET", "/health", timeout=self.timeout)

    def _run(self, rng: random.Random) -> None:
        while not self._stop.is_set():
            outcome = self._mix(rng, self.base)
            with self._lock:
                self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
            assert not thread.is_alive(), "a client did not end within its deadline"

    def counts(self) -> Counter[str]:
        return Counter(o.kind for o in self.outcomes)

    def statuses(self) -> Counter[int]:
        return Counter(o.status for o in self.outcomes)


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    kinds = Counter(o.kind for o in outcomes)
    statuses = Counter(o.status for o in outcomes)
    errors = Counter(f"{o.status} {o.body['error'].get('type')}" for o in outcomes if o.kind == "json_error")
    return {"requests": len(outcomes), "kinds": dict(kinds), "statuses": {str(k): v for k, v in statuses.items()},
            "errors": dict(errors)}


def raw_exchange(host: str, port: int, data: bytes, timeout: float = 3.0,
                 half_close: bool = False) -> tuple[bytes, bool]:
    """Send C{data} on a new connection (then a FIN, with C{half_close}); return what came back
    (up to the end of the first whole response) and whether the server closed in time."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except ConnectionError:
            pass  # answered and closed early: read what came
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                return received, False
            except ConnectionError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
            if response_complete(received, head=data[:5].upper() == b"HEAD "):
                return received, True
        return received, False


def response_complete(data: bytes, head: bool = False) -> bool:
    """Whether C{data} holds at least one whole HTTP response (Content-Length or chunked; a
    response to HEAD ends with its headers)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ")[1])
    except (IndexError, ValueError):
        return False
    if status == 100:
        return response_complete(rest, head)
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if head or status in (204, 304) or 100 <= status < 200:
        return True
    if b"content-length" in fields:
        return len(rest) >= int(fields[b"content-length"])
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        return rest.endswith(b"0\r\n\r\n")
    return False


def parse_response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, headers and body (chunked decoded) of the first response in C{data}."""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    if status == 100:
        return parse_response(rest)
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                break
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
        return status, fields, body
    if b"content-length" in fields:
        return status, fields, rest[: int(fields[b"content-length"])]
    return status, fields, rest


def threads_of(calls: list[Callable[[], Any]]) -> Iterator[Any]:
    """Run C{calls} in parallel threads; yield their results in order."""
    results: list[Any] = [None] * len(calls)

    def run(i: int, fn: Callable[[], Any]) -> None:
        results[i] = fn()

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    yield from results


__all__ = [
    "LONG", "AgentProc", "Load", "held", "Outcome", "Sampler", "Simulated", "call", "chat", "log_problems", "open_fds",
    "parse_response", "raw_exchange", "report", "rss_mib", "scaled", "start_balancer", "summary", "threads_of",
    "upstreams", "wait_for", "free_port", "get_json",
]


class LyingAgent:
    """
    A script with a real agent token that lies: it registers one simulator and reports it with
    C{claimed} idle slots out of C{claimed}, every C{every} seconds, in a thread. Meanwhile it
    tries to register the balancer's own proxy port under other spellings (each must be 400).
    """

    def __init__(self, management: str, sim: Simulated, proxy_port: int, claimed: int = 50,
                 every: float = 0.05) -> None:
        self.management = management
        self.sim = sim
        self.proxy_port = proxy_port
        self.claimed = claimed
        self.every = every
        self.statuses: Counter[int] = Counter()
        self.alias_statuses: Counter[int] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.token: str | None = None

    def register(self) -> None:
        answer = call(self.management, "POST", "/api/v1/agents",
                      {"agent_id": "liar", "name": "liar", "url": self.sim.url})
        assert answer.status == 201, answer
        self.token = answer.body["agent_token"]

    def __enter__(self) -> LyingAgent:
        self.register()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        aliases = [f"http://127.1:{self.proxy_port}", f"http://[::ffff:127.0.0.1]:{self.proxy_port}",
                   f"http://2130706433:{self.proxy_port}", f"http://0x7f.0.0.1:{self.proxy_port}"]
        n = 0
        while not self._stop.is_set():
            n += 1
            lie = {"name": "liar", "url": self.sim.url, "slots_idle": self.claimed, "slots_processing": 0}
            answer = _authorized(self.management, "/api/v1/agents/liar/report", lie, self.token)
            self.statuses[answer] += 1
            if answer == 401:  # expired meanwhile (its server was killed): register again
                try:
                    self.register()
                except AssertionError:
                    pass
            if n % 10 == 0:
                alias = aliases[(n // 10) % len(aliases)]
                got = call(self.management, "POST", "/api/v1/agents",
                           {"agent_id": f"alias-{n}", "name": f"alias-{n}", "url": alias})
                self.alias_statuses[got.status] += 1
            self._stop.wait(self.every)


def _authorized(base: str, path: str, payload: Any, token: str | None) -> int:
    """POST C{payload} with a bearer token; the status (0 when nothing came back)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        base + path, data=json.dumps(payload).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as e:
        e.read()
        return int(e.code)
    except OSError:
        return 0
