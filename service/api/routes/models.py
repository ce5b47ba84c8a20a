"""``GET /models``: the loaded models, their cards and the execution provider each session really uses."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import RegistryDep

router = APIRouter(tags=["metadata"])


@router.get(
    "/models",
    summary="Loaded models and their cards",
    description='`{"default": NAME, "models": [card + {"provider": ...}, ...], "failed": {NAME: reason}}`: every '
    "loaded model with its model card and the ONNX Runtime execution provider its session uses (empty while "
    "loading), and the models of the folder that could not be loaded, with the reason.",
)
async def list_models(registry: RegistryDep) -> dict[str, Any]:
    models = [
        {**model.card.model_dump(mode="json"), "provider": model.provider}
        for _, model in sorted(registry.models.items())
    ]
    return {"default": registry.default, "models": models, "failed": dict(sorted(registry.failed.items()))}
