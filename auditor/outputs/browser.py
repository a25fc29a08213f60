"""Open a report in headless Chromium: console errors, network requests, visible verdict, screenshot.

Uses playwright-python with the system Chromium (Debian ``chromium``; never ``playwright install``, which
downloads). ``auditor screenshot REPORT.html [SCREENSHOT.png]`` prints the check and saves the
screenshot (the README's picture is made this way from ``auditor demo``'s report).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def chromium_path() -> str | None:
    """The system Chromium executable, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageCheck:
    console_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    verdict: str = ""
    flags_shown: int = 0
    deep_dive_views: int = 0
    toggled: bool = False


def check_report(html: Path, screenshot: Path | None = None, width: int = 1200, height: int = 1400) -> PageCheck:
    """Open ``html`` from disk (file://) and record what a reader's browser would do with it."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise RuntimeError("no chromium found: apt-get install chromium")
    result = PageCheck()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: result.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: result.console_errors.append(str(e)))
            page.on(
                "request",
                lambda r: None if r.url.startswith(("file:", "data:")) else result.external_requests.append(r.url),
            )
            page.goto(html.resolve().as_uri())
            page.wait_for_load_state("load")
            result.verdict = page.inner_text("#verdict") if page.is_visible("#verdict") else ""
            result.flags_shown = page.locator(".flag:visible").count()
            result.deep_dive_views = page.locator("#deep-dive ~ .card .gallery img").count()
            first = page.locator("img[data-views]").first
            if first.count():
                before = first.get_attribute("src")
                first.click()
                result.toggled = first.get_attribute("src") != before
            if screenshot is not None:
                if result.toggled:  # cycle that image back to its map view before the picture
                    while first.get_attribute("src") != before:
                        first.click()
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    return result
