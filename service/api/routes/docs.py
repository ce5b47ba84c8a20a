"""``GET /docs`` (Swagger UI) and ``GET /docs/oauth2-redirect``, served without any CDN, and the static files.

FastAPI's own ``/docs`` loads Swagger UI from a CDN, which a closed hospital network cannot reach. The app is
created with ``docs_url=None, redoc_url=None`` and this router serves the same page with the JavaScript, CSS
and favicon vendored in ``service/static/vendor/`` (refreshed with ``make vendor``, see
``scripts/vendor_assets.sh``), which :func:`static_files` serves under ``/static``. ReDoc is off: its bundle
would be one more vendored asset for a second view of the same schema.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
"""``service/static``: mounted at ``/static`` (package data, so installed with the service)."""
STATIC_URL = "/static"
SWAGGER_UI_URL = STATIC_URL + "/vendor/swagger-ui"
DOCS_URL = "/docs"
OAUTH2_REDIRECT_URL = DOCS_URL + "/oauth2-redirect"
VIEWER_URL = "/"

router = APIRouter(include_in_schema=False)


class _StaticFiles(StaticFiles):
    """Files without an extension (``LICENSE``, ``NOTICE``) as ``text/plain``, readable in a browser."""

    def file_response(self, full_path, *args, **kwargs) -> Response:
        response = super().file_response(full_path, *args, **kwargs)
        if isinstance(response, FileResponse) and not Path(full_path).suffix:
            response.headers["content-type"] = "text/plain; charset=utf-8"
        return response


def static_files() -> StaticFiles:
    """The app to mount at :data:`STATIC_URL`: the files of :data:`STATIC_DIR`.

    ``.js`` is served as ``text/javascript`` (RFC 9239) whatever the host's MIME table says: browsers refuse
    an ES module (the NiiVue bundle) served with another type.
    """
    mimetypes.add_type("text/javascript", ".js")
    mimetypes.add_type("text/css", ".css")
    return _StaticFiles(directory=STATIC_DIR)


@router.get(DOCS_URL)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    page = get_swagger_ui_html(
        openapi_url=root + request.app.openapi_url,
        title=request.app.title + " - API",
        swagger_js_url=root + SWAGGER_UI_URL + "/swagger-ui-bundle.js",
        swagger_css_url=root + SWAGGER_UI_URL + "/swagger-ui.css",
        swagger_favicon_url=root + SWAGGER_UI_URL + "/favicon-32x32.png",
        oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
        init_oauth=request.app.swagger_ui_init_oauth,
        # validatorUrl: no badge that asks validator.swagger.io about the schema
        swagger_ui_parameters={"validatorUrl": None, **(request.app.swagger_ui_parameters or {})},
    )
    # A link to the viewer above Swagger UI.
    link = (
        '<nav style="font-family: sans-serif; padding: 8px 20px; border-bottom: 1px solid #ddd">'
        f'<a href="{root + VIEWER_URL}">Viewer</a></nav>'
    )
    html = bytes(page.body).decode("utf-8").replace("<body>", "<body>\n" + link, 1)
    return HTMLResponse(html)


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()
