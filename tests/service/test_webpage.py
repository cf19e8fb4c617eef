"""The web page in a real headless Chromium: choose a file, get the deblurred image, compare, download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image, ImageFilter

from serving_support import ROOT, encode, make_artifact, running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The picture in documentation/serving.md: written there only when asked (a test run leaves the tree
# as it was): DEBLUR_WRITE_DOC_IMAGES=1 python -m pytest tests/service/test_webpage.py
DOC_SCREENSHOT = ROOT / "documentation" / "img" / "webpage.png"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium)"),
]


def blurred_photo() -> Image.Image:
    """scikit-image's 'chelsea' (451x300) with a Gaussian blur, for a picture worth looking at."""
    from skimage import data

    return Image.fromarray(data.chelsea()).filter(ImageFilter.GaussianBlur(2.0))


def test_page_deblurs_a_chosen_file_and_shows_before_and_after(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(encode(blurred_photo(), "JPEG", quality=90))
    width, height = Image.open(photo).size
    with running_server(make_artifact(tmp_path)) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(f"{server.url}/")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('Model deblur-test')")
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.getElementById('after').complete && "
                                   "document.getElementById('after').naturalWidth > 0", timeout=60_000)
            assert page.eval_on_selector("#after", "img => img.naturalWidth") == width
            assert page.eval_on_selector("#after", "img => img.naturalHeight") == height
            assert page.eval_on_selector("#before", "img => img.naturalWidth") == width
            assert page.get_attribute("#download", "download") == "cat-deblurred.png"
            assert "Done" in page.inner_text("#status")
            page.fill("#slider", "30")
            page.dispatch_event("#slider", "input")
            assert "30%" in page.eval_on_selector("#after", "img => img.style.clipPath")
            screenshot = DOC_SCREENSHOT if os.environ.get("DEBLUR_WRITE_DOC_IMAGES") == "1" else tmp_path / "webpage.png"
            page.screenshot(path=str(screenshot), full_page=True)

            page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"})
            page.wait_for_function("document.getElementById('status').className === 'error'")
            assert "unsupported_media_type" in page.inner_text("#status")
        finally:
            browser.close()
