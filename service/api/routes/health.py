"""``GET /healthz`` (liveness) and ``GET /readyz`` (readiness).

Both are plain coroutines that touch neither the inference executor nor a thread pool, so they answer
promptly while inference saturates the CPU.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import CatalogueDep
from service.api.errors import ProblemError, problem_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: 200 while the process serves")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 once every configured model is loaded",
    responses=problem_responses({503: "Not ready; `detail` says why."}),
)
async def readyz(catalogue: CatalogueDep) -> dict[str, object]:
    if not catalogue.ready:
        raise ProblemError(503, "Not ready", f"The service is not ready: {catalogue.reason}")
    return {"status": "ready", "models": catalogue.names, "default": catalogue.default}
