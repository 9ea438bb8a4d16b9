"""StatsD -> Graphite for real: Etsy's statsd and carbon-cache from contrib/graphite, read back with whisper.

A balancer with a simulated fleet of two (4 + 2 slots) reports to statsd
every second; statsd flushes to carbon every second; whisper keeps one point
a second. The test holds the fleet in two known states (all 6 slots busy
with 2 requests buffered, then idle) and checks that the newest whisper
points equal what ``/api/v1/state`` says, and that the request counters add
up to the balancer's totals.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ..processes import Processes, free_port, get_json, wait_for
from .conftest import ROOT, Daemon, post

pytestmark = pytest.mark.integration

START_GRAPHITE = ROOT / "contrib" / "graphite" / "start-graphite"
READY_DEADLINE = 60.0
#: Seconds for a value to travel balancer -> statsd -> carbon -> whisper (1 s each hop, plus slack).
LAND_DEADLINE = 20.0
#: Long enough to keep every slot busy through the checks (the 2-slot upstream makes 20 tokens/s).
LONG_N_PREDICT = 2000
SHORT_REQUESTS = 2


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Whisper:
    """Reads the whisper files statsd's names land in (``legacyNamespace: false``)."""

    def __init__(self, root: Path, since: float) -> None:
        self.root = root
        self.since = since

    def path(self, kind: str, name: str) -> Path:
        return self.root.joinpath("stats", kind, *name.split(".")).with_suffix(".wsp")

    def points(self, kind: str, name: str) -> list[tuple[int, float]]:
        """(timestamp, value) of every non-empty point since the test started; [] before the file exists."""
        import whisper

        path = self.path(kind, name)
        if not path.exists():
            return []
        fetched = whisper.fetch(str(path), int(self.since) - 1, int(time.time()) + 1)
        if fetched is None:
            return []
        (start, _end, step), values = fetched
        return [(start + i * step, v) for i, v in enumerate(values) if v is not None]

    def latest(self, kind: str, name: str) -> float | None:
        points = self.points(kind, name)
        return points[-1][1] if points else None

    def total(self, kind: str, name: str) -> float:
        return sum(v for _, v in self.points(kind, name))


def open_stream(proxy: str, payload: dict[str, Any]) -> socket.socket:
    """Send a streamed POST /completion on a raw socket and leave the answer unread.

    Closing the socket cancels it, and llama-server (like the simulator) frees
    the slot of a cancelled request only when it streams: a whole-response
    request keeps its slot until it is done.
    """
    payload = dict(payload, stream=True)
    host, port = proxy.removeprefix("http://").split(":")
    body = json.dumps(payload).encode()
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(
        b"POST /completion HTTP/1.1\r\nHost: paddler\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def test_statsd_figures_land_in_whisper_with_the_values_the_balancer_reports(
    procs: Processes, daemons: Callable[..., Daemon], graphite_prefix: Path, tmp_path: Path
) -> None:
    """slots_idle, slots_processing, requests_buffered (busy and idle fleet) and the requests.total / requests.2xx
    counters read back from whisper equal the balancer's /api/v1/state."""
    ports = {
        "STATSD_PORT": free_udp_port(),
        "STATSD_ADMIN_PORT": free_port(),
        "CARBON_LINE_PORT": free_port(),
        "CARBON_PICKLE_PORT": free_port(),
        "CARBON_QUERY_PORT": free_port(),
    }
    env = dict(os.environ, PADDLER_GRAPHITE_PREFIX=str(graphite_prefix), **{k: str(v) for k, v in ports.items()})
    data = tmp_path / "graphite"
    graphite = daemons([str(START_GRAPHITE), str(data)], "graphite", env)

    def ready() -> bool:
        assert graphite.running(), "start-graphite exited:\n" + graphite.log()
        return "graphite ready" in graphite.log()

    wait_for(ready, deadline=READY_DEADLINE, what="statsd and carbon-cache ready", interval=0.2)
    whisper = Whisper(data / "storage" / "whisper", since=time.time())

    _, proxy, management = procs.balancer(
        "--simulated-fleet", "2", "--statsd", f"udp:127.0.0.1:{ports['STATSD_PORT']}", "--statsd-interval", "1",
    )

    def totals() -> dict[str, Any]:
        return get_json(management + "/api/v1/state?history=0")[1]["totals"]

    wait_for(lambda: totals()["upstreams"]["healthy"] == 2, what="two simulated upstreams healthy")
    capacity = totals()["slots_total"]
    assert capacity == 6
    for i in range(SHORT_REQUESTS):
        assert post(proxy + "/completion", {"prompt": f"short {i}", "n_predict": 3}) == 200

    def landed(expected: dict[str, int]) -> bool:
        """The newest point of each gauge equals the balancer's figure (read again each time)."""
        now = totals()
        assert all(now[name] == value for name, value in expected.items()), f"the fleet moved: {now}"
        return all(whisper.latest("gauges", f"paddler.{name}") == value for name, value in expected.items())

    # Busy: every slot processing and two requests waiting.
    sockets = [open_stream(proxy, {"prompt": f"long {i}", "n_predict": LONG_N_PREDICT}) for i in range(capacity + 2)]
    try:
        busy = {"slots_idle": 0, "slots_processing": capacity, "requests_buffered": 2}
        wait_for(lambda: all(totals()[k] == v for k, v in busy.items()), deadline=10, what=f"the fleet at {busy}")
        wait_for(lambda: landed(busy), deadline=LAND_DEADLINE, what=f"whisper at {busy}", interval=0.25)
    finally:
        for sock in sockets:
            sock.close()

    # Idle again: the clients left, their requests were cancelled upstream.
    idle = {"slots_idle": capacity, "slots_processing": 0, "requests_buffered": 0}
    wait_for(lambda: all(totals()[k] == v for k, v in idle.items()), deadline=10, what=f"the fleet at {idle}")
    wait_for(lambda: landed(idle), deadline=LAND_DEADLINE, what=f"whisper at {idle}", interval=0.25)

    requests = get_json(management + "/api/v1/state?history=0")[1]["requests"]
    assert requests["by_status"].get("2xx") == SHORT_REQUESTS
    assert requests["total"] == SHORT_REQUESTS + capacity + 2

    expected = {"requests.total": requests["total"], "requests.2xx": requests["by_status"]["2xx"]}

    def counts() -> dict[str, float]:
        return {name: whisper.total("counters", f"paddler.{name}.count") for name in expected}

    try:
        wait_for(lambda: counts() == expected, deadline=LAND_DEADLINE, what="the counters summed in whisper", interval=0.25)
    except AssertionError:
        files = sorted(str(p.relative_to(whisper.root)) for p in (whisper.root / "stats" / "counters").rglob("*.wsp"))
        pytest.fail(f"whisper counts {counts()} != the balancer's {expected}; counter files: {files}", pytrace=False)
