"""End to end: the page at / served by uvicorn on loopback, driven by Playwright on the system's
Chromium (Debian's ``chromium`` package; Playwright's own browser download cannot work offline).

Skips, with the reason, when playwright or chromium is missing (``make test`` installs playwright
with the dev extra; ``make browser`` / ``apt-get install chromium`` brings the browser), except in
CI: with ``CI`` or ``DIFFMEM_REQUIRE_BROWSER=1`` set (``.ci/run`` sets both) a missing browser is a
failure, so the page is tested on every submission. The screenshot goes to
``runs/screenshots/service_page.png`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from diffmem.server.app import ServerConfig, create_app

SCREENSHOT = Path(__file__).resolve().parents[2] / "runs" / "screenshots" / "service_page.png"


def _browser() -> tuple[str | None, str]:
    """The system Chromium, or None and why not (checked before any fixture is built)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "playwright is not installed (pip install -e '.[dev]')"
    path = os.environ.get("DIFFMEM_CHROMIUM") or shutil.which("chromium") or \
        shutil.which("chromium-browser")
    if not path:
        return None, ("no system Chromium (make browser, or apt-get install chromium); "
                      "Playwright's own browser download cannot work offline")
    return path, ""


def browser_required() -> bool:
    """CI must run the page test: a missing browser fails instead of skipping."""
    flag = os.environ.get("DIFFMEM_REQUIRE_BROWSER", "").strip().lower()
    ci = os.environ.get("CI", "").strip().lower()
    return flag not in ("", "0", "false", "no") or ci not in ("", "0", "false", "no")


CHROMIUM, WHY_NOT = _browser()


@pytest.fixture
def browser_path():
    if CHROMIUM is None:
        if browser_required():
            pytest.fail(f"the page test must run in CI: {WHY_NOT}")
        pytest.skip(WHY_NOT)
    return CHROMIUM


def test_missing_browser_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert browser_required()
    monkeypatch.delenv("CI")
    monkeypatch.setenv("DIFFMEM_REQUIRE_BROWSER", "0")
    assert not browser_required()
    monkeypatch.setenv("DIFFMEM_REQUIRE_BROWSER", "1")
    assert browser_required()


def test_page_flags_highlights_edits_and_generates(engine, memorized, serve, browser_path):
    from playwright.sync_api import expect, sync_playwright

    # max_steps 10: the page generates with the server's default steps (min(50, max_steps))
    with serve(create_app(engine, ServerConfig(max_steps=10))) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(url + "/")
            expect(page.locator("#mitigate option")).not_to_have_count(0)
            page.locator("#prompt").press_sequentially(memorized.prompt, delay=5)

            status, estimate = page.locator("#status"), page.locator("#estimate")
            # the first-step estimate first, labelled as such; then the verdict by generation
            expect(estimate).to_contain_text("First-step estimate (fast, not the verdict)",
                                             timeout=30_000)
            expect(status).to_have_attribute("data-source", "generation", timeout=30_000)
            expect(status).to_have_attribute("data-flagged", "true")
            expect(status).to_contain_text("Copies a training image")
            expect(status).to_contain_text("verdict by generation")
            # the evidence: the closest preview beside its nearest training image, as images
            expect(page.locator("#evidence")).to_be_visible()
            for img in ("#preview", "#nearestimg"):
                assert page.locator(img).get_attribute("src").startswith("data:image/png;base64,")
                assert page.locator(img).evaluate("e => e.naturalWidth") > 0
            expect(page.locator("#evidencecap")).to_contain_text("nearest training image")
            expect(page.locator("#evidencecap")).to_contain_text("tiled_l2")
            expect(page.locator("#words .word")).not_to_have_count(0, timeout=30_000)
            triggers = page.locator("#words .word.trigger").all_inner_texts()
            assert triggers and set(triggers) <= set(memorized.trigger_tokens), triggers
            words = page.locator("#words .word").all_inner_texts()
            assert " ".join(words) == " ".join(memorized.prompt.split())

            edit = page.locator("#edits button.clears").first
            new_prompt = edit.get_attribute("data-prompt")
            edit.click()
            expect(page.locator("#prompt")).to_have_value(new_prompt)
            expect(estimate).to_have_attribute("data-flagged", "false", timeout=30_000)
            expect(status).to_have_attribute("data-source", "generation", timeout=30_000)

            page.locator("#prompt").fill("a red circle")
            page.evaluate("() => check()")
            expect(status).to_have_attribute("data-flagged", "false", timeout=30_000)
            expect(status).to_contain_text("Copies no training image")

            page.locator("#prompt").fill(memorized.prompt)
            expect(status).to_have_attribute("data-flagged", "true", timeout=30_000)
            page.locator("#generate").click()
            expect(page.locator("#images img.generated")).to_have_count(2, timeout=120_000)
            expect(page.locator("#images img.nearest")).to_have_count(2)
            expect(page.locator("#images figcaption").first).to_contain_text("nearest training")
            assert page.locator("#error").inner_text() == ""
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # a superseded check is aborted (no error shown), the newest one answers
            page.evaluate("""() => { const p = document.getElementById("prompt");
                p.value = "a red circle"; check(); p.value = "a blue square"; check(); }""")
            expect(status).not_to_have_attribute("data-pending", "true", timeout=30_000)
            assert page.locator("#error").inner_text() == ""
            assert " ".join(page.locator("#words .word").all_inner_texts()) == "a blue square"
            assert page.evaluate("() => window.localStorage.length") == 0  # key: session only

            page.goto(url + "/docs")  # Swagger UI from the package, no network
            expect(page.locator(".opblock")).to_have_count(7, timeout=30_000)
        finally:
            browser.close()
