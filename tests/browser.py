"""A real browser for the tests of the service's pages: Debian's Chromium, headless, driven by Playwright.

Playwright's own browser download (``playwright install``) comes from a CDN; these tests use the Chromium of
the system instead (Debian package ``chromium``, ``/usr/bin/chromium``; ``.ci/run`` installs it).

    from tests.browser import browser_page, requires_chromium

    @requires_chromium
    def test_page(server):
        with browser_page(server.url) as page:          # a RecordedPage: a Playwright Page and what it did
            page.goto(server.url + "/docs")              # any Playwright Page method works on it
            page.wait_for_selector(".opblock")
            assert page.other_origin_requests() == []    # nothing asked of a CDN or any other host
            assert page.console_errors() == []           # no console error, no uncaught exception

Every request to an origin other than ``base_url``'s is recorded and aborted (as a closed hospital network
would leave it unanswered), so a page that loads anything from a CDN fails the test instead of quietly working
on a machine with internet access.

``chromium_available()`` is false when the binary or the ``playwright`` package is missing; tests mark
themselves with :data:`requires_chromium` (skip reason :data:`MISSING_REASON`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest

BINARY_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
MISSING_REASON = (
    "Chromium is not installed (Debian package chromium, /usr/bin/chromium; .ci/run installs it, or set "
    "CHROMIUM_BINARY), or the Python package playwright is missing (make setup); never `playwright install`"
)
DEFAULT_TIMEOUT_MS = 20_000
NOT_NETWORK = ("data", "blob", "about")
"""URL schemes that never leave the browser."""


def chromium_binary() -> str | None:
    """The Chromium executable: ``$CHROMIUM_BINARY``, Debian's ``/usr/bin/chromium``, or ``chromium`` on the PATH."""
    override = os.environ.get("CHROMIUM_BINARY")
    if override:
        return override if os.access(override, os.X_OK) else None
    found = next((path for path in BINARY_CANDIDATES if os.access(path, os.X_OK)), None)
    return found or shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_available() -> bool:
    """Whether the browser tests can run: a Chromium binary and the ``playwright`` package."""
    if chromium_binary() is None:
        return False
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


requires_chromium = pytest.mark.skipif(not chromium_available(), reason=MISSING_REASON)
"""Mark for a test that needs :func:`browser_page`."""


def origin(url: str) -> tuple[str, str]:
    """``(scheme, host:port)`` of a URL, the port made explicit."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.scheme, f"{parts.hostname}:{port}"


def same_origin(url: str, base_url: str) -> bool:
    """Whether ``url`` stays with ``base_url``'s origin (``data:``, ``blob:`` and ``about:`` URLs always do)."""
    if urlsplit(url).scheme in NOT_NETWORK:
        return True
    return origin(url) == origin(base_url)


class RecordedPage:
    """A Playwright ``Page`` (every attribute not defined here is the page's) and what happened on it.

    Attributes:
        page: the Playwright page.
        base_url: the origin the page may talk to.
        requests: the URL of every request the page made, in order (those aborted too).
        blocked: the requests aborted because they went to another origin.
        console: ``(type, text)`` of every console message.
        page_errors: the message of every uncaught exception.
    """

    def __init__(self, page: Any, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.requests: list[str] = []
        self.blocked: list[str] = []
        self.console: list[tuple[str, str]] = []
        self.page_errors: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("console", lambda message: self.console.append((message.type, message.text)))
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.page, name)

    def other_origin_requests(self, base_url: str | None = None) -> list[str]:
        """The requests to an origin other than ``base_url`` (default the page's :attr:`base_url`)."""
        base = base_url if base_url is not None else self.base_url
        return [url for url in self.requests if not same_origin(url, base)]

    def console_errors(self) -> list[str]:
        """Console messages of type error, then uncaught exceptions (``pageerror: ...``)."""
        return [text for kind, text in self.console if kind == "error"] + [
            f"pageerror: {message}" for message in self.page_errors
        ]


def launch_args(extra: Sequence[str] = ()) -> list[str]:
    """Chromium's command line: no sandbox for root (Chromium refuses to start as root otherwise), no use of
    the small ``/dev/shm`` of containers, WebGL on the CPU (SwiftShader) for pages that draw with it."""
    args = ["--disable-dev-shm-usage", "--enable-unsafe-swiftshader", "--use-angle=swiftshader"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")
    return [*args, *extra]


@contextmanager
def browser_page(
    base_url: str,
    *,
    timeout_ms: float = DEFAULT_TIMEOUT_MS,
    viewport: dict[str, int] | None = None,
    args: Sequence[str] = (),
) -> Iterator[RecordedPage]:
    """A fresh headless Chromium with one page that may talk to ``base_url``'s origin only.

    Args:
        base_url: the service (``http://127.0.0.1:PORT``); requests elsewhere are recorded and aborted.
        timeout_ms: default timeout of every Playwright wait and navigation.
        viewport: ``{"width": ..., "height": ...}``; default Playwright's 1280x720.
        args: more Chromium command line flags.

    Raises:
        pytest.skip.Exception: Chromium or playwright is missing (see :data:`MISSING_REASON`).
    """
    binary = chromium_binary()
    if binary is None or not chromium_available():
        pytest.skip(MISSING_REASON)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, headless=True, args=launch_args(args))
        try:
            context = browser.new_context(**({"viewport": viewport} if viewport else {}))
            recorded: RecordedPage | None = None

            def only_base_origin(route) -> None:
                url = route.request.url
                if same_origin(url, base_url):
                    route.continue_()
                else:
                    if recorded is not None:
                        recorded.blocked.append(url)
                    route.abort("blockedbyclient")

            context.route("**/*", only_base_origin)
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            recorded = RecordedPage(page, base_url)
            yield recorded
        finally:
            browser.close()
