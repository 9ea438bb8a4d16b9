"""Shared pieces of the benchmark harness: processes, ports, CPU, RSS, percentiles.

Everything listens on 127.0.0.1 only. Every process the harness starts is
tracked and killed (by its own pid) when the scenario ends, even on error.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
TMP = RESULTS / "tmp"
PYTHON = sys.executable
LOOPBACK = "127.0.0.1"
#: The core the proxy under test runs on, and the one the load (client and upstream) runs on.
PROXY_CORE = 0
LOAD_CORE = 1


def pinned(args: Sequence[str], core: int | None) -> list[str]:
    """C{args} run on one core (taskset), or as they are when C{core} is None or taskset is missing."""
    if core is None or shutil.which("taskset") is None or (os.cpu_count() or 1) <= core:
        return list(args)
    return ["taskset", "-c", str(core), *args]


def raise_fd_limit(wanted: int = 65536) -> None:
    """Raise RLIMIT_NOFILE for this process and the children it starts."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def free_ports_below_ephemeral(count: int) -> int:
    """A port p with p + 1 ... p + count - 1 free too, below the ephemeral range: the management ports
    of ``--workers`` (worker i on p + i), which outbound connections must not take first."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000 - count)
        socks = [socket.socket() for _ in range(count)]
        try:
            for i, sock in enumerate(socks):
                sock.bind((LOOPBACK, first + i))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports below 32000")


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout} s")


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """A tiny blocking GET for readiness checks (the harness, not the reactor)."""
    import http.client

    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Processes:
    """The processes one scenario started; C{stop_all} ends each by its pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: Sequence[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        TMP.mkdir(parents=True, exist_ok=True)
        log = open(TMP / f"{name}.log", "wb")
        proc = subprocess.Popen(
            list(args),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        log.close()
        proc.bench_name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group we created for it
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            try:
                self.stop(proc)
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all()


def tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants (nginx: master and workers)."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    return [root, *root.children(recursive=True)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process tree (from /proc/PID/stat via psutil)."""
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def peak_rss_mib(pid: int) -> float:
    """The largest VmHWM (peak RSS) in a process tree, in MiB (/proc/PID/status)."""
    best = 0
    for p in tree(pid):
        try:
            text = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
        if m:
            best = max(best, int(m.group(1)))
    return best / 1024.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    data = [v for v in values if v == v]
    return statistics.median(data) if data else float("nan")


def spread(values: Iterable[float]) -> list[float]:
    """[min, max] of the finite values (NaN, NaN for none): the noise across repetitions."""
    data = [v for v in values if v == v]
    return [min(data), max(data)] if data else [float("nan"), float("nan")]


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot (/proc/stat): the difference of two readings
    gives how busy the whole machine was in between (what other work on a shared machine took)."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def busy_between(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Percent of all cores busy between two L{machine_busy} readings."""
    total = after[1] - before[1]
    return 100 * (after[0] - before[0]) / total if total else float("nan")


def tool_version(args: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    return (out.stdout + out.stderr).strip().splitlines()[0]


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the balancers -----------------------------------------------------------


def start_paddler(
    procs: Processes,
    upstreams: Sequence[str],
    name: str,
    policy: str | None = "slots",
    extra: Sequence[str] = (),
    profile: Path | None = None,
    core: int | None = None,
    source: str | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, int]:
    """
    Start ``python -m paddler balancer`` (on C{core}); return it and its proxy port once healthy.
    C{policy} None: no ``--policy`` flag (the default policy, as a new user runs it).
    C{source}: a directory holding another paddler package to run instead of this checkout's.
    C{env}: more environment variables (e.g. ``PADDLER_LOG_LEVEL=debug`` for the routing decisions).
    """
    workers = int(extra[list(extra).index("--workers") + 1]) if "--workers" in extra else 1
    port = free_port()
    mport = free_ports_below_ephemeral(workers) if workers > 1 else free_port()
    args = [PYTHON, "-m", "paddler"]
    env = dict(env or {})
    if source is not None:
        # -P: the working directory (this checkout) must not come before SOURCE on sys.path
        args = [PYTHON, "-P", "-m", "paddler"]
        env["PYTHONPATH"] = source
    if profile is not None:
        args = [PYTHON, "-m", "bench.profiled", str(profile)]
    args += [
        "balancer",
        "--listen", f"tcp:{port}:interface={LOOPBACK}:backlog=4096",
        "--management-listen", f"tcp:{mport}:interface={LOOPBACK}",
        *(["--policy", policy] if policy is not None else []),
        "--probe-interval", "1",
        *extra,
    ]
    for url in upstreams:
        args += ["--upstream", url]
    proc = procs.start(pinned(args, core), name, env=env)
    wait_port(port, 30, proc)
    wait_healthy(port, len(upstreams), proc, timeout=max(30.0, len(upstreams) / 10))
    return proc, port


def paddler_policy(config: str) -> str | None:
    """The ``--policy`` of a ``paddler-POLICY`` config; None for ``paddler-default`` (no flag)."""
    policy = config[len("paddler-"):]
    return None if policy == "default" else policy


def wait_healthy(port: int, count: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    """Wait until the balancer's /health says C{count} upstreams are healthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            code, body = http_get(port, "/health")
            if code == 200 and json.loads(body)["upstreams"]["healthy"] >= count:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"balancer on {port} did not see {count} healthy upstreams in {timeout} s")


def start_haproxy(
    procs: Processes,
    upstream_ports: Sequence[int],
    name: str,
    streaming: bool = False,
    maxconn: Sequence[int] | None = None,
    queue_timeout: float = 600.0,
    core: int | None = None,
) -> tuple[subprocess.Popen, int]:
    """HAProxy 1 thread, ``balance leastconn``, keep-alive to the upstreams (pinned to C{core} if given).

    With C{maxconn} (one figure per upstream: its slots) HAProxy sends a
    server at most that many requests at once and queues the rest in its
    backend for up to C{queue_timeout} seconds: the strongest classic
    configuration for llama.cpp (a request goes to the server with the
    fewest connections that still has a free slot, else waits).
    """
    port = free_port()
    limits = list(maxconn) if maxconn is not None else [9000] * len(upstream_ports)
    if len(limits) != len(upstream_ports):
        raise ValueError("one maxconn per upstream")
    servers = "\n".join(
        f"    server s{i} {LOOPBACK}:{p} maxconn {limit}"
        for i, (p, limit) in enumerate(zip(upstream_ports, limits))
    )
    cfg = f"""
global
    nbthread 1
    maxconn 9000
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout queue {queue_timeout:g}s
    http-reuse always
{"    option http-no-delay" if streaming else ""}
frontend fe
    bind {LOOPBACK}:{port}
    default_backend be
backend be
    balance leastconn
{servers}
"""
    path = TMP / f"{name}.cfg"
    TMP.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg)
    proc = procs.start(pinned(["haproxy", "-db", "-f", str(path)], core), name)
    wait_port(port, 15, proc)
    return proc, port


def sglang_router_available() -> str | None:
    """None when ``sglang_router`` imports in this interpreter, else why not."""
    try:
        import sglang_router  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure is the reason
        return f"sglang_router does not import: {type(e).__name__}: {e}"
    return None


def prometheus_values(port: int, names: Sequence[str]) -> dict[str, float]:
    """Read counters and gauges from a llama-server's ``/metrics`` (0 for missing ones)."""
    code, body = http_get(port, "/metrics", timeout=5.0)
    values = {name: 0.0 for name in names}
    if code != 200:
        return values
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key in values:
            try:
                values[key] = float(value)
            except ValueError:
                pass
    return values


def start_nginx(
    procs: Processes, upstream_ports: Sequence[int], name: str, streaming: bool = False, core: int | None = None
) -> tuple[subprocess.Popen, int]:
    """nginx, 1 worker, round robin, HTTP/1.1 keep-alive to the upstreams, no buffering."""
    port = free_port()
    servers = "\n".join(f"        server {LOOPBACK}:{p};" for p in upstream_ports)
    cfg = _nginx_main(name) + f"""
    upstream be {{
{servers}
        keepalive 64;
    }}
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        location / {{
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering on;
            proxy_read_timeout 600s;
            proxy_send_timeout 300s;
        }}
    }}
}}
"""
    return _run_nginx(procs, cfg, name, port, core)


def sglang_router_command() -> list[str] | None:
    """How to start sglang-router (PyPI ``sglang-router``, a Rust router), or None when it is not installed."""
    exe = Path(PYTHON).parent / "sglang-router"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("sglang-router")
    return [found] if found else None


def start_sglang_router(
    procs: Processes,
    upstreams: Sequence[int | str],
    name: str,
    policy: str = "round_robin",
    core: int | None = None,
    plain: bool = True,
    extra: Sequence[str] = (),
) -> tuple[subprocess.Popen, int]:
    """
    sglang-router (PyPI ``sglang-router``, Rust) over C{upstreams} (ports on
    loopback, or URLs) with C{policy}. C{plain}: no retries and no circuit
    breaker (the relay measurements: one request, one upstream attempt);
    otherwise its CLI defaults for the policy (the routing scenarios).
    """
    command = sglang_router_command()
    if command is None:
        raise RuntimeError("sglang-router is not installed (pip install sglang-router)")
    urls = [u if isinstance(u, str) else f"http://{LOOPBACK}:{u}" for u in upstreams]
    port = free_port()
    args = [
        *command, "launch", "--host", LOOPBACK, "--port", str(port), "--worker-urls", *urls,
        "--policy", policy, "--log-level", "warn", "--request-timeout-secs", "600",
        # its Prometheus exporter listens too (port 29000 by default): a free port per instance
        "--prometheus-host", LOOPBACK, "--prometheus-port", str(free_port()),
        *(["--shutdown-grace-period-secs", "1", "--disable-retries", "--disable-circuit-breaker"] if plain else []),
        *extra,
    ]
    proc = procs.start(pinned(args, core), name)
    wait_port(port, 60, proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # workers are registered asynchronously
        try:
            code, body = http_get(port, "/workers")
            if code == 200 and body.count(b"http://") >= len(urls):
                break
            if code == 404 and http_get(port, "/health")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    return proc, port


def start_static_upstream(
    procs: Processes, count: int, name: str, slots: int = 256, core: int | None = None
) -> tuple[subprocess.Popen, list[int]]:
    """A fast static responder (nginx, 1 worker) on C{count} ports.

    ``GET /slots`` lists C{slots} idle slots (so paddler never runs out),
    ``/props`` names a model, everything else answers a small completion JSON.
    """
    ports = [free_port() for _ in range(count)]
    slot_json = json.dumps([{"id": i, "is_processing": False} for i in range(slots)], separators=(",", ":"))
    props = json.dumps({"total_slots": slots, "model_alias": "bench", "model_path": "bench.gguf"})
    answer = json.dumps(
        {
            "id": "cmpl-bench",
            "object": "text_completion",
            "model": "bench",
            "choices": [{"index": 0, "text": " the quick brown fox", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12},
        }
    )
    files = TMP / f"{name}-files"
    files.mkdir(parents=True, exist_ok=True)
    (files / "slots.json").write_text(slot_json)
    listens = "\n".join(f"        listen {LOOPBACK}:{p} backlog=4096;" for p in ports)
    cfg = _nginx_main(name) + f"""
    server {{
{listens}
        default_type application/json;
        location = /slots {{ alias {files}/slots.json; }}
        location = /props {{ return 200 '{props}'; }}
        location = /health {{ return 200 '{{"status":"ok"}}'; }}
        location / {{ return 200 '{answer}'; }}
    }}
}}
"""
    proc, _ = _run_nginx(procs, cfg, name, ports[0], core)
    for p in ports[1:]:
        wait_port(p, 15, proc)
    return proc, ports


def _nginx_main(name: str) -> str:
    tmp = TMP / f"{name}-nginx"
    tmp.mkdir(parents=True, exist_ok=True)
    return f"""
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 19000;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 9000; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
"""


def _run_nginx(procs: Processes, cfg: str, name: str, port: int, core: int | None = None) -> tuple[subprocess.Popen, int]:
    path = TMP / f"{name}-nginx.conf"
    path.write_text(cfg)
    proc = procs.start(
        pinned(["nginx", "-c", str(path), "-e", str(TMP / f"{name}-nginx" / "error.log")], core), name
    )
    wait_port(port, 15, proc)
    return proc, port
