"""Headless Chromium for browser tests: Debian's /usr/bin/chromium driven by
Playwright for Python. Nothing is ever downloaded (no `playwright install`).

    from tests.browser import launch_browser, browser_page, screenshot

    with launch_browser() as browser:          # a playwright Browser
        page = browser.new_page()

    def test_x(browser_page):                  # fixture: a fresh Page (1200x800)
        browser_page.goto(url)

Import the fixture into a test module (`from tests.browser import
browser_page  # noqa: F401`) to use it. Tests skip with a clear reason only
when Chromium or Playwright is missing.

Screenshots go to a temporary folder, so a test run does not rewrite the
tracked pictures; `PENNCLOUD_SCREENSHOTS=1 ./tests/run.sh -m browser` (or any
test selection) refreshes docs/screenshots/ for the README and the docs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
DOC_SHOTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "screenshots")
SHOTS = DOC_SHOTS if os.environ.get("PENNCLOUD_SCREENSHOTS") else os.path.join(
    tempfile.gettempdir(), "penncloud-screenshots")


def _require():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; tests/run.sh does it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed in the venv (pip install -r requirements-test.txt)")
    return sync_playwright


@contextlib.contextmanager
def launch_browser():
    """A headless Chromium Browser, closed on exit."""
    sync_playwright = _require()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, chromium_sandbox=False, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser_page():
    with launch_browser() as browser:
        ctx = browser.new_context(viewport={"width": 1200, "height": 800})
        page = ctx.new_page()
        page.set_default_timeout(15_000)
        try:
            yield page
        finally:
            ctx.close()


def screenshot(page, name: str, full_page: bool = True) -> str:
    """Save docs/screenshots/<name>.png and return its path."""
    os.makedirs(SHOTS, exist_ok=True)
    path = os.path.join(SHOTS, f"{name}.png")
    page.screenshot(path=path, full_page=full_page)
    return path
