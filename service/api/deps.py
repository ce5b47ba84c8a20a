"""Typed dependencies that hand routes what they need: settings, the model catalogue, the inference queue,
the request id, and the API key check.

Everything comes from ``app.state`` (set by :func:`service.main.create_app`), never from module globals, so
that tests can build apps with their own settings side by side.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.api.errors import ProblemError
from service.observability import Metrics
from service.catalogue import ModelCatalogue
from service.inference.queue import InferenceQueue
from service.settings import Settings

API_KEY_HEADER = "X-API-Key"
WWW_AUTHENTICATE = {"WWW-Authenticate": "ApiKey"}

_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="One of the keys configured in BRATS_API_KEYS (only needed when keys are configured).",
)


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


def get_catalogue(request: Request) -> ModelCatalogue:
    """The app's model catalogue (built by ``create_app``, loaded by the lifespan)."""
    return request.app.state.catalogue


def get_queue(request: Request) -> InferenceQueue:
    """The app's inference queue."""
    return request.app.state.queue


def get_metrics(request: Request) -> Metrics:
    """The app's Prometheus collectors."""
    return request.app.state.metrics


def get_request_id(request: Request) -> str:
    """The id of this request (also in ``X-Request-ID`` and in every log line)."""
    return str(getattr(request.state, "request_id", "-"))


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
CatalogueDep = Annotated[ModelCatalogue, Depends(get_catalogue)]
QueueDep = Annotated[InferenceQueue, Depends(get_queue)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RequestIdDep = Annotated[str, Depends(get_request_id)]


def key_is_valid(given: str | None, keys: list[str]) -> bool:
    """Whether ``given`` equals one of ``keys``, compared in constant time against every key (no early exit;
    fixed-length digests are compared, so the timing reveals neither which key matched, nor how much of it,
    nor its length).

    Header values arrive decoded as latin-1, so ``given`` is turned back into the bytes the client sent; a key
    is compared as the UTF-8 bytes a client sends for it.
    """
    if given is None:
        return False
    candidate = hashlib.sha256(given.encode("latin-1", "replace")).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, hashlib.sha256(key.encode("utf-8")).digest())
    return matched


def check_api_key(settings: Settings, given: str | None) -> None:
    """Raise a 401 problem (with ``WWW-Authenticate: ApiKey``) unless keys are off or ``given`` is one."""
    if not settings.api_keys:
        return
    if given is None or given == "":
        raise ProblemError(
            401, "API key required",
            f"This service requires an API key: send it in the {API_KEY_HEADER} header.",
            headers=WWW_AUTHENTICATE,
        )
    if not key_is_valid(given, settings.api_keys):
        raise ProblemError(
            401, "Invalid API key",
            f"The {API_KEY_HEADER} header does not hold a valid API key; check the key you were given.",
            headers=WWW_AUTHENTICATE,
        )


async def require_api_key(settings: SettingsDep, api_key: Annotated[str | None, Security(_api_key_header)]) -> None:
    """Dependency: a valid ``X-API-Key`` when ``BRATS_API_KEYS`` is set (always, for ``POST /segment``)."""
    check_api_key(settings, api_key)


async def require_metadata_key(
    settings: SettingsDep, api_key: Annotated[str | None, Security(_api_key_header)]
) -> None:
    """Dependency for ``/models`` and ``/metrics``: a valid key when keys are set and
    ``BRATS_PROTECT_METADATA`` is true; open otherwise."""
    if settings.protect_metadata:
        check_api_key(settings, api_key)


ApiKeyDep = Depends(require_api_key)
"""For ``dependencies=[ApiKeyDep]`` on a route or router."""

MetadataKeyDep = Depends(require_metadata_key)
