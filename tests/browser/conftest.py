"""Browser fixtures: Debian's Chromium driven by Playwright (no browser download), one page per test, and the
screenshots each test leaves in build/screenshots for people to look at."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devtools.launcher import REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / "build" / "screenshots"
VIEWPORT = {"width": 1360, "height": 900}


def _require(ok: bool, why: str) -> None:
    """Skip on a developer machine without the prerequisite; under CI a missing one is a failure."""
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests cannot run under CI: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Module scope, not session: Playwright's sync API keeps an event loop running in this thread while it is
    # open, and the asyncio tests of the other tiers that run after this module need the thread's loop free.
    _require(Path(CHROMIUM).exists(), "chromium is not installed (apt-get install chromium)")
    _require((REPO / "console" / "dist" / "index.html").exists(), "the console is not built (make console)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, "the playwright package is not installed (make venv)")
        raise
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Watched:
    """A page and what it did: every request (url, Authorization header) and every console error."""

    page: Any
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture()
def watched(browser: Any) -> Iterator[Watched]:
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(20_000)
    page = context.new_page()
    seen = Watched(page)
    page.on("request", lambda r: seen.requests.append((r.url, r.headers.get("authorization"))))
    page.on("console", lambda m: seen.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.errors.append(f"uncaught: {e}"))
    try:
        yield seen
        policy = [e for e in seen.errors if "Content Security Policy" in e or e.startswith("uncaught")]
        assert not policy, policy
    finally:
        context.close()
