"""``POST /segment``: NIfTI parts in, BraTS labels out (SPEC section 2).

The route translates: it resolves the model, receives the upload (:mod:`service.api.uploads`), runs
:func:`segment_upload` (decode, segment, metrics, encode) as one job on the registry's bounded executor, so
that the whole CPU-heavy part counts toward the concurrency limit and never runs on the event loop, and
turns the result into JSON or a ``.nii.gz`` reply.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response

from service.api.deps import RegistryDep, SettingsDep
from service.api.errors import OPTIONAL_API_KEY, ProblemError, problem_responses
from service.api.schemas import BRATS_LABELS, SegmentQuery, SegmentResponse, SegmentSummary
from service.api.uploads import (
    CLIENT_CLOSED_REQUEST,
    EXPECTED_PARTS,
    IMAGE_PART,
    LABEL_PART,
    Upload,
    received_upload,
)
from service.core.labels import MODALITIES
from service.core.scoring import region_metrics, volumes_ml
from service.core.workers import thread_pool
from service.core.geometry import Geometry, grid_mismatch
from service.core.nifti import NiftiError, VolumeTooLargeError, load_label, load_volume, read_header
from service.core.nifti_write import mask_to_bytes
from service.inference.engine import Engine, InferenceCancelled
from service.registry import ModelRegistry, QueueFullError

__all__ = ["router", "segment_upload", "SegmentOutcome"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["segmentation"])

RETRY_AFTER_S = 1
"""``Retry-After`` of a 503 for a full queue: retry soon, a slot frees when any inference ends."""


_MULTIPART_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "description": EXPECTED_PARTS,
                "properties": {
                    **{m: {"type": "string", "format": "binary", "description": f"{m} (3D)"} for m in MODALITIES},
                    IMAGE_PART: {"type": "string", "format": "binary", "description": "(X, Y, Z, 4) in channel order"},
                    LABEL_PART: {"type": "string", "format": "binary", "description": "ground truth, labels 0/1/2/4"},
                },
                "additionalProperties": False,
                "oneOf": [
                    {"required": list(MODALITIES), "not": {"required": [IMAGE_PART]}},
                    {"required": [IMAGE_PART], "not": {"anyOf": [{"required": [m]} for m in MODALITIES]}},
                ],
            }
        }
    },
}

_RESPONSES: dict[int | str, dict] = {
    200: {
        "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
        "description": "JSON summary with the mask in base64 (format=json), or the mask as .nii.gz (format=nifti) "
        "with the summary in the header X-Segment-Summary.",
        "headers": {
            "X-Segment-Summary": {
                "description": "format=nifti only: the JSON summary without `mask`, compact.",
                "schema": {"type": "string"},
            }
        },
    },
    **problem_responses(
        {
            400: "Unreadable or inconsistent input, or parts that break the rules.",
            401: "Missing or wrong API key (when keys are configured).",
            408: "The body did not arrive in time.",
            413: "Upload over the byte limit, or a volume over the voxel limit.",
            415: "The body is not multipart/form-data.",
            422: "Invalid query parameters (unknown model, format, ...).",
            503: "Not ready, or the inference queue is full (see Retry-After).",
        },
        headers={503: {"Retry-After": "Seconds to wait before sending the request again."}},
    ),
}


@dataclass(frozen=True)
class SegmentOutcome:
    """What :func:`segment_upload` computed (everything but the model's identity and the total time).

    ``timings_ms`` has ``decode``, ``preprocess``, ``inference`` and ``postprocess``; ``engine_s`` is the time
    spent in :meth:`Engine.segment` (the ``brats_inference_duration_seconds`` observation).
    """

    geometry: Geometry
    volumes_ml: dict[str, float]
    metrics: dict[str, dict[str, float | None]] | None
    mask: bytes
    timings_ms: dict[str, float]
    engine_s: float
    postprocessed: bool = False


# ------------------------------------------------------------------------------------------ the job


def _invalid(part: str, err: NiftiError) -> ProblemError:
    return ProblemError(400, "Invalid NIfTI volume", f"part {part}: {err.reason}")


def _read(
    part: str, path: Path, *, ndim: int, max_voxels: int | None, out: np.ndarray | None = None
) -> tuple[np.ndarray, Geometry]:
    """Read one part (``label``: as BraTS labels), turning a NIfTI problem into a problem reply that names the
    part, never the path."""
    try:
        if part == LABEL_PART:
            return load_label(path, max_voxels=max_voxels)
        return load_volume(path, ndim=ndim, max_voxels=max_voxels, out=out)
    except VolumeTooLargeError as err:
        raise ProblemError(
            413,
            "Volume Too Large",
            f"part {part}: {err.reason}; ask the operator to raise BRATS_MAX_VOXELS if the volume is genuine",
        ) from None
    except NiftiError as err:
        raise _invalid(part, err) from None


def _read_header_geometry(part: str, path: Path) -> Geometry | None:
    """The part's geometry from its header alone; ``None`` when the header's geometry is invalid (reading the
    whole part then says precisely why)."""
    try:
        header = read_header(path)
    except NiftiError as err:
        raise _invalid(part, err) from None
    try:
        return Geometry.from_header(header)
    except Exception:  # noqa: BLE001 - nibabel's HeaderDataError, ValueError, OverflowError: see the docstring
        return None


def _check_same_grid(part: str, geometry: Geometry, reference: Geometry, reference_part: str) -> None:
    mismatch = grid_mismatch(geometry, reference)
    if mismatch is not None:
        raise ProblemError(
            400,
            "Mismatched volumes",
            f"part {part}: {mismatch}, compared with part {reference_part}; all parts must be co-registered on "
            "the same voxel grid",
        )


def read_image(upload: Upload, *, max_voxels: int | None) -> tuple[np.ndarray, Geometry]:
    """The image ``(4, X, Y, Z)`` float32 in ``MODALITIES`` order and its geometry, from either input form.

    The four modality parts are decoded in parallel straight into their channel of the image (the shape
    comes from the first part's header); problems are reported for the first part, in ``MODALITIES`` order,
    that has one.

    Raises:
        ProblemError: 413 for a header over ``max_voxels``; 400 for an unreadable part, a 4D image without 4
            channels, or modality parts that differ in shape or affine.
    """
    if upload.image_parts == (IMAGE_PART,):
        data, geometry = _read(IMAGE_PART, upload.files[IMAGE_PART], ndim=4, max_voxels=max_voxels)
        if data.shape[-1] != len(MODALITIES):
            raise ProblemError(
                400,
                "Invalid NIfTI volume",
                f"part {IMAGE_PART}: expected a 4D volume (X, Y, Z, {len(MODALITIES)}) with the channels "
                f"{', '.join(MODALITIES)} on the last axis, got shape {data.shape}",
            )
        return np.ascontiguousarray(np.moveaxis(data, -1, 0), dtype=np.float32), geometry
    first = MODALITIES[0]
    reference = _read_header_geometry(first, upload.files[first])
    if reference is None or (max_voxels is not None and math.prod(reference.shape) > max_voxels):
        # the full read of the first part reports what is wrong with it (or, should it pass, its geometry)
        reference = _read(first, upload.files[first], ndim=3, max_voxels=max_voxels)[1]
    image = np.empty((len(MODALITIES), *reference.shape), dtype=np.float32)

    def decode(index: int) -> Geometry:
        part = MODALITIES[index]
        path = upload.files[part]
        if index > 0:
            geometry = _read_header_geometry(part, path)
            if geometry is not None and geometry.shape != reference.shape:
                return geometry  # mismatched shape: reported below, nothing to decode
        return _read(part, path, ndim=3, max_voxels=max_voxels, out=image[index])[1]

    geometries = list(thread_pool().map(decode, range(len(MODALITIES))))
    for part, geometry in zip(MODALITIES[1:], geometries[1:]):
        _check_same_grid(part, geometry, geometries[0], first)
    return image, geometries[0]


def segment_upload(
    upload: Upload,
    engine: Engine,
    *,
    tta: bool,
    max_voxels: int | None,
    cancel: threading.Event | None = None,
    postprocess: bool = True,
) -> SegmentOutcome:
    """Decode the parts, segment, score against the label if any, and encode the mask (blocking; run in a
    worker thread). ``postprocess``: apply the model card's postprocessing rules (see :meth:`Engine.segment`).

    Raises:
        ProblemError: for every input problem (400, 413); see :func:`read_image`.
        InferenceCancelled: ``cancel`` was set before the inference ended.
    """
    start = time.perf_counter()
    image, geometry = read_image(upload, max_voxels=max_voxels)
    ground_truth = None
    if upload.label is not None:
        ground_truth, label_geometry = _read(LABEL_PART, upload.label, ndim=3, max_voxels=max_voxels)
        _check_same_grid(LABEL_PART, label_geometry, geometry, upload.image_parts[0])
    decoded = time.perf_counter()
    result = engine.segment(image, tta=tta, cancel=cancel, postprocess=postprocess, spacing=geometry.zooms)
    del image
    segmented = time.perf_counter()
    metrics = None if ground_truth is None else region_metrics(result.labels, ground_truth, geometry.zooms)
    volumes = volumes_ml(result.labels, geometry.zooms)
    mask = mask_to_bytes(result.labels, geometry)
    end = time.perf_counter()
    engine_ms = result.timings_ms
    timings = {
        "decode": 1000 * (decoded - start),
        "preprocess": engine_ms.get("preprocess", 0.0),
        "inference": engine_ms.get("inference", 0.0),
        "postprocess": engine_ms.get("postprocess", 0.0) + 1000 * (end - segmented),
    }
    return SegmentOutcome(
        geometry=geometry,
        volumes_ml=volumes,
        metrics=metrics,
        mask=mask,
        timings_ms=timings,
        engine_s=segmented - decoded,
        postprocessed=result.postprocessed,
    )


# ------------------------------------------------------------------------------------------ the route


def _resolve_model(requested: str | None, registry: ModelRegistry) -> str:
    """The model to use; the service serves the models it loaded even when another one failed to load."""
    if not registry.models:
        raise ProblemError(503, "Not ready", f"the service is not ready: {registry.reason}",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
    valid = registry.choices
    if requested is None and registry.default is None:
        raise ProblemError(
            503, "Not ready",
            f"no default model is available ({registry.reason}); name one of {', '.join(valid)} in the query "
            "parameter 'model'",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    name = registry.default if requested is None else requested
    if name not in valid:
        raise ProblemError(
            422,
            "Unknown model",
            f"query parameter 'model': {name[:60]!r} is not a loaded model; choose one of {', '.join(valid)} "
            f"(or leave it out for the default, {registry.default})",
        )
    return name


def _gone() -> ProblemError:
    return ProblemError(CLIENT_CLOSED_REQUEST, "Client Closed Request", "the client disconnected")


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects. Call it only once the body has been read: from then on the
    server's next message for this request can only be ``http.disconnect``."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _run_while_connected(request: Request, registry: ModelRegistry, job: partial) -> SegmentOutcome:
    """``registry.run(job)``, abandoned as soon as the client disconnects: a queued job leaves the queue, a
    running one stops before its next network call (``job`` must take a ``cancel`` event), so that its slot
    frees within one tile instead of after the whole inference.

    Raises:
        ProblemError: 499 when the client went away (the reply reaches nobody; it is counted and logged).
    """
    cancel = threading.Event()
    work = asyncio.ensure_future(registry.run(partial(job, cancel=cancel)))
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        cancel.set()
        work.cancel()
        try:
            await work
        except (asyncio.CancelledError, InferenceCancelled):
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this request itself is being cancelled (server shutdown), not just the work
        logger.info("client disconnected before the answer; its inference was stopped")
        raise _gone()
    try:
        return work.result()
    except InferenceCancelled:  # cancelled by the watcher in the same instant as it finished
        raise _gone() from None


def _busy(exc: QueueFullError) -> ProblemError:
    return ProblemError(503, "Service Unavailable", str(exc), headers={"Retry-After": str(RETRY_AFTER_S)})


def _provider(engine: Engine) -> str:
    providers = list(dict.fromkeys(model.provider for model in engine.models))
    return "+".join(providers)


def _ms(value: float) -> float:
    return round(value, 1)


@router.post(
    "/segment",
    response_model=SegmentResponse,
    summary="Segment a brain tumour",
    description="Upload either the four modalities (flair, t1, t1ce, t2) or one 4D image, optionally with a "
    "ground-truth label; get BraTS 2020 labels back, with Dice and HD95 when a label was sent.",
    responses=_RESPONSES,
    openapi_extra={"requestBody": _MULTIPART_BODY, **OPTIONAL_API_KEY},
)
async def segment(
    request: Request,
    query: Annotated[SegmentQuery, Query()],
    settings: SettingsDep,
    registry: RegistryDep,
) -> Response | SegmentResponse:
    started = time.perf_counter()
    name = _resolve_model(query.model, registry)
    request.state.model = name  # a label of the request metrics
    engine = registry.engine(name)
    try:
        registry.check_capacity()  # a busy service refuses before it takes in the body
    except QueueFullError as exc:
        raise _busy(exc) from None
    async with received_upload(
        request,
        tmp_dir=settings.tmp_dir,
        max_bytes=settings.max_upload_bytes,
        timeout_s=settings.request_timeout_s,
        deadline_s=settings.upload_timeout_s,
    ) as upload:
        job = partial(
            segment_upload, upload, engine, tta=query.tta, postprocess=query.postprocess, max_voxels=settings.max_voxels
        )
        try:
            outcome = await _run_while_connected(request, registry, job)
        except QueueFullError as exc:
            raise _busy(exc) from None
        body_bytes = upload.body_bytes
    registry.metrics.inference.labels(name).observe(outcome.engine_s)
    geometry = outcome.geometry
    timings = {key: _ms(value) for key, value in outcome.timings_ms.items()}
    timings["total"] = _ms(1000 * (time.perf_counter() - started))
    summary = SegmentSummary(
        model=name,
        model_sha256=engine.model_sha256,
        provider=_provider(engine),
        shape=geometry.shape,
        spacing_mm=geometry.zooms,
        labels=BRATS_LABELS,
        volumes_ml=outcome.volumes_ml,
        dice=None if outcome.metrics is None else outcome.metrics["dice"],
        hd95_mm=None if outcome.metrics is None else outcome.metrics["hd95_mm"],
        postprocessed=outcome.postprocessed,
        timing_ms=timings,
    )
    logger.info(
        "segmented with %s (tta=%s, postprocessed=%s, format=%s): shape %s, %d bytes in, timings %s",
        name, query.tta, outcome.postprocessed, query.format, "x".join(map(str, geometry.shape)), body_bytes, timings,
    )
    if query.format == "nifti":
        return Response(
            content=outcome.mask,
            media_type="application/gzip",
            headers={
                "Content-Disposition": 'attachment; filename="mask.nii.gz"',
                "X-Segment-Summary": json.dumps(summary.model_dump(mode="json"), separators=(",", ":")),
            },
        )
    return SegmentResponse(**summary.model_dump(), mask=base64.b64encode(outcome.mask).decode("ascii"))
