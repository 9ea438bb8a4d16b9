"""The shared slot reader (read_slots, http_getter), used by HTTPProber and by ``paddler agent``."""

from __future__ import annotations

import pytest_twisted
from treq.testing import StubTreq

from paddler.llamacpp.errors import Loading, ProbeError
from paddler.llamacpp.slots import http_getter, read_slots

from .fake_llama import FakeLlama


@pytest_twisted.ensureDeferred
async def test_read_slots_returns_a_reading_without_an_upstream():
    """read_slots is usable on its own (the agent's use): total, processing, models, method."""
    fake = FakeLlama(slots=2, model="x")
    fake.busy = 1
    reading = await read_slots(http_getter(StubTreq(fake), "http://fake:1"))
    assert (reading.total, reading.processing, reading.method) == (2, 1, "slots")
    assert set(reading.models) == {"x"}


@pytest_twisted.ensureDeferred
async def test_read_slots_raises_loading_and_probe_error():
    """read_slots raises Loading for a loading server and ProbeError for a bad answer."""
    fake = FakeLlama()
    fake.slots_status = 503
    get = http_getter(StubTreq(fake), "http://fake:1")
    try:
        await read_slots(get)
    except Loading:
        pass
    else:
        raise AssertionError("expected Loading")
    fake.slots_status = 500
    try:
        await read_slots(get)
    except ProbeError as e:
        assert "500" in str(e)
    else:
        raise AssertionError("expected ProbeError")


@pytest_twisted.ensureDeferred
async def test_http_getter_sends_the_api_key():
    """The getter sends Authorization: Bearer KEY when a key is given."""
    fake = FakeLlama()
    await http_getter(StubTreq(fake), "http://fake:1", "sekret")("/health")
    assert fake.seen[-1][2][b"Authorization"] == [b"Bearer sekret"]


@pytest_twisted.ensureDeferred
async def test_read_slots_in_props_method_uses_props_only():
    """method="props" (remembered after a 501) skips /slots and reads /props: busy slots unknown."""
    fake = FakeLlama(slots=3)
    fake.busy = 2
    marks = iter([7])
    reading = await read_slots(http_getter(StubTreq(fake), "http://fake:1"), method="props",
                               mark=lambda: next(marks))
    assert (reading.total, reading.processing, reading.method, reading.mark) == (3, None, "props", 7)
    assert [uri for _, uri, _, _ in fake.seen] == [b"/props"]
