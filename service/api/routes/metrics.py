"""``GET /metrics``: Prometheus text exposition (format 0.0.4) of the app's own collector registry."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import MetricsDep
from service.observability import METRICS_CONTENT_TYPE

router = APIRouter(tags=["metadata"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4."}},
)
async def metrics(collectors: MetricsDep) -> Response:
    return Response(content=collectors.render(), media_type=METRICS_CONTENT_TYPE)
