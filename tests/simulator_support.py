"""Fixtures and helpers for the simulator's HTTP tests: a real Site driven in memory on a fake clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from paddler.simulator.engine import SimulatorConfig
from paddler.simulator.service import SimulatorSite, simulator_site
from paddler.simulator.testing import MemoryHTTPClient

MakeServer = Callable[..., MemoryHTTPClient]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> Iterator[MakeServer]:
    """Build simulated servers on the fake clock; afterwards close every
    connection and check that nothing is left scheduled."""
    clients: list[MemoryHTTPClient] = []

    def make(**config: Any) -> MemoryHTTPClient:
        client = MemoryHTTPClient(simulator_site(clock, SimulatorConfig(**config)))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    assert clock.getDelayedCalls() == []


def engine_of(client: MemoryHTTPClient):  # type: ignore[no-untyped-def]
    site = client.site
    assert isinstance(site, SimulatorSite)
    return site.engine


def running_job(client: MemoryHTTPClient):  # type: ignore[no-untyped-def]
    """The one job running on the server (a fresh server, like llama-server, starts with its last slot)."""
    [job] = [slot.job for slot in engine_of(client).slots if slot.job is not None]
    return job


def metric(client: MemoryHTTPClient, name: str) -> float:
    text = client.get("/metrics").response.body.decode()
    for line in text.splitlines():
        if line.startswith("llamacpp:" + name + " "):
            return float(line.split(" ")[1])
    raise AssertionError(f"no metric {name}")
