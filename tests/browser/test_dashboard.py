"""The dashboard in a real headless Chromium against a real balancer with a simulated fleet.

Set ``PADDLER_DASHBOARD_SCREENSHOT=PATH`` to also save the screenshot taken
with requests in flight there; the README's (docs/dashboard.png) is made by
``python -m tests.browser.screenshot``.
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
            url: tr.querySelector('.url').textContent,
            state: tr.querySelector('.state').textContent,
            stateClass: tr.querySelector('.state').className,
            since: tr.querySelector('.since').textContent,
            slots: tr.querySelector('.nums').textContent,
            flight: tr.querySelector('.flight').textContent,
            rps: tr.querySelector('.rps').textContent,
            ttft: tr.querySelector('.ttft').textContent,
            duration: tr.querySelector('.duration').textContent,
            errors: tr.querySelector('.errors').textContent,
            served: tr.querySelector('.served').textContent,
            model: tr.querySelector('.model').textContent,
            age: tr.querySelector('.age').textContent,
            button: tr.querySelector('button.drain').textContent,
        }))""",
    )


def event_texts(page: Any) -> list[str]:
    """The event log as shown, newest first: "name what" per entry."""
    return page.eval_on_selector_all(
        "#events li", "lis => lis.map(li => li.querySelector('.who').textContent + ' ' + li.querySelector('.what').textContent)"
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
    assert all(r["url"].startswith("http://127.0.0.1:") for r in before)
    assert all(r["stateClass"] == "state state-healthy" for r in before)
    assert all(re.fullmatch(r"\d+ s", r["since"]) for r in before), before
    assert [r["slots"] for r in before] == ["4 / 0 / 4", "2 / 0 / 2"]
    assert {r["model"] for r in before} == {"simulated.gguf"}
    assert {r["button"] for r in before} == {"Drain"}
    assert page.text_content("#t-upstreams") == "2 / 2"
    assert page.text_content("#t-slots-total") == "6"
    assert page.text_content("#t-requests").startswith("0 total")
    assert page.text_content("#t-buffer-limit") == " / 30"
    assert page.text_content("#t-not-served") == "0 / 0 / 0"
    assert page.text_content("#policy") == "policy cache-aware"
    texts = event_texts(page)
    assert "simulated-0 unknown → healthy" in texts and "simulated-1 added (unknown)" in texts

    with ThreadPoolExecutor(max_workers=8) as pool:
        running = [pool.submit(complete, proxy, 120) for _ in range(8)]
        # 8 requests on 6 slots at 20-40 tokens/s: all slots busy and two buffered for a while.
        expect(page.locator("#t-slots-processing")).to_have_text("6")
        expect(page.locator("#t-buffered")).to_have_text("2")
        expect(page.locator("#t-buffer-limit")).to_have_text(" / 30")
        # Upstream rows follow at most a second behind the totals.
        expect(page.locator("#fleet-rows .state")).to_have_text(["busy", "busy"])
        expect(page.locator("#fleet-rows .flight")).to_have_text(["4", "2"])
        busy = rows(page)
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
    expect(page.locator("#fleet-rows .flight")).to_have_text(["0", "0"])
    after = rows(page)
    assert sum(int(r["served"]) for r in after) == 8
    # Per-upstream figures of the last minute: a rate, TTFT and duration percentiles, no errors.
    assert all(r["rps"] != "0.00" and r["ttft"] != "– / –" and r["duration"] != "– / –" for r in after), after
    assert [r["errors"] for r in after] == ["0 / 0", "0 / 0"]
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


def test_drain_and_undrain_from_the_page_with_the_management_token(procs: Processes, page: Any) -> None:
    """With --management-token set, Drain asks for the token (a password field, nothing sent
    yet); a wrong token is refused (403) and asked again; the right one drains the upstream
    (row, button and event log follow), and Undrain then works without asking again. The token
    never reaches the URL, cookies or web storage."""
    _, _, management = procs.balancer("--simulated-fleet", "2", "--management-token", "s3cret-token")
    page.goto(management + "/dashboard")
    expect(page.locator("#fleet-rows .state")).to_have_text(["healthy", "healthy"])
    posts: list[tuple[str, str | None]] = []
    page.on("request", lambda r: posts.append((r.url, r.headers.get("authorization"))) if r.method == "POST" else None)
    first = page.locator("#fleet-rows tr").first

    first.locator("button.drain").click()
    expect(page.locator("#token-panel")).to_be_visible()
    assert page.get_attribute("#token-input", "type") == "password"
    expect(page.locator("#token-message")).to_contain_text("To drain simulated-0")
    assert posts == []

    page.fill("#token-input", "wrong")
    page.click("#token-form button[type=submit]")
    expect(page.locator("#token-message")).to_contain_text("The token was refused")
    expect(page.locator("#token-panel")).to_be_visible()
    expect(first.locator(".state")).to_have_text("healthy")

    page.fill("#token-input", "s3cret-token")
    page.press("#token-input", "Enter")
    expect(page.locator("#token-panel")).to_be_hidden()
    expect(first.locator(".state")).to_have_text("draining")
    expect(first.locator("button.drain")).to_have_text("Undrain")
    expect(page.locator("#notice")).to_contain_text("simulated-0 is draining")
    expect(page.locator("#events li").first.locator(".what")).to_have_text("draining: no new requests")
    expect(page.locator("#events li").first.locator(".who")).to_have_text("simulated-0")
    status, state = get_json(management + "/api/v1/state?history=0")
    assert [u["draining"] for u in state["upstreams"]] == [True, False]

    first.locator("button.drain").click()  # the token is kept in memory: no second prompt
    expect(first.locator(".state")).to_have_text("healthy")
    expect(first.locator("button.drain")).to_have_text("Drain")
    expect(page.locator("#events li").first.locator(".what")).to_have_text("undrained: takes requests again")
    assert page.locator("#token-panel").is_hidden()

    assert [auth for _, auth in posts] == ["Bearer wrong", "Bearer s3cret-token", "Bearer s3cret-token"]
    assert all("s3cret" not in url for url, _ in posts)
    assert [url.rsplit("/", 1)[1] for url, _ in posts] == ["drain", "drain", "undrain"]
    stored = page.evaluate(
        "() => [location.href, document.cookie, JSON.stringify(localStorage), JSON.stringify(sessionStorage)]"
    )
    assert not any("s3cret" in value for value in stored), stored

    page.reload()  # a reload forgets the token
    expect(page.locator("#fleet-rows .state")).to_have_text(["healthy", "healthy"])
    first.locator("button.drain").click()
    expect(page.locator("#token-panel")).to_be_visible()


def test_drain_without_a_token_when_the_balancer_has_none(procs: Processes, page: Any) -> None:
    """A balancer without a management token (loopback only) drains at the first click; its
    management API's answer is what the row shows."""
    _, _, management = procs.balancer("--simulated-fleet", "2")
    page.goto(management + "/dashboard")
    expect(page.locator("#fleet-rows .state")).to_have_text(["healthy", "healthy"])
    page.locator("#fleet-rows tr").nth(1).locator("button.drain").click()
    expect(page.locator("#fleet-rows .state")).to_have_text(["healthy", "draining"])
    assert page.locator("#token-panel").is_hidden()
    status, state = get_json(management + "/api/v1/state?history=0")
    assert [u["draining"] for u in state["upstreams"]] == [False, True]


def test_the_event_log_shows_upstreams_failing_arriving_and_leaving(procs: Processes, page: Any) -> None:
    """An upstream whose server is down turns unreachable with the reason; one registered and
    then deleted through the management API is logged as added and removed, newest first."""
    dead = free_port()
    _, _, management = procs.balancer(
        "--simulated-fleet", "1", "--upstream", f"dead=http://127.0.0.1:{dead}", "--unhealthy-after", "1"
    )
    page.goto(management + "/dashboard")
    expect(page.locator("#events li .what").filter(has_text="unknown → unreachable")).to_have_count(1)
    entry = page.locator("#events li").filter(has_text="unreachable").first
    expect(entry.locator(".who")).to_have_text("dead")
    expect(entry.locator(".what")).to_contain_text("Connection refused", ignore_case=True)
    expect(entry.locator("time")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))

    conn = http.client.HTTPConnection("127.0.0.1", int(urlsplit(management).port or 0), timeout=10)
    body = json.dumps({"url": f"http://127.0.0.1:{free_port()}", "name": "extra"})
    conn.request("POST", "/api/v1/upstreams", body, {"Content-Type": "application/json"})
    assert conn.getresponse().read() and True
    expect(page.locator("#fleet-rows tr")).to_have_count(3)
    conn.request("DELETE", "/api/v1/upstreams/extra?force=true")
    assert conn.getresponse().status == 200
    conn.close()
    expect(page.locator("#fleet-rows tr")).to_have_count(2)
    texts = event_texts(page)
    assert texts[0] == "extra removed", texts
    assert "extra added (unknown)" in texts
    expect(page.locator("#events-count")).to_have_text(str(len(texts)))


def test_a_390_px_screen_shows_slots_model_and_error_of_every_upstream(procs: Processes, page: Any) -> None:
    """At 390 px each upstream is a card: its slots, model and error (and the drain button) are
    inside the screen, the page never scrolls sideways, and long values wrap."""
    dead = free_port()
    _, _, management = procs.balancer(
        "--simulated-fleet", "2", "--upstream", f"a-very-long-upstream-name-for-a-phone=http://127.0.0.1:{dead}",
        "--unhealthy-after", "1",
    )
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(management + "/dashboard")
    expect(page.locator("#fleet-rows tr")).to_have_count(3)
    expect(page.locator("#fleet-rows .error").first).not_to_be_empty()
    boxes = page.eval_on_selector_all(
        "#fleet-rows tr",
        """trs => trs.map(tr => Object.fromEntries(['slots-cell', 'model', 'error', 'actions', 'name-cell'].map(c => {
            const el = tr.querySelector('.' + c); const r = el.getBoundingClientRect();
            return [c, {left: r.left, right: r.right, width: r.width, shown: getComputedStyle(el).display}];
        })))""",
    )
    for box in boxes:
        for name in ("slots-cell", "model", "actions", "name-cell"):
            assert box[name]["width"] > 0 and 0 <= box[name]["left"] and box[name]["right"] <= 390, (name, box)
    failing = boxes[0]  # sorted by name: the dead upstream comes first
    assert failing["error"]["width"] > 0 and failing["error"]["right"] <= 390, failing
    widths = page.evaluate(
        "() => [document.documentElement.scrollWidth, window.innerWidth,"
        " document.querySelector('.table-wrap').scrollWidth, document.querySelector('.table-wrap').clientWidth]"
    )
    assert widths[0] <= widths[1] and widths[2] <= widths[3], widths
    labels = page.eval_on_selector_all(
        "#fleet-rows tr:first-child td.model, #fleet-rows tr:first-child td.slots-cell",
        "tds => tds.map(td => getComputedStyle(td, '::before').content)",
    )
    assert labels == ['"Slots"', '"Model"']
