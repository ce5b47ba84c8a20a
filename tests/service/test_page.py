"""The page at ``/`` in a real browser (Debian's Chromium through Playwright) against a real service.

It loads with no console error and no request to another origin; a small synthetic case uploaded through it
shows the overlay (the canvas is not blank and changes when the overlay is toggled), and its volumes are those
of the JSON API for the same upload; a bad upload shows the problem's detail; with API keys on, a missing key
shows the 401 detail. The finished view is saved as a screenshot under the test's folder.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from tests.browser import browser_page, requires_chromium
from tests.service.support import write_case, write_image4d
from tests.tiny_models import expected_labels

pytestmark = requires_chromium

ARTEFACTS = Path(os.environ.get("BRATS_TEST_ARTEFACTS", "runs/test-artefacts"))


def canvas_digest(page) -> str:
    png = page.locator("#viewer").screenshot()
    return hashlib.sha256(png).hexdigest()


def canvas_is_not_blank(page) -> bool:
    """Whether the viewer shows something: more than 100 pixels of its screenshot are not near-black."""
    image = Image.open(io.BytesIO(page.locator("#viewer").screenshot())).convert("L")
    return sum(1 for value in image.getdata() if value > 30) > 100


def choose(page, parts: dict[str, Path]) -> None:
    for part, path in parts.items():
        page.set_input_files(f"#file-{part}", str(path))


def wait_done(page) -> str:
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=60_000)
    return page.evaluate("document.body.dataset.state")


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    return write_case(tmp_path_factory.mktemp("page-case"), label=expected_labels())


def test_page_loads_offline_without_errors(server):
    with browser_page(server.url) as page:
        page.goto(server.url + "/")
        page.wait_for_function("document.body.dataset.state === 'idle'")
        page.wait_for_function("document.getElementById('model').options.length > 1")
        options = page.locator("#model option").all_inner_texts()
        assert "unet" in options and any(o.startswith("ensemble") for o in options)
        assert page.get_by_role("link", name="API documentation").get_attribute("href") == "/docs"
        page.wait_for_load_state("networkidle")
        assert page.other_origin_requests() == [] and page.console_errors() == []


def test_upload_shows_the_overlay_and_the_volumes_of_the_api(server, case, tmp_path):
    with server.client() as client:
        files = [(name, (f"{name}.nii.gz", path.read_bytes())) for name, path in case.items()]
        api = client.post("/segment", files=files).json()
    with browser_page(server.url, viewport={"width": 1200, "height": 1000}) as page:
        page.goto(server.url + "/")
        page.wait_for_function("document.body.dataset.state === 'idle'")
        choose(page, case)
        page.click("#segment")
        assert wait_done(page) == "done", page.locator("#problem").inner_text()
        page.wait_for_timeout(500)  # the viewer draws on the next animation frames
        assert canvas_is_not_blank(page)
        with_overlay = canvas_digest(page)
        page.uncheck("#overlay")
        page.wait_for_timeout(300)
        without_overlay = canvas_digest(page)
        assert with_overlay != without_overlay
        page.check("#overlay")
        rows = page.locator("#volumes tbody tr").all_inner_texts()
        shown = {r.split("\t")[0]: float(r.split("\t")[1]) for r in rows}
        assert shown == {region: round(ml, 2) for region, ml in api["volumes_ml"].items()}
        dice = page.locator("#scores tbody tr").all_inner_texts()
        assert [r.split("\t")[:2] for r in dice] == [[region, "1.000"] for region in ("WT", "TC", "ET")]
        with page.expect_download() as download:
            page.click("#download")
        assert download.value.suggested_filename == "mask.nii.gz"
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTEFACTS / "page.png"), full_page=True)
        assert page.other_origin_requests() == [] and page.console_errors() == []


def test_one_4d_image_and_the_background_switch(server, tmp_path):
    image = write_image4d(tmp_path / "case_4d.nii.gz")
    with browser_page(server.url) as page:
        page.goto(server.url + "/")
        page.wait_for_function("document.body.dataset.state === 'idle'")
        choose(page, {"image": image})
        page.click("#segment")
        assert wait_done(page) == "done", page.locator("#problem").inner_text()
        page.wait_for_timeout(300)
        t1ce = canvas_digest(page)
        page.select_option("#background", "flair")
        page.wait_for_timeout(500)
        assert canvas_digest(page) != t1ce
        assert page.console_errors() == []


def test_a_bad_upload_shows_the_problem_detail(server, case, tmp_path):
    broken = tmp_path / "t2.nii.gz"
    broken.write_bytes(b"\x1f\x8b not a volume")
    with browser_page(server.url) as page:
        page.goto(server.url + "/")
        page.wait_for_function("document.body.dataset.state === 'idle'")
        choose(page, {**{m: case[m] for m in ("flair", "t1", "t1ce")}, "t2": broken})
        page.click("#segment")
        assert wait_done(page) == "error"
        problem = page.locator("#problem").inner_text()
        assert problem.startswith("400") and "part t2" in problem and "gzip" in problem


def test_missing_modality_is_said_before_any_upload(server, case):
    with browser_page(server.url) as page:
        page.goto(server.url + "/")
        page.wait_for_function("document.body.dataset.state === 'idle'")
        choose(page, {"flair": case["flair"]})
        page.click("#segment")
        assert "missing: t1, t1ce, t2" in page.locator("#problem").inner_text()
        assert not [url for url in page.requests if "/segment" in url]


def test_with_keys_a_missing_key_shows_the_401_detail_and_a_key_works(server_factory, case):
    keyed = server_factory(settings={"api_keys": ["page-key-1"], "protect_metadata": True})
    with browser_page(keyed.url) as page:
        page.goto(keyed.url + "/")
        page.wait_for_function("document.body.dataset.state === 'idle'")
        page.wait_for_function("!document.getElementById('problem').hidden")
        assert "401" in page.locator("#problem").inner_text()
        choose(page, case)
        page.click("#segment")
        assert wait_done(page) == "error"
        assert "401 API key required" in page.locator("#problem").inner_text()
        page.fill("#api-key", "page-key-1")
        page.dispatch_event("#api-key", "change")
        page.click("#segment")
        assert wait_done(page) == "done", page.locator("#problem").inner_text()
        assert page.evaluate("sessionStorage.getItem('brats-api-key')") == "page-key-1"
        assert page.evaluate("localStorage.length") == 0
