"""End to end: the web page in headless Chromium finds the described person in a synthetic index."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from search_fixtures import synthetic_records

from tbps.search.service import create_app

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SHOWN = 10  # results the test asks the page for (of 120 images, 3 per identity)


@pytest.fixture(scope="module")
def server_url(search_index: Path) -> Iterator[str]:
    """``tbps serve``'s app on a free loopback port, in a background thread."""
    config = uvicorn.Config(create_app(search_index), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the search server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_page_finds_the_described_person(server_url: str, tiny_synthetic: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is required (apt-get install chromium; scripts/bootstrap.sh test does it)"
    # A caption written for one training image, typed as a user would; the tiny model has seen
    # it, so its person must be among the first results.
    record = next(r for r in synthetic_records(tiny_synthetic) if r["split"] == "train")
    query = record["captions"][0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server_url + "/")
            expect(page.locator("#status")).to_contain_text("120 images indexed")
            expect(page.locator("#camera-filter")).to_be_visible()  # the index has camera metadata
            page.select_option("#k", str(SHOWN))
            page.fill("#query", query)
            page.press("#query", "Enter")
            cards = page.locator("#results .hit")
            expect(cards).to_have_count(SHOWN)
            names = cards.evaluate_all("cards => cards.map(c => c.querySelector('.meta').title)")
            people = [int(Path(name).stem.split("_")[0]) for name in names]
            assert record["id"] in people, (record["id"], people)
            # Thumbnails really load.
            page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
            # Open the best-ranked image of the right person: full image, explanation, "more like this".
            target = cards.nth(people.index(record["id"]))
            target_id = target.get_attribute("data-id")
            target.click()
            expect(page.locator("#detail")).to_be_visible()
            page.wait_for_function("document.getElementById('explanation').complete && document.getElementById('explanation').naturalWidth > 0")
            page.screenshot(path=str(tmp_path / "search-page.png"), full_page=True)
            page.click("#more-like-this")
            expect(page.locator("#status")).to_contain_text("results like")
            # Image-to-image search ranks the clicked image itself first.
            expect(page.locator("#results .hit").first).to_have_attribute("data-id", target_id)
            assert errors == []
        finally:
            browser.close()
    assert (tmp_path / "search-page.png").stat().st_size > 10_000
