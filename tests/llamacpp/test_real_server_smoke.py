"""Smoke test: the real llama-server built from PyPI starts and reports its slots."""

from __future__ import annotations

import json
import urllib.request
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.llamacpp.conftest import LlamaServers

pytestmark = pytest.mark.llamacpp


def get_json(url: str) -> tuple[int, object]:
    with urllib.request.urlopen(url, timeout=5.0) as response:
        return response.status, json.loads(response.read())


def test_real_server_is_healthy_with_four_idle_slots(start_llama_server: "LlamaServers") -> None:
    """A fresh server answers /health 200 {"status": "ok"} and /slots lists 4 idle slots."""
    url = start_llama_server(slots=4, ctx=2048)

    status, health = get_json(url + "/health")
    assert status == 200
    assert health == {"status": "ok"}

    status, slots = get_json(url + "/slots")
    assert status == 200
    assert isinstance(slots, list)
    assert sorted(slot["id"] for slot in slots) == [0, 1, 2, 3]
    assert [slot["is_processing"] for slot in slots] == [False] * 4
