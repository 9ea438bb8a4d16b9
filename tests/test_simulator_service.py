"""Listeners for simulated llama-servers: twistd service, in-process fleet, real process."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import provider

from paddler.simulator.engine import GenerationRequest, SimulatorConfig, tokenize
from paddler.simulator.service import (
    SimulatedFleetService,
    SimulatorSite,
    config_from_options,
    endpoint_port,
    endpoint_with_port_offset,
    makeSimulatorService,
)
from paddler.tap import SimulateOptions


@pytest.fixture
def log_events() -> Iterator[list[dict]]:
    """Every log event emitted during the test."""
    events: list[dict] = []

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize(
    ("description", "offset", "expected"),
    [
        ("tcp:8081:interface=127.0.0.1", 2, "tcp:8083:interface=127.0.0.1"),
        ("tcp:port=9000:interface=0.0.0.0", 1, "tcp:port=9001:interface=0.0.0.0"),
        ("tcp:interface=\\:\\:1:port=9000", 3, "tcp:interface=\\:\\:1:port=9003"),
        ("tcp:0:interface=127.0.0.1", 5, "tcp:0:interface=127.0.0.1"),
        ("unix:/tmp/sim.sock", 0, "unix:/tmp/sim.sock"),
    ],
)
def test_endpoint_port_offset_moves_only_the_port(description: str, offset: int, expected: str) -> None:
    """Server i of a fleet listens on the --listen port plus i (port 0 stays 0)."""
    assert endpoint_with_port_offset(description, offset) == expected


def test_endpoint_port_offset_refuses_non_tcp_and_portless() -> None:
    """Consecutive ports need a tcp endpoint with a port."""
    with pytest.raises(ValueError):
        endpoint_with_port_offset("unix:/tmp/sim.sock", 1)
    with pytest.raises(ValueError):
        endpoint_port("tcp:interface=127.0.0.1")
    assert endpoint_port("tcp6:port=81") == 81


def test_config_from_options_gives_each_server_its_seed() -> None:
    """Server i of the fleet gets seed + i and every other setting from the flags."""
    options = SimulateOptions()
    options.parseOptions(["--seed", "10", "--slots", "2", "--no-metrics", "--api-key", "k",
                          "--tokens-per-second", "9", "--n-ctx", "64", "--load-seconds", "1"])
    assert config_from_options(options, 2) == SimulatorConfig(
        slots=2, model="simulated.gguf", tokens_per_second=9.0, prompt_tokens_per_second=2000.0,
        n_ctx=64, load_seconds=1.0, seed=12, slots_endpoint=True, metrics_endpoint=False,
        api_key="k",
    )


def test_config_from_options_reads_the_prompt_cache_settings_with_llama_server_defaults() -> None:
    """The prompt-cache options map onto SimulatorConfig; options without them get llama-server's
    defaults (similarity 0.10, 8192 MiB, idle slots cached, no unified KV)."""
    base = {"slots": 2, "model": "m", "tokens-per-second": 5.0, "prompt-tokens-per-second": 50.0,
            "n-ctx": 64, "load-seconds": 0.0, "seed": 0, "no-slots-endpoint": False,
            "no-metrics": False, "api-key": None}
    plain = config_from_options(base)
    assert (plain.slot_prompt_similarity, plain.cache_ram_mib, plain.cache_idle_slots,
            plain.kv_unified) == (0.1, 8192, True, False)
    tuned = config_from_options({**base, "slot-prompt-similarity": 0.0, "cache-ram": -1,
                                 "cache-bytes-per-token": 1024, "no-cache-idle-slots": True,
                                 "kv-unified": True})
    assert (tuned.slot_prompt_similarity, tuned.cache_ram_mib, tuned.cache_bytes_per_token,
            tuned.cache_idle_slots, tuned.kv_unified) == (0.0, -1, 1024, False, True)


def test_simulate_service_listens_on_consecutive_ports_and_logs_urls(log_events: list[dict]) -> None:
    """--fleet 3 starts three servers on port, port+1, port+2, each logged with its URL."""
    reactor = MemoryReactorClock()
    options = SimulateOptions()
    options.parseOptions(["--fleet", "3", "--listen", "tcp:18081:interface=127.0.0.1", "--seed", "4"])
    service = makeSimulatorService(options, reactor)
    service.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (18081, "127.0.0.1"), (18082, "127.0.0.1"), (18083, "127.0.0.1"),
    ]
    sites = [factory for _, factory, _, _ in reactor.tcpServers]
    assert all(isinstance(site, SimulatorSite) for site in sites)
    assert [site.engine.config.seed for site in sites if isinstance(site, SimulatorSite)] == [4, 5, 6]
    listening = [e for e in log_events if "url" in e and e.get("log_format", "").startswith("simulated llama-server {index}")]
    assert [e["url"] for e in listening] == [
        "http://127.0.0.1:18081", "http://127.0.0.1:18082", "http://127.0.0.1:18083",
    ]
    assert [e["index"] for e in listening] == [0, 1, 2]
    service.stopService()
    assert reactor.getDelayedCalls() == []


def test_fleet_service_reports_urls_after_start_and_engines_stop_with_it() -> None:
    """SimulatedFleetService lists one URL per server after startService and cancels work on stop."""
    reactor = MemoryReactorClock()
    configs = [SimulatorConfig(slots=1, seed=i) for i in range(2)]
    fleet = SimulatedFleetService(reactor, configs, interface="127.0.0.1", base_port=19000)
    assert fleet.urls == []
    fleet.startService()
    assert fleet.urls == ["http://127.0.0.1:19000", "http://127.0.0.1:19001"]
    urls: list[list[str]] = []
    fleet.whenListening().addCallback(urls.append)
    assert urls == [fleet.urls]
    job = fleet.engines[0].submit(GenerationRequest(prompt_tokens=tokenize("x"), n_predict=100))
    job.whenDone().addErrback(lambda f: None)
    reactor.advance(0.5)
    fleet.stopService()
    assert not job.active
    assert fleet.urls == []
    assert reactor.getDelayedCalls() == []


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_fleet_on_os_chosen_ports_answers_health_over_real_tcp() -> None:
    """With base_port 0 each server gets its own free port and answers /health over TCP."""
    from twisted.internet import reactor

    fleet = SimulatedFleetService(reactor, [SimulatorConfig(), SimulatorConfig(seed=1)])
    fleet.startService()
    try:
        urls = await fleet.whenListening()
        assert len(set(urls)) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
        for url in urls:
            response = await treq.get(url + "/health", persistent=False).addTimeout(5, reactor)
            assert response.code == 200
            assert json.loads(await response.content()) == {"status": "ok"}
    finally:
        await fleet.stopService()


def _checkout_path() -> str:
    """PYTHONPATH for the subprocess: the checkout, so twistd finds twisted/plugins
    even when the editable install does not expose it."""
    import paddler

    root = str(Path(paddler.__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + rest if rest else "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
def test_paddler_simulate_runs_as_a_real_process(tmp_path: Path) -> None:
    """``python -m paddler simulate`` listens, logs its URL, answers /health and /slots, stops on SIGTERM."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "paddler", "simulate",
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--slots", "2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _checkout_path()},
    )
    output = b""
    try:
        assert process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        # Wait (on the process's output, with a deadline) for the listening line.
        while url.encode() not in output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no listening line in time:\n{output.decode(errors='replace')}"
            if selector.select(remaining):
                chunk = os.read(process.stdout.fileno(), 65536)
                assert chunk, f"process exited:\n{output.decode(errors='replace')}"
                output += chunk
        selector.close()
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            assert response.status == 200
            assert json.loads(response.read()) == {"status": "ok"}
        with urllib.request.urlopen(url + "/slots", timeout=5) as response:
            assert [slot["id"] for slot in json.loads(response.read())] == [0, 1]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    # twistd shuts down cleanly, then re-raises SIGTERM to report it.
    assert process.returncode in (0, -signal.SIGTERM)


def test_a_fleet_port_already_taken_stops_start_up() -> None:
    """`paddler simulate --fleet N` fails at start when one of its ports is taken, like the balancer."""
    import socket as _socket

    from twisted.internet import reactor as _reactor
    from paddler.server.listeners import ListenFailed

    with _socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        fleet = SimulatedFleetService(_reactor, [SimulatorConfig()], base_port=port)
        with pytest.raises(ListenFailed):
            fleet.privilegedStartService()
