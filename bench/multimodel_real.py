"""Many models on two real router-mode llama-servers: issue 21's trace, small.

The real counterpart of L{bench.multimodel} (which runs in process on a fake
clock). Two ``llama-server`` processes in router mode (the test build:
``tests/llamacpp/build-llama-server``, its tiny random-weight model copied
(symlinked) once per model name into each ``--models-dir``, ``--models-max 2``,
``-np 2``, ``-c 2048``, one thread) behind a real ``paddler balancer``; six
models with Zipf popularity (s = 1.1) whose order is reversed halfway (the
popularity shift), Poisson arrivals at ``--rate`` requests per second,
streamed chat completions of ``MAX_TOKENS`` tokens. Six models and four
places (two hosts x ``--models-max 2``) so that models must be loaded and
evicted: with four models every one would fit and no load would be needed.

Configurations, each on fresh servers, one after the other (the order
rotated per repetition), each starting from the static assignment loaded:

- ``static``: static pools, the HAProxy way: each host's ``--models-dir``
  holds only its two pinned models (by the first half's popularity: m0 and
  m3 on one, m1 and m2 on the other), ``--no-models-autoload``, loaded before
  the trace; requests for m4 and m5 have no pool (404, counted unserved);
- ``autoload``: every host lists all six models and autoloads (LRU eviction
  past ``--models-max``); paddler routes by model with its plain slot policy;
- ``placement``: the same routers, paddler with ``--model-placement
  --model-min-residency 30 --model-replicas-max 2`` (the in-process bench's
  settings): paddler loads and evicts.

Figures per configuration: TTFT (first SSE event of the answer) p50/p99, in
all and for requests sent after the shift; requests that found their model
loaded nowhere when sent (they waited for a load, or failed); loads and
evictions, counted from each router's ``GET /models`` polled every 0.2 s
(a state reaching ``loaded`` from another, an ``unloaded`` from ``loaded``);
unserved requests (any status but 200). The client measures from the
moment it sends; times are those of a tiny model on 2 shared cores.

    python -m bench.multimodel_real [--reps 3] [--duration 120] [--rate 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.multimodel import percentile, zipf_weights

# bench.common (psutil: the bench extra) is imported where servers are started, so that
# the trace and the counting can be tested without it.
ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

MODELS = ("m0", "m1", "m2", "m3", "m4", "m5")
HOSTS = 2
MODELS_MAX = 2
SLOTS = 2
CTX = 2048
MAX_TOKENS = 16
CONFIGS = ("static", "autoload", "placement")
#: Two models per host by the first half's popularity, hot with cold.
STATIC = (("m0", "m3"), ("m1", "m2"))
PLACEMENT_FLAGS = ("--model-placement", "--model-min-residency", "30", "--model-replicas-max", "2")
REQUEST_TIMEOUT = 180.0
PROMPT = "Tell me about the weather in a few words."


def median(values: Sequence[float]) -> float:
    data = [v for v in values if not math.isnan(v)]
    return statistics.median(data) if data else float("nan")


def make_trace(seed: int, duration: float, rate: float) -> list[tuple[float, str]]:
    """(arrival second, model): Poisson at C{rate}/s, Zipf popularity reversed at C{duration / 2}."""
    rng = random.Random(seed)
    weights = zipf_weights(len(MODELS))
    trace: list[tuple[float, str]] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return trace
        order = MODELS if t < duration / 2 else tuple(reversed(MODELS))
        trace.append((t, rng.choices(order, weights)[0]))


# -- HTTP (blocking: this is a client, not a library) ------------------------------------


def request(url: str, method: str, path: str, body: Any = None, timeout: float = 10.0) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def model_states(url: str) -> dict[str, str]:
    code, body = request(url, "GET", "/models", timeout=5.0)
    if code != 200:
        raise OSError(f"/models answered {code}")
    states = {}
    for entry in json.loads(body)["data"]:
        status = entry.get("status", {})
        states[entry["id"]] = "failed" if status.get("failed") else status.get("value", "?")
    return states


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not within {timeout:g} s")


def llama_server() -> tuple[Path, Path]:
    """The test build's llama-server and tiny.gguf (built once, cached)."""
    out = subprocess.run(["bash", str(ROOT / "tests/llamacpp/build-llama-server")], capture_output=True,
                         text=True, timeout=3600, check=True)
    binary = Path(out.stdout.strip().splitlines()[-1])
    return binary, binary.parent / "tiny.gguf"


def start_router(procs: Any, binary: Path | None, tiny: Path | None, models: Sequence[str], autoload: bool,
                 name: str) -> str:
    """A router-mode llama-server (or, with no C{binary}, ``paddler simulate`` in router mode)."""
    from bench.common import PYTHON, TMP, free_port

    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    if binary is None or tiny is None:  # --simulator: a smoke run of this script, not a measurement
        procs.start([PYTHON, "-m", "paddler", "simulate", "--listen", f"tcp:{port}:interface={LOOPBACK}",
                     "--models", ",".join(models), "--models-max", str(MODELS_MAX), "--slots", str(SLOTS),
                     "--model-load-seconds", "1", "--tokens-per-second", "200",
                     "--models-autoload" if autoload else "--no-models-autoload"], name)
        wait_for(lambda: bool(model_states(url)), 60, f"simulator {name}")
        return url
    models_dir = TMP / f"{name}-models-{port}"
    models_dir.mkdir(parents=True)
    for model in models:
        (models_dir / f"{model}.gguf").symlink_to(tiny)
    argv = [str(binary), "--models-dir", str(models_dir), "--models-max", str(MODELS_MAX),
            "--host", LOOPBACK, "--port", str(port), "-np", str(SLOTS), "-c", str(CTX), "-t", "1",
            "--slots", "--metrics", *([] if autoload else ["--no-models-autoload"])]
    procs.start(argv, name)
    wait_for(lambda: bool(model_states(url)), 60, f"router {name}")
    return url


def load(url: str, model: str) -> None:
    code, body = request(url, "POST", "/models/load", {"model": model}, timeout=30)
    if code != 200:
        raise RuntimeError(f"loading {model} on {url}: {code} {body[:200]!r}")
    wait_for(lambda: model_states(url)[model] == "loaded", 120, f"{model} loaded on {url}")


class Poller(threading.Thread):
    """Polls every router's /models; counts loads (a state reaching loaded) and evictions."""

    def __init__(self, urls: Sequence[str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.current: dict[tuple[str, str], str] = {}
        self.loads: list[tuple[float, str, str]] = []
        self.evictions: list[tuple[float, str, str]] = []
        self.failures: list[tuple[float, str, str]] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.poll()  # the starting picture: preloads are not counted

    def poll(self) -> None:
        for url in self.urls:
            try:
                states = model_states(url)
            except (OSError, ValueError, KeyError):
                continue
            now = time.monotonic()
            with self.lock:
                for model, state in states.items():
                    before = self.current.get((url, model))
                    if before is not None and before != state:
                        if state == "loaded":
                            self.loads.append((now, url, model))
                        elif state == "failed":
                            self.failures.append((now, url, model))
                        elif before == "loaded" and state == "unloaded":
                            self.evictions.append((now, url, model))
                    self.current[(url, model)] = state

    def loaded_somewhere(self, model: str) -> bool:
        with self.lock:
            return any(s == "loaded" for (_, m), s in self.current.items() if m == model)

    def run(self) -> None:
        while not self.stopping.wait(0.2):
            self.poll()


def stream_chat(proxy: str, model: str) -> tuple[int, float | None]:
    """(status, seconds to the first SSE event); the body is read to its end."""
    parts = urlsplit(proxy)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=REQUEST_TIMEOUT)
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "stream": True, "temperature": 0}
    started = time.monotonic()
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"content-type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            response.read()
            return response.status, None
        ttft = None
        while True:
            line = response.readline()
            if not line:
                break
            if ttft is None and line.startswith(b"data:"):
                ttft = time.monotonic() - started
        return 200, ttft
    except (OSError, http.client.HTTPException):
        return 0, None
    finally:
        conn.close()


def replay(proxy: str, poller: Poller, trace: Sequence[tuple[float, str]], duration: float) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    start = time.monotonic()

    def one(sent: float, model: str) -> None:
        cold = not poller.loaded_somewhere(model)
        status, ttft = stream_chat(proxy, model)
        with lock:
            records.append({"sent": sent, "model": model, "status": status, "ttft": ttft, "cold": cold})

    threads = []
    for at, model in trace:
        delay = start + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(at, model), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(REQUEST_TIMEOUT + 10)
    return records


def run_config(config: str, trace: Sequence[tuple[float, str]], duration: float, binary: Path | None,
               tiny: Path | None, rep: int) -> dict[str, Any]:
    from bench.common import Processes, start_paddler

    with Processes() as procs:
        urls = []
        for i in range(HOSTS):
            models = STATIC[i] if config == "static" else MODELS
            urls.append(start_router(procs, binary, tiny, models, autoload=config != "static",
                                     name=f"mmreal-{config}-{rep}-router{i + 1}"))
        for url, pinned in zip(urls, STATIC):
            for model in pinned:
                load(url, model)
        extra = ["--probe-interval", "0.5", "--buffered-request-timeout", "120", "--max-buffered-requests", "512"]
        if config == "placement":
            extra += PLACEMENT_FLAGS
        _, port = start_paddler(procs, urls, f"mmreal-{config}-{rep}-paddler", policy=None, extra=extra)
        proxy = f"http://{LOOPBACK}:{port}"
        wanted = {m for pinned in STATIC for m in pinned}

        def ready() -> bool:
            code, body = request(proxy, "GET", "/v1/models")
            listed = {e["id"]: e["status"]["value"] for e in json.loads(body)["data"]} if code == 200 else {}
            return all(listed.get(m) == "loaded" for m in wanted)

        wait_for(ready, 60, "the balancer's /v1/models")
        poller = Poller(urls)
        poller.start()
        began = time.monotonic()
        records = replay(proxy, poller, trace, duration)
        elapsed = time.monotonic() - began
        poller.stopping.set()
        poller.join(5)
        poller.poll()
    served = [r for r in records if r["status"] == 200 and r["ttft"] is not None]
    after = [r["ttft"] for r in served if r["sent"] >= duration / 2]
    return {
        "config": config,
        "requests": len(trace),
        "served": len(served),
        "unserved": len(trace) - len(served),
        "unserved_by_status": {str(s): sum(1 for r in records if r["status"] == s)
                               for s in sorted({r["status"] for r in records}) if s != 200},
        "ttft_p50": percentile([r["ttft"] for r in served], 50),
        "ttft_p99": percentile([r["ttft"] for r in served], 99),
        "ttft_p50_after_shift": percentile(after, 50),
        "ttft_p99_after_shift": percentile(after, 99),
        "cold_requests": sum(1 for r in records if r["cold"]),
        "cold_served": sum(1 for r in served if r["cold"]),
        "loads": len(poller.loads),
        "evictions": len(poller.evictions),
        "failed_loads": len(poller.failures),
        "loads_by_model": {m: sum(1 for _, _, x in poller.loads if x == m) for m in MODELS},
        "wall_seconds": elapsed,
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per config and figure: [median, min, max] over the repetitions."""
    out: dict[str, dict[str, list[float]]] = {}
    for config in CONFIGS:
        mine = [r for r in rows if r["config"] == config]
        if not mine:
            continue
        out[config] = {}
        for key in ("ttft_p50", "ttft_p99", "ttft_p50_after_shift", "ttft_p99_after_shift", "cold_requests",
                    "loads", "evictions", "unserved", "served"):
            values = [float(r[key]) for r in mine]
            out[config][key] = [median(values), min(values), max(values)]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default="multimodel_real")
    parser.add_argument("--simulator", action="store_true",
                        help="paddler simulate routers instead of llama-server (a smoke run of this script)")
    args = parser.parse_args(argv)
    from bench.common import PYTHON, log, machine, save

    configs = args.configs.split(",")
    binary: Path | None = None
    tiny: Path | None = None
    if not args.simulator:
        binary, tiny = llama_server()
    log(f"routers: {binary or 'paddler simulate'}")
    rows: list[dict[str, Any]] = []
    command = "python -m bench.multimodel_real " + " ".join(argv if argv is not None else sys.argv[1:])
    for rep in range(args.reps):
        seed = args.seed + 100 * rep
        trace = make_trace(seed, args.duration, args.rate)
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        for config in order:
            r = run_config(config, trace, args.duration, binary, tiny, rep) | {
                "rep": rep, "seed": seed, "duration": args.duration, "rate": args.rate}
            rows.append(r)
            log(f"rep {rep} seed {seed} {config:9} served {r['served']}/{r['requests']} "
                f"ttft p50 {r['ttft_p50']:.2f} p99 {r['ttft_p99']:.2f} after the shift p50 "
                f"{r['ttft_p50_after_shift']:.2f} p99 {r['ttft_p99_after_shift']:.2f} loads {r['loads']} "
                f"evictions {r['evictions']} cold {r['cold_requests']}")
            save(args.out, {"command": command, "machine": machine(), "routers": str(binary or "simulator"),
                            "rows": rows, "summary": summary(rows), "python": PYTHON})


if __name__ == "__main__":
    main()
