"""The demo page, end to end in a real headless Chromium: pick files, watch captions
arrive over the one multi-job WebSocket, see an upload refused on its card.

The browser is Debian's Chromium (`make chromium`, run by `make test`), driven by
Playwright's Python API; Playwright's own browser download never runs. Without Chromium
(or Playwright) the browser test is skipped with the reason."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.helpers.images import make_png
from tests.integration.stack import Component, Gateway, Stack

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

# Another Chromium-based browser: CAPTIONSTREAM_TEST_CHROMIUM=/path/to/it.
CHROMIUM = os.environ.get("CAPTIONSTREAM_TEST_CHROMIUM") or (
    shutil.which("chromium") or "/usr/bin/chromium"
)
# The flags known to work on this kind of machine: no sandbox (root), no GPU, and nothing
# that reaches for Google's hosts (the network is closed).
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
TIMEOUT_MS = 30_000

# Checked before any fixture starts, so a machine without a browser skips at once.
needs_browser = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None or not Path(CHROMIUM).is_file(),
    reason=(
        "needs Playwright (pip install -e '.[dev]') and Chromium at "
        f"{CHROMIUM} (`make chromium` installs Debian's, as root; "
        "or set CAPTIONSTREAM_TEST_CHROMIUM)"
    ),
)


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Gateway:
    return stack.start_gateway()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    """A fresh Chromium with a new, empty profile directory."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            timeout=TIMEOUT_MS,
        )
        try:
            yield context
        finally:
            context.close()


@dataclass
class DemoPage:
    page: Page
    console: list[str]  # console messages and uncaught errors
    sockets: list[str]  # URLs of the WebSockets the page opened


@pytest.fixture
def demo(browser: BrowserContext, gateway: Gateway) -> DemoPage:
    page = browser.pages[0] if browser.pages else browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    loaded = DemoPage(page, [], [])
    page.on("console", lambda m: loaded.console.append(f"console.{m.type}: {m.text}"))
    page.on("pageerror", lambda e: loaded.console.append(f"pageerror: {e}"))
    page.on("websocket", lambda ws: loaded.sockets.append(ws.url))
    page.goto(f"{gateway.url}/demo")
    return loaded


@contextmanager
def evidence_on_failure(demo: DemoPage, tmp_path: Path) -> Iterator[None]:
    """On failure keep a screenshot and the browser console in tmp_path, and name them."""
    try:
        yield
    except BaseException as exc:
        shot = tmp_path / "demo-failure.png"
        demo.page.screenshot(path=str(shot), full_page=True)
        (tmp_path / "demo-console.log").write_text("\n".join(demo.console))
        exc.add_note(f"screenshot: {shot}\nbrowser console:\n" + "\n".join(demo.console))
        raise


def test_page_is_served_at_root_and_demo(gateway: Gateway) -> None:
    for path in ("/", "/demo"):
        response = httpx.get(f"{gateway.url}{path}", timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in response.headers["content-security-policy"]
    for asset, kind in (("demo.js", "text/javascript"), ("demo.css", "text/css")):
        response = httpx.get(f"{gateway.url}/static/{asset}", timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(kind)


@needs_browser
def test_two_images_get_live_captions_and_a_bad_file_shows_the_415(
    demo: DemoPage, gateway: Gateway, worker: Component, tmp_path: Path
) -> None:
    page = demo.page
    files = []
    for i, color in enumerate([(220, 40, 40), (40, 160, 220)]):
        path = tmp_path / f"picture-{i}.png"
        path.write_bytes(make_png(color=color))
        files.append(path)
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is text, not an image\n")
    expected_detail = gateway.upload(bad.read_bytes(), "notes.png").json()["detail"]

    with evidence_on_failure(demo, tmp_path):
        page.get_by_label("Choose images").set_input_files([*files, bad])
        check_cards(page, files, expected_detail)

    # No script errors, nothing the Content-Security-Policy refused.
    problems = [m for m in demo.console if m.startswith("pageerror") or "Refused to" in m]
    assert not problems, demo.console
    # One socket carried every job's updates.
    assert demo.sockets == [f"{gateway.ws_url}/api/v1/ws"]


def check_cards(page: Page, files: list[Path], expected_detail: str) -> None:
    for path in files:
        c = page.locator(f'#cards li[aria-label="{path.name}"]')
        c.locator('.status[data-status="SUCCESS"]').wait_for()
        caption = c.locator(".caption").inner_text().strip()
        assert caption, f"{path.name}: SUCCESS without a caption"
        assert c.locator("img.thumb").get_attribute("alt") == caption
        assert c.locator(".error").inner_text() == ""

    rejected = page.locator('#cards li[aria-label="notes.png"]')
    rejected.locator('.status[data-status="ERROR"]').wait_for()
    assert "415" in rejected.locator(".status").inner_text()
    assert rejected.locator(".error").inner_text() == expected_detail
    assert rejected.locator(".error").get_attribute("role") == "alert"
    assert page.locator("#connection").get_attribute("data-state") == "open"
