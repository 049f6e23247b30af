"""The operator page in a real browser: Debian's Chromium driven by Playwright, against the real app and worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import unique
from tests.integration.conftest import Stack
from tests.loopback.openrouter import Reply
from tests.services import ensure_chromium
from tests.web.support import WebServer

pytestmark = pytest.mark.integration

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

#: Records the length of the watched text at every DOM change, in the page.
COUNT_UPDATES = """
() => {
  window.textLengths = [];
  const text = document.getElementById("watch-text");
  new MutationObserver(() => window.textLengths.push(text.textContent.length))
    .observe(text, {childList: true, characterData: true, subtree: true});
}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=ensure_chromium(), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, web: WebServer) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(web.url + "operator")
    yield page
    context.close()


def _ask(page: Page, key: str) -> None:
    page.fill("#ask-user", "browser-user")
    page.fill("#ask-prompt", f"Tell a story [[{key}]]")
    page.click("#ask-send")
    expect(page.locator("#ask-note")).to_contain_text("queued")


def test_a_prompt_sent_from_the_page_streams_its_text_in_several_updates(
    stack: Stack, page: Page, tmp_path: Path
) -> None:
    # Given a provider that streams 20 pieces, 80 ms apart
    key = unique("page")
    pieces = [f"word{i} " for i in range(20)]
    stack.server.script_for(key, Reply.ok(*pieces, chunk_delay_s=0.08))
    page.evaluate(COUNT_UPDATES)
    # When the operator submits a prompt from the form
    _ask(page, key)
    # Then the text grows in separate DOM updates to the whole answer, and the job shows completed
    expect(page.locator("#watch-status")).to_have_text("completed", timeout=20_000)
    expect(page.locator("#watch-text")).to_have_text("".join(pieces))
    lengths = [n for n in page.evaluate("window.textLengths") if n > 0]
    assert len(set(lengths)) >= 3, lengths
    assert lengths == sorted(lengths)
    expect(page.locator("#jobs tr", has_text="browser-user").first).to_contain_text("completed", timeout=5000)
    page.screenshot(path=str(tmp_path / "operator.png"), full_page=True)
    assert (tmp_path / "operator.png").stat().st_size > 10_000


def test_a_running_job_cancelled_from_the_page_shows_cancelled(stack: Stack, page: Page) -> None:
    # Given a job of the page that streams slowly
    key = unique("page-cancel")
    stack.server.script_for(key, Reply.ok(*["tick "] * 400, chunk_delay_s=0.05))
    _ask(page, key)
    expect(page.locator("#watch-text")).to_contain_text("tick", timeout=20_000)
    # When the operator clicks Cancel
    page.click("#watch-cancel")
    # Then the page shows the job cancelled, with its partial text kept
    expect(page.locator("#watch-status")).to_have_text("cancelled", timeout=10_000)
    assert page.locator("#watch-text").text_content()
    job = stack.store.get(page.locator("#watch-id").text_content() or "")
    assert job is not None
    assert str(job.status) == "cancelled"


def test_a_reload_in_the_middle_of_a_stream_continues_the_text_without_duplicates(stack: Stack, page: Page) -> None:
    # Given a job of the page half way through a numbered answer
    key = unique("page-reload")
    pieces = [f"<{i}>" for i in range(40)]
    stack.server.script_for(key, Reply.ok(*pieces, chunk_delay_s=0.1))
    _ask(page, key)
    expect(page.locator("#watch-text")).to_contain_text("<5>", timeout=20_000)
    # When the operator reloads the page
    page.reload()
    # Then the page follows the same job again and ends with each piece exactly once
    expect(page.locator("#watch-status")).to_have_text("completed", timeout=20_000)
    expect(page.locator("#watch-text")).to_have_text("".join(pieces))
