"""The FastAPI application: :func:`create_app` wires settings, the model catalogue, the inference queue,
metrics, middleware, error handlers and one router per resource.

Nothing is built at import time. ``python -m service`` creates the app from the environment; tests create
apps with their own :class:`~service.settings.Settings`. The lifespan loads the models once, in a worker
thread while the server already answers (``/readyz`` says 503 until they are loaded); a folder without models
still starts (``/readyz`` answers 503 with the reason) unless ``BRATS_REQUIRE_MODELS`` is set.

For an ASGI server of your own: ``uvicorn --factory service.main:create_app``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.deps import ApiKeyDep, MetadataKeyDep
from service.api.errors import install_error_handlers
from service.api.routes import docs, health, metrics, models, page, segment
from service.api.request_context import RequestContextMiddleware
from service.api.upload_folders import remove_stale_folders
from service.catalogue import ModelCatalogue
from service.core.series_rules import load_rules
from service.inference.queue import InferenceQueue
from service.observability import Metrics
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)

DESCRIPTION = """Brain tumour segmentation of BraTS 2020 MRI (FLAIR, T1, T1ce, T2) with U-Net and ResU-Net
models served by ONNX Runtime. Errors are RFC 9457 problem details (`application/problem+json`). When API keys
are configured, send one in the `X-API-Key` header."""


class ModelsUnavailableError(RuntimeError):
    """``BRATS_REQUIRE_MODELS`` is set and the models could not be loaded."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Remove upload folders left by a killed process, load the models in a worker thread unless already
    loaded; stop the inference queue after.

    Without ``BRATS_REQUIRE_MODELS`` the server starts listening at once and loads in the background:
    ``/healthz`` answers while the models load and ``/readyz`` says 503 until they are. With it, loading
    finishes (or fails, and the server does not start) before anything is served.
    """
    catalogue: ModelCatalogue = app.state.catalogue
    settings: Settings = app.state.settings
    remove_stale_folders(settings.tmp_dir)
    loading: asyncio.Task | None = None
    if not catalogue.ready:
        if settings.require_models:
            await asyncio.to_thread(catalogue.load)
            if not catalogue.ready:
                raise ModelsUnavailableError(f"BRATS_REQUIRE_MODELS is set and {catalogue.reason}")
        else:
            loading = asyncio.create_task(asyncio.to_thread(catalogue.load))
    try:
        yield
    finally:
        if loading is not None:
            await loading  # a thread cannot be interrupted: let it finish before the queue closes
        app.state.queue.close()


def create_app(settings: Settings | None = None, *, catalogue: ModelCatalogue | None = None) -> FastAPI:
    """Build the application.

    Args:
        settings: configuration; default :func:`~service.settings.get_settings` (the environment).
        catalogue: the models to serve (already loaded, or loaded by the lifespan); default a new catalogue
            built from ``settings``. The app's metrics are the catalogue's.
    """
    settings = settings if settings is not None else get_settings()
    app_metrics = catalogue.metrics if catalogue is not None else Metrics()
    catalogue = catalogue if catalogue is not None else ModelCatalogue(settings, metrics=app_metrics)
    queue = InferenceQueue(settings.max_concurrent, settings.max_queue, metrics=app_metrics)

    app = FastAPI(
        title="BraTS brain tumour segmentation",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by service.api.routes.docs from vendored assets, without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.catalogue = catalogue
    app.state.queue = queue
    app.state.series_rules = load_rules(settings.series_rules)
    app.state.metrics = app_metrics

    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=app_metrics)

    app.include_router(segment.router, dependencies=[ApiKeyDep])
    app.include_router(models.router, dependencies=[MetadataKeyDep])
    app.include_router(metrics.router, dependencies=[MetadataKeyDep])
    app.include_router(health.router)
    app.include_router(docs.router)
    app.include_router(page.router)
    app.mount(docs.STATIC_URL, docs.static_files(), name="static")
    return app
