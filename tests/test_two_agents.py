"""Two agents and more: every agent with its own URL and name registers (the second one once got a 500)."""

from __future__ import annotations

import pytest_twisted

from .test_management import Harness


def agent_report(index: int, idle: int = 3, processing: int = 1) -> dict:
    return {
        "name": f"gpu-{index}",
        "url": f"http://10.0.0.{index}:8080",
        "slots_idle": idle,
        "slots_processing": processing,
    }


@pytest_twisted.ensureDeferred
async def test_two_agents_with_different_names_and_urls_both_register():
    """a1 and a2 report different hosts: both get 200, both upstreams are in the pool with their slots."""
    h = Harness()
    try:
        for index in (1, 2):
            status, body, _ = await h.call("POST", f"/api/v1/agents/a{index}/report", agent_report(index))
            assert status == 200, body
        for index in (1, 2):  # and again: reports keep coming
            status, body, _ = await h.call("POST", f"/api/v1/agents/a{index}/report", agent_report(index, 2, 2))
            assert status == 200, body
        assert sorted(h.registry.agents) == ["a1", "a2"]
        upstreams = sorted(h.pool.upstreams.values(), key=lambda u: u.name)
        assert [(u.name, u.source, u.slots_idle, u.slots_total) for u in upstreams] == [
            ("gpu-1", "agent", 2, 4),
            ("gpu-2", "agent", 2, 4),
        ]
        assert h.pool.totals()["slots_idle"] == 4
    finally:
        h.stop()


@pytest_twisted.ensureDeferred
async def test_fifty_agents_interleaved_all_register_and_none_is_retired():
    """50 agents reporting in turn, three rounds: 50 upstreams, every report 200, no agent retired."""
    h = Harness()
    try:
        for _ in range(3):
            for index in range(1, 51):
                status, body, _ = await h.call("POST", f"/api/v1/agents/a{index}/report", agent_report(index))
                assert status == 200, body
        assert len(h.registry.agents) == 50
        assert len(h.pool.upstreams) == 50
        assert not h.pool._removals
    finally:
        h.stop()


@pytest_twisted.ensureDeferred
async def test_a_second_agent_claiming_the_first_agents_url_is_409_and_changes_nothing():
    """a2 reporting a1's URL conflicts; a1's upstream and record are untouched."""
    h = Harness()
    try:
        await h.call("POST", "/api/v1/agents/a1/report", agent_report(1))
        status, body, _ = await h.call("POST", "/api/v1/agents/a2/report", {**agent_report(1), "name": "other"})
        assert status == 409 and body["error"]["param"] == "url"
        assert list(h.registry.agents) == ["a1"]
        (upstream,) = h.pool.upstreams.values()
        assert upstream.name == "gpu-1" and not upstream.draining
    finally:
        h.stop()
