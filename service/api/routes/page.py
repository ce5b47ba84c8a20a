"""``GET /``: the page to segment a scan and look at the result (``service/static/page``).

A static single page: no build step, nothing loaded from another origin (the viewer, NiiVue, is served from
``/static/vendor``). It calls the same HTTP API as any client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(tags=["page"])

PAGE = Path(__file__).resolve().parents[2] / "static" / "page" / "index.html"


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The segmentation page."""
    return FileResponse(PAGE, media_type="text/html", headers={"Cache-Control": "no-cache"})
