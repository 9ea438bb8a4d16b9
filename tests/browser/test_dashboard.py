"""The dashboard in a real headless Chromium against a real balancer with a simulated fleet.

Set ``PADDLER_DASHBOARD_SCREENSHOT=docs/dashboard.png`` to also save the
screenshot taken with requests in flight there (for the README).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

from ..processes import Processes, free_port, get_json

pytestmark = [pytest.mark.browser, pytest.mark.integration]

#: Milliseconds any wait on the page may take.
DEADLINE_MS = 20_000
expect.set_options(timeout=DEADLINE_MS)


def complete(proxy: str, tokens: int) -> int:
    """POST /completion through the balancer; the status."""
    parts = urlsplit(proxy)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        body = json.dumps({"prompt": "Tell me about paddles.", "n_predict": tokens})
        conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def rows(page: Any) -> list[dict[str, str]]:
    return page.eval_on_selector_all(
        "#fleet-rows tr",
        """trs => trs.map(tr => ({
            name: tr.querySelector('.name').textContent,
            state: tr.querySelector('.state').textContent,
            stateClass: tr.querySelector('.state').className,
            slots: tr.querySelector('.nums').textContent,
            served: tr.querySelector('.served').textContent,
            model: tr.querySelector('.model').textContent,
            age: tr.querySelector('.age').textContent,
        }))""",
    )


def test_dashboard_shows_the_fleet_and_follows_requests_live(
    procs: Processes, page: Any, tmp_path: Path
) -> None:
    """The page lists both simulated upstreams as healthy, goes live on the SSE stream, and its
    figures (slots processing, request totals, served counts, charts) change as requests run."""
    _, proxy, management = procs.balancer("--simulated-fleet", "2")

    page.goto(management + "/dashboard")
    expect(page.locator("#fleet-rows tr")).to_have_count(2)
    expect(page.locator("#connection")).to_have_text("live")
    expect(page.locator("#fleet-rows .state")).to_have_text(["healthy", "healthy"])
    before = rows(page)
    assert [r["name"] for r in before] == ["simulated-0", "simulated-1"]
    assert all(r["stateClass"] == "state state-healthy" for r in before)
    assert [r["slots"] for r in before] == ["4 / 0 / 4", "2 / 0 / 2"]
    assert {r["model"] for r in before} == {"simulated.gguf"}
    assert page.text_content("#t-upstreams") == "2 / 2"
    assert page.text_content("#t-slots-total") == "6"
    assert page.text_content("#t-requests").startswith("0 total")

    with ThreadPoolExecutor(max_workers=8) as pool:
        running = [pool.submit(complete, proxy, 120) for _ in range(8)]
        # 8 requests on 6 slots at 20-40 tokens/s: all slots busy and two buffered for a while.
        expect(page.locator("#t-slots-processing")).to_have_text("6")
        expect(page.locator("#t-buffered")).to_have_text("2")
        busy = rows(page)
        assert {r["state"] for r in busy} == {"busy"}
        assert all("state-busy" in r["stateClass"] for r in busy)
        shot = tmp_path / "dashboard-busy.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        target = os.environ.get("PADDLER_DASHBOARD_SCREENSHOT")
        if target:
            shutil.copyfile(shot, target)
        assert [f.result(timeout=60) for f in running] == [200] * 8

    expect(page.locator("#t-requests")).to_have_text(re.compile(r"^8 total · 2xx 8$"))
    expect(page.locator("#t-slots-processing")).to_have_text("0")
    after = rows(page)
    assert sum(int(r["served"]) for r in after) == 8
    assert page.text_content("#t-rps") != "0.00"
    assert page.text_content("#t-ttft") != "– / – / –"
    # The charts are drawn on canvases from the history (non-blank pixels).
    drawn = page.evaluate(
        """() => [...document.querySelectorAll('canvas')].map(c => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
            return n; })"""
    )
    assert all(n > 0 for n in drawn)
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_dashboard_reconnects_after_the_stream_drops(procs: Processes, page: Any) -> None:
    """When the balancer restarts on the same port, the page shows it is reconnecting and goes
    live again by itself."""
    port, management_port = free_port(), free_port()
    args = ["balancer", "--simulated-fleet", "1", "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--management-listen", f"tcp:{management_port}:interface=127.0.0.1"]
    first = procs.start(*args, name="balancer")
    procs.wait_healthy(first, f"http://127.0.0.1:{port}/health", any_status=True)
    page.goto(f"http://127.0.0.1:{management_port}/dashboard")
    expect(page.locator("#connection")).to_have_text("live")
    first.stop()
    expect(page.locator("#connection")).to_have_text(re.compile("^reconnecting"))
    second = procs.start(*args, name="balancer")
    procs.wait_healthy(second, f"http://127.0.0.1:{port}/health", any_status=True)
    expect(page.locator("#connection")).to_have_text("live", timeout=30_000)
    expect(page.locator("#fleet-rows tr")).to_have_count(1)


def test_hostile_names_show_as_text_and_200_upstreams_fit_a_phone(
    procs: Processes, page: Any, tmp_path: Path
) -> None:
    """An upstream named <script>... shows as text (no script runs, no element is made), and the
    page with 200 upstreams stays within a 390 px wide screen (the table scrolls inside)."""
    hostile = "<script>alert(1)</script><b>bold</b>"
    config = tmp_path / "fleet.toml"
    lines = ["probe-interval = 5", "probe-timeout = 1", "[[upstream]]",
             f"name = {json.dumps(hostile)}", 'url = "http://127.0.0.1:9"']
    for i in range(199):
        lines += ["[[upstream]]", f'name = "gpu-{i:03d}"', f'url = "http://127.0.0.2:{20000 + i}"']
    config.write_text("\n".join(lines) + "\n")
    _, _, management = procs.balancer("--config", str(config))
    status, state = get_json(management + "/api/v1/state?history=0")
    assert status == 200 and len(state["upstreams"]) == 200

    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(management + "/dashboard")
    expect(page.locator("#fleet-rows tr")).to_have_count(200)
    names = page.eval_on_selector_all("#fleet-rows .name", "cells => cells.map(c => c.textContent)")
    assert hostile in names
    assert page.eval_on_selector_all("#fleet-rows script, #fleet-rows b", "els => els.length") == 0
    assert page.dialogs == []
    widths = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"the page is wider than the screen: {widths}"

    page.fill("#filter", "gpu-19")
    expect(page.locator("#fleet-count")).to_have_text("9 of 200")  # gpu-190 ... gpu-198
    page.screenshot(path=str(tmp_path / "dashboard-phone.png"), full_page=False)
