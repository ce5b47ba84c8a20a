"""``GET /metrics``: Prometheus text exposition (format 0.0.4) of the app's own collector registry."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import MetricsDep
from service.api.errors import OPTIONAL_API_KEY, problem_responses
from service.observability import METRICS_CONTENT_TYPE

router = APIRouter(tags=["metadata"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format 0.0.4.",
        },
        **problem_responses(
            {401: "Missing or wrong API key (when keys are configured and BRATS_PROTECT_METADATA is set)."}
        ),
    },
    openapi_extra=OPTIONAL_API_KEY,
)
async def metrics(collectors: MetricsDep) -> Response:
    return Response(content=collectors.render(), media_type=METRICS_CONTENT_TYPE)
