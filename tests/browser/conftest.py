"""Headless Chromium for the dashboard tests: Debian's chromium driven by Playwright.

``chromium_path`` (session) runs ``install-chromium`` beside this file, which
installs Debian's ``chromium`` with apt-get when it is missing (quick when it
is there). When it cannot install here it exits 3 and every browser test is
SKIPPED with its reason; any other failure is an error. Browsers are never
downloaded by Playwright (``playwright install`` is not used).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..installers import run_installer

from ..processes import Processes

INSTALL_SCRIPT = Path(__file__).with_name("install-chromium")
INSTALL_DEADLINE = 900.0
EXIT_ENVIRONMENT = 3
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Path of a working Debian chromium (installed on first use)."""
    path = run_installer(INSTALL_SCRIPT, INSTALL_DEADLINE)
    if not os.access(path, os.X_OK):
        pytest.fail(f"install-chromium printed no executable: {path!r}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def chromium(chromium_path: str) -> Iterator[Any]:
    """A headless Chromium (Playwright browser), closed at the end of the session."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:  # the test extras are not installed
        pytest.skip(f"the playwright package is missing: {e}")
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(
            executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS, timeout=60_000
        )
    except Exception:
        playwright.stop()
        raise
    try:
        yield browser
    finally:
        browser.close()
        playwright.stop()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A fresh page (its own context) with 10 s default deadlines; fails the test on page errors."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(10_000)
    page = context.new_page()
    page.errors = []
    page.dialogs = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))

    def on_dialog(dialog: Any) -> None:
        page.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    try:
        yield page
    finally:
        context.close()
    assert page.errors == [], f"the page raised: {page.errors}"


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Real paddler processes, always stopped at teardown."""
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()
