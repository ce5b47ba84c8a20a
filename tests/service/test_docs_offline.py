"""``/docs`` works without internet: Swagger UI from ``service/static/vendor``, checked in a real browser.

A closed hospital network reaches no CDN. A real service is started and ``/docs`` is loaded in Debian's
Chromium (:mod:`tests.browser`), which aborts every request to another origin: the page must render the
operations with no console error and no request leaving the service. The HTML of ``/docs`` is checked too
(every ``src``/``href`` same-origin and served), and the vendored files against ``VERSIONS`` (what
``scripts/vendor_assets.sh`` copied) and their content types as served.
"""

from __future__ import annotations

import hashlib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.browser import browser_page, requires_chromium, same_origin

ROOT = Path(__file__).resolve().parents[2]
VENDOR = ROOT / "service" / "static" / "vendor"
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".txt": "text/plain",
                 "": "text/plain"}
"""Media type by file extension (``LICENSE``, ``NOTICE``: none)."""


def vendored() -> list[tuple[str, str, str, str]]:
    """``(package, version, sha256, file)`` of every line of ``VERSIONS``."""
    rows = []
    for line in (VENDOR / "VERSIONS").read_text().splitlines():
        if line and not line.startswith("#"):
            package, version, sha256, file = line.split("\t")
            rows.append((package, version, sha256, file))
    return rows


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


@requires_chromium
def test_docs_render_in_chromium_without_leaving_the_service(server):
    with browser_page(server.url) as page:
        page.goto(server.url + "/docs")
        page.wait_for_selector(".opblock")
        page.wait_for_load_state("networkidle")
        operations = [" ".join(text.split()) for text in page.locator(".opblock-summary").all_inner_texts()]
        assert any(op.startswith("POST /segment") for op in operations), operations
        assert any(op.startswith("GET /models") for op in operations), operations
        # an operation opens, with its parameters and "Try it out"
        page.locator(".opblock-post .opblock-summary").first.click()
        page.get_by_role("button", name="Try it out").first.wait_for()
        viewer = page.get_by_role("link", name="Viewer")
        assert viewer.get_attribute("href") == "/"
        paths = [urlsplit(url).path for url in page.requests]
        assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in paths and "/openapi.json" in paths
        assert page.other_origin_requests() == []
        assert page.console_errors() == []


@requires_chromium
def test_the_browser_harness_catches_a_cdn_request(server):
    """The check above means something: a request to a CDN is recorded, aborted and shows as an error."""
    with browser_page(server.url) as page:
        page.goto(server.url + "/healthz")
        cdn = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"
        assert page.evaluate("url => fetch(url).then(() => 'loaded', () => 'failed')", cdn) == "failed"
        assert page.other_origin_requests() == [cdn]
        assert page.blocked == page.other_origin_requests()
        assert page.console_errors()


@requires_chromium
def test_vendored_niivue_loads_as_an_es_module(server):
    with browser_page(server.url) as page:
        page.goto(server.url + "/healthz")
        kind = page.evaluate("import('/static/vendor/niivue/index.js').then(m => typeof m.Niivue)")
        assert kind == "function"
        page.wait_for_load_state("networkidle")
        assert page.other_origin_requests() == []
        assert page.console_errors() == []


def test_docs_html_references_only_the_service(server):
    response = httpx.get(server.url + "/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    parser = _Links()
    parser.feed(response.text)
    assert len(parser.urls) >= 4, parser.urls  # the viewer link, the CSS, the favicon, the script
    for url in parser.urls:
        absolute = urljoin(server.url + "/docs", url)
        assert same_origin(absolute, server.url), f"/docs refers to {url}"
        if url.startswith("/static/"):
            assert httpx.get(absolute).status_code == 200, url
    assert "url: '/openapi.json'" in response.text
    assert "cdn." not in response.text and "https://" not in response.text


def test_oauth2_redirect_and_no_redoc(server):
    redirect = httpx.get(server.url + "/docs/oauth2-redirect")
    assert redirect.status_code == 200 and redirect.headers["content-type"].startswith("text/html")
    assert "oauth2" in redirect.text
    assert httpx.get(server.url + "/redoc").status_code == 404
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert not {"/docs", "/docs/oauth2-redirect", "/redoc"} & set(paths)


def test_versions_lists_every_vendored_file_with_its_hash():
    rows = vendored()
    packages = {package for package, *_ in rows}
    assert packages == {"swagger-ui-dist", "@niivue/niivue"}
    listed = {file for *_, file in rows}
    on_disk = {p.relative_to(VENDOR).as_posix() for p in VENDOR.rglob("*") if p.is_file()} - {"VERSIONS"}
    assert listed == on_disk
    for package, version, sha256, file in rows:
        assert hashlib.sha256((VENDOR / file).read_bytes()).hexdigest() == sha256, f"{file} is not {package}@{version}"
    for needed in ("swagger-ui/swagger-ui-bundle.js", "swagger-ui/swagger-ui.css", "swagger-ui/LICENSE",
                   "swagger-ui/NOTICE", "niivue/index.js", "niivue/LICENSE"):
        assert needed in listed, needed


@pytest.mark.parametrize("row", vendored(), ids=lambda row: row[3])
def test_vendored_file_served_with_its_content_type(server, row):
    _, _, sha256, file = row
    response = httpx.get(f"{server.url}/static/vendor/{file}")
    assert response.status_code == 200, file
    media_type = response.headers["content-type"].split(";")[0].strip()
    assert media_type == CONTENT_TYPES[Path(file).suffix], f"{file}: {media_type}"
    assert hashlib.sha256(response.content).hexdigest() == sha256


def test_static_files_answer_problems_for_the_rest(server):
    missing = httpx.get(server.url + "/static/vendor/nothing-here.js")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    assert httpx.post(server.url + "/static/vendor/VERSIONS").status_code == 405
