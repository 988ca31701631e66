"""The page in a real browser: Debian's chromium driven by Playwright (never `playwright install`:
the system chromium at CONSOLVER_CHROMIUM, default /usr/bin/chromium). A person's session on the
toy: type a prompt, ask for 8 seeds at K=4, see 8 labelled tiles, click one, see its final, which
is consolver.preview.refine of that seed for that prompt pixel for pixel; a bad K or seed count
shows its message in the page, not a traceback. Skips without chromium or playwright, except
under CI, which must run it (tests/app/conftest.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from consolver.config import load_config
from consolver.data.format import to_uint8_hwc
from consolver.preview import make_previews, refine
from tests.app.conftest import PROMPT, SMALL, TOY, require, require_chromium

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def page(app):
    chromium = require_chromium()
    sync_api = require("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        tab = browser.new_page(viewport={"width": 1280, "height": 1200})
        tab.set_default_timeout(TIMEOUT_MS)
        outside = []  # the page must work offline: every request stays on this machine
        tab.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
               else None)
        tab.goto(app[0])
        tab.wait_for_selector("#prompt textarea")
        yield tab
        browser.close()
        assert not outside, f"the page reached outside this machine: {outside[:5]}"


def _image(tab, selector: str) -> np.ndarray:
    """The PNG an <img> shows, fetched from the page's own server and decoded."""
    src = tab.get_attribute(selector, "src")
    response = tab.request.get(src)
    assert response.ok, src
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def _error(tab) -> str:
    toast = tab.locator(".toast-body.error").last
    toast.wait_for(state="visible")
    text = toast.inner_text()
    tab.locator(".toast-body.error .toast-close").last.click()
    tab.wait_for_function("!document.querySelector('.toast-body.error')")  # gone before the next request
    return text


def test_a_session_in_the_browser(page, service):
    tab = page
    tab.fill("#prompt textarea", PROMPT)
    tab.fill("#num-seeds input", "8")
    tab.fill("#steps input", "4")
    tab.click("#preview-button")
    tab.wait_for_function("document.querySelectorAll('#gallery .thumbnail-item img').length === 8 && "
                          "[...document.querySelectorAll('#gallery .thumbnail-item img')].every(i => i.complete && i.naturalWidth > 0)")
    captions = tab.locator("#gallery .caption-label").all_inner_texts()
    assert [c.split(" · ")[0] for c in captions] == [f"seed {s}" for s in range(8)]
    assert all(c.endswith(" ms") for c in captions)
    assert "8 previews of" in tab.inner_text("#status")

    tab.locator("#gallery .thumbnail-item").nth(5).click()  # seed 5
    tab.wait_for_selector("#final img")
    tab.wait_for_function("document.querySelector('#reward').innerText.includes('seed 5')")
    cfg = load_config(TOY, SMALL)
    final = refine(cfg, [PROMPT], [5])
    assert np.array_equal(_image(tab, "#final img"), to_uint8_hwc(final.images)[0])  # PNG: exact 8-bit pixels
    previews = make_previews(cfg, service.solver, [PROMPT], range(8), 4)
    assert np.array_equal(_image(tab, "#picked-preview img"), to_uint8_hwc(previews.images[5:6])[0])
    assert "pixel_psnr" in tab.inner_text("#reward")
    rows = tab.locator("#history tr").all_inner_texts()  # the history table: a header and this pick
    assert len(rows) == 2 and rows[1].split("\t")[:3] == ["1", PROMPT, "5"], rows
    assert "refining all 8 previewed seeds" in tab.inner_text("#running")
    assert tab.locator("#downloads a").count() >= 2  # the final PNG and manifest.json

    tab.fill("#steps input", "9")
    tab.click("#preview-button")
    assert "K=9 is not available: the solver serves K in 3, 4, 5" in _error(tab)
    tab.fill("#steps input", "4")
    tab.fill("#num-seeds input", "500")
    tab.click("#preview-button")
    assert "number of seeds must be a whole number from 1 to 64, got 500" in _error(tab)
    body = tab.inner_text("body")
    assert "Traceback" not in body and 'File "' not in body
    assert tab.locator("#gallery .thumbnail-item img").count() == 8  # the refused requests left the grid alone
