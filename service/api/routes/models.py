"""``GET /models``: the loaded models, their cards and the execution provider each session really uses."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import CatalogueDep
from service.api.errors import OPTIONAL_API_KEY, problem_responses

router = APIRouter(tags=["metadata"])


@router.get(
    "/models",
    summary="Loaded models and their cards",
    description='`{"default": NAME, "models": [card + {"provider", "backend", "device", "precision"}, ...], '
    '"failed": {NAME: reason}}`: every loaded model with its model card and what really runs it (the ONNX Runtime '
    "execution provider or OpenVINO; `onnxruntime` or `openvino`; `CPU` or `GPU`; `fp32` or `bf16`), empty while "
    "loading, and the models of the folder that could not be loaded, with the reason.",
    responses=problem_responses(
        {401: "Missing or wrong API key (when keys are configured and BRATS_PROTECT_METADATA is set)."}
    ),
    openapi_extra=OPTIONAL_API_KEY,
)
async def list_models(catalogue: CatalogueDep) -> dict[str, Any]:
    models = [
        {
            **model.card.model_dump(mode="json"),
            "provider": model.provider,
            "backend": model.backend,
            "device": model.device,
            "precision": model.precision,
        }
        for _, model in sorted(catalogue.models.items())
    ]
    return {"default": catalogue.default, "models": models, "failed": dict(sorted(catalogue.failed.items()))}
