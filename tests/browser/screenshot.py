"""Take the README's screenshot (docs/dashboard.png) of a balancer under load.

    .venv/bin/python -m tests.browser.screenshot [docs/dashboard.png] [--policy slots]

A balancer with three simulated upstreams and one that is down, a first round
of requests to fill the charts and the per-upstream figures, then a second
round that keeps every slot busy and three requests buffered while headless
Chromium (Debian's, as in the browser tests) takes a 1440 px wide picture.
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from ..processes import Processes, free_port


def ask(proxy: str, index: int) -> None:
    parts = urlsplit(proxy)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    body = {"messages": [{"role": "user", "content": "Tell me about paddles. " * (index % 5 + 1)}],
            "max_tokens": 60}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    conn.getresponse().read()
    conn.close()


def round_of(proxy: str, count: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=ask, args=(proxy, i)) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", default="docs/dashboard.png")
    parser.add_argument("--policy", default="slots")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        procs = Processes(Path(tmp))
        try:
            _, proxy, management = procs.balancer(
                "--simulated-fleet", "3", "--policy", args.policy,
                "--upstream", f"gpu-down=http://127.0.0.1:{free_port()}",
            )
            for _ in range(2):
                for thread in round_of(proxy, 14):
                    thread.join()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                     args=["--headless", "--no-sandbox"])
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(management + "/dashboard")
                time.sleep(1.0)
                busy = round_of(proxy, 13)
                time.sleep(1.3)
                page.screenshot(path=args.target, full_page=True)
                browser.close()
            for thread in busy:
                thread.join()
        finally:
            procs.stop_all()


if __name__ == "__main__":
    main()
