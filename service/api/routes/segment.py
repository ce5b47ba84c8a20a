"""``POST /segment``: NIfTI parts in, BraTS labels out (SPEC section 2).

The route only translates HTTP: it resolves the model in the catalogue, receives the upload
(:mod:`service.api.uploads`), hands the pipeline (:func:`service.inference.pipeline.segment_files`: read,
segment, score, encode) to the inference queue as one job, so that the whole CPU-heavy part counts toward
the concurrency limit and never runs on the event loop, and turns the outcome into JSON or a ``.nii.gz``
reply; a part that cannot be used becomes a 400 or 413 problem.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from service.api.deps import CatalogueDep, QueueDep, SettingsDep
from service.api.errors import OPTIONAL_API_KEY, ProblemError, problem_responses
from service.api.schemas import (
    BRATS_LABELS,
    PacsQuery,
    PacsSegmentResponse,
    SegmentQuery,
    SegmentResponse,
    SegmentSummary,
    StoredSeg,
)
from service.settings import Settings
from service.api.upload_parts import DICOM_PART, EXPECTED_PARTS
from service.api.uploads import CLIENT_CLOSED_REQUEST, Upload, received_upload
from service.catalogue import ModelCatalogue
from service.core.labels import MODALITIES
from service.core.dicom_series import DicomInputError
from service.core.scan import IMAGE_PART, LABEL_PART, ScanError
from service.inference.engine import Engine, InferenceCancelled
from service.dicomweb import Pacs, PacsError
from service.inference.pacs_study import segment_pacs_study
from service.inference.pipeline import SegmentOutcome, segment_dicom, segment_files
from service.inference.queue import InferenceQueue, QueueFullError

__all__ = ["router"]

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
                    DICOM_PART: {"type": "string", "format": "binary", "description": "a DICOM file or a zip of "
                                 "DICOM files of the study's MR series; repeat the part for more"},
                },
                "additionalProperties": False,
                "oneOf": [
                    {"required": list(MODALITIES), "not": {"required": [IMAGE_PART]}},
                    {"required": [IMAGE_PART], "not": {"anyOf": [{"required": [m]} for m in MODALITIES]}},
                    {"required": [DICOM_PART], "not": {"required": [IMAGE_PART]}},
                ],
            }
        }
    },
}

_RESPONSES: dict[int | str, dict] = {
    200: {
        "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}},
                    "application/dicom": {"schema": {"type": "string", "format": "binary"}}},
        "description": "JSON summary with the mask in base64 (format=json), the mask as .nii.gz (format=nifti) or "
        "a DICOM Segmentation (format=dicom-seg), with the summary in the header X-Segment-Summary.",
        "headers": {
            "X-Segment-Summary": {
                "description": "format=nifti or dicom-seg: the JSON summary without `mask`, compact.",
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
            422: "Invalid query parameters (unknown model, format, ...), or DICOM series that do not give the four "
            "modalities (the detail names the series found).",
            503: "Not ready, or the inference queue is full (see Retry-After).",
        },
        headers={503: {"Retry-After": "Seconds to wait before sending the request again."}},
    ),
}


def _problem(err: ScanError) -> ProblemError:
    """The problem reply for a part that cannot be used: it names the part, never a path."""
    if err.too_large:
        return ProblemError(
            413,
            "Volume Too Large",
            f"part {err.part}: {err.reason}; ask the operator to raise BRATS_MAX_VOXELS if the volume is genuine",
        )
    return ProblemError(400, "Mismatched volumes" if err.mismatched else "Invalid NIfTI volume", str(err))


# ------------------------------------------------------------------------------------------ the route


def _resolve_model(requested: str | None, catalogue: ModelCatalogue) -> str:
    """The model to use; the service serves the models it loaded even when another one failed to load."""
    if not catalogue.models:
        raise ProblemError(503, "Not ready", f"the service is not ready: {catalogue.reason}",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
    valid = catalogue.choices
    if requested is None and catalogue.default is None:
        raise ProblemError(
            503, "Not ready",
            f"no default model is available ({catalogue.reason}); name one of {', '.join(valid)} in the query "
            "parameter 'model'",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    name = catalogue.default if requested is None else requested
    if name not in valid:
        raise ProblemError(
            422,
            "Unknown model",
            f"query parameter 'model': {name[:60]!r} is not a loaded model; choose one of {', '.join(valid)} "
            f"(or leave it out for the default, {catalogue.default})",
        )
    return name


def _gone() -> ProblemError:
    return ProblemError(CLIENT_CLOSED_REQUEST, "Client Closed Request", "the client disconnected")


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects. Call it only once the body has been read: from then on the
    server's next message for this request can only be ``http.disconnect``."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _run_while_connected(request: Request, queue: InferenceQueue, job: partial, model: str) -> SegmentOutcome:
    """``queue.run(job)``, abandoned as soon as the client disconnects: a queued job leaves the queue, a
    running one stops before its next network call (``job`` must take a ``cancel`` event), so that its slot
    frees within one tile instead of after the whole inference.

    Raises:
        ProblemError: 499 when the client went away (the reply reaches nobody; it is counted and logged).
    """
    cancel = threading.Event()
    work = asyncio.ensure_future(queue.run(partial(job, cancel=cancel), model=model))
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


_DICOM_TITLES = {400: "Invalid DICOM input", 413: "Too Large", 422: "Unusable series"}
_FILES = {"nifti": ("application/gzip", "mask.nii.gz"), "dicom-seg": ("application/dicom", "seg.dcm")}


def _job(upload: Upload, engine: Engine, name: str, query: SegmentQuery, settings: Settings, app) -> partial:
    """The pipeline call for this upload: NIfTI parts, or a DICOM study (the only input a SEG can refer to)."""
    common = {"tta": query.tta, "postprocess": query.postprocess, "max_voxels": settings.max_voxels}
    if upload.dicom:
        return partial(
            segment_dicom, list(upload.dicom), engine, app.state.series_rules, label=upload.label,
            encode="dicom-seg" if query.format == "dicom-seg" else "nifti", model=name,
            software_version=app.version, max_instances=settings.max_dicom_instances,
            max_bytes=settings.max_dicom_bytes, **common,
        )
    if query.format == "dicom-seg":
        raise ProblemError(400, "Invalid upload", "format=dicom-seg needs DICOM input (dicom parts): a DICOM "
                           "Segmentation must reference the images it segments; use format=nifti for NIfTI input")
    return partial(segment_files, upload.files, engine, **common)


def _summary(outcome: SegmentOutcome, name: str, engine: Engine, started: float) -> SegmentSummary:
    timings = {key: _ms(value) for key, value in outcome.timings_ms.items()}
    timings["total"] = _ms(1000 * (time.perf_counter() - started))
    return SegmentSummary(
        model=name,
        model_sha256=engine.model_sha256,
        provider=_provider(engine),
        shape=outcome.geometry.shape,
        spacing_mm=outcome.geometry.zooms,
        labels=BRATS_LABELS,
        volumes_ml=outcome.volumes_ml,
        dice=None if outcome.metrics is None else outcome.metrics["dice"],
        hd95_mm=None if outcome.metrics is None else outcome.metrics["hd95_mm"],
        postprocessed=outcome.postprocessed,
        timing_ms=timings,
        series=outcome.series,
    )


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
    catalogue: CatalogueDep,
    queue: QueueDep,
) -> Response | SegmentResponse:
    started = time.perf_counter()
    name = _resolve_model(query.model, catalogue)
    request.state.model = name  # a label of the request metrics
    engine = catalogue.engine(name)
    try:
        queue.check_capacity()  # a busy service refuses before it takes in the body
    except QueueFullError as exc:
        raise _busy(exc) from None
    async with received_upload(
        request,
        tmp_dir=settings.tmp_dir,
        max_bytes=settings.max_upload_bytes,
        idle_timeout_s=settings.idle_timeout_s,
        deadline_s=settings.upload_timeout_s,
        max_dicom_parts=settings.max_dicom_instances,
    ) as upload:
        job = _job(upload, engine, name, query, settings, request.app)
        try:
            outcome = await _run_while_connected(request, queue, job, name)
        except QueueFullError as exc:
            raise _busy(exc) from None
        except ScanError as exc:
            raise _problem(exc) from None
        except DicomInputError as exc:
            raise ProblemError(exc.status, _DICOM_TITLES[exc.status], exc.reason) from None
        body_bytes = upload.body_bytes
    summary = _summary(outcome, name, engine, started)
    geometry, timings = outcome.geometry, summary.model_dump()["timing_ms"]
    logger.info(
        "segmented with %s (tta=%s, postprocessed=%s, format=%s): shape %s, %d bytes in, timings %s",
        name, query.tta, outcome.postprocessed, query.format, "x".join(map(str, geometry.shape)), body_bytes, timings,
    )
    body = summary.model_dump(mode="json")
    if body["series"] is None:  # NIfTI input: the summary as it has always been
        del body["series"]
    if query.format in _FILES:
        media_type, filename = _FILES[query.format]
        return Response(
            content=outcome.mask,
            media_type=media_type,
            headers={
                "Content-Disposition": f'attachment; filename="{filename}"',
                "X-Segment-Summary": json.dumps(body, separators=(",", ":")),
            },
        )
    return JSONResponse({**body, "mask": base64.b64encode(outcome.mask).decode("ascii")})


_PACS_TITLES = {404: "Not Found", 502: "Bad Gateway"}
_UID = r"^[0-9]+(\.[0-9]+)*$"


@router.post(
    "/dicomweb/studies/{study_uid}/segment",
    response_model=PacsSegmentResponse,
    summary="Segment a study on the PACS and store the result there",
    description="Finds the study's series on the PACS configured by BRATS_DICOMWEB_URL (QIDO-RS), fetches the four "
    "it selects (WADO-RS), segments them, and stores a DICOM Segmentation in the study (STOW-RS).",
    responses=problem_responses({
        400: "A selected series cannot be read as a volume (uneven spacing, tilt, undecodable pixels, ...).",
        401: "Missing or wrong API key (when keys are configured).",
        404: "The PACS does not know the study.",
        413: "A selected series is over the voxel limit.",
        422: "Invalid query parameters, or series that do not give the four modalities (the detail names them).",
        502: "The PACS is unreachable or failed (its status in the detail).",
        503: "DICOMweb is not configured (BRATS_DICOMWEB_URL), not ready, or the inference queue is full.",
    }),
    openapi_extra=OPTIONAL_API_KEY,
)
async def segment_pacs(
    request: Request,
    study_uid: Annotated[str, PathParam(pattern=_UID, max_length=64, description="StudyInstanceUID")],
    query: Annotated[PacsQuery, Query()],
    settings: SettingsDep,
    catalogue: CatalogueDep,
    queue: QueueDep,
) -> PacsSegmentResponse:
    if settings.dicomweb_url is None:
        raise ProblemError(503, "Service Unavailable", "no PACS is configured: set BRATS_DICOMWEB_URL to its DICOMweb "
                           "root (e.g. http://orthanc:8042/dicom-web) and restart the service")
    started = time.perf_counter()
    name = _resolve_model(query.model, catalogue)
    request.state.model = name
    engine = catalogue.engine(name)
    try:
        queue.check_capacity()
    except QueueFullError as exc:
        raise _busy(exc) from None
    password = settings.dicomweb_password.get_secret_value() if settings.dicomweb_password else None
    with Pacs(settings.dicomweb_url, username=settings.dicomweb_username, password=password,
              timeout_s=settings.dicomweb_timeout_s) as pacs:
        job = partial(segment_pacs_study, pacs, study_uid, engine, request.app.state.series_rules, model=name,
                      software_version=request.app.version, tta=query.tta, postprocess=query.postprocess,
                      max_voxels=settings.max_voxels)
        try:
            outcome, stored = await _run_while_connected(request, queue, job, name)
        except QueueFullError as exc:
            raise _busy(exc) from None
        except PacsError as exc:
            raise ProblemError(exc.status, _PACS_TITLES.get(exc.status, "Bad Gateway"), exc.detail) from None
        except DicomInputError as exc:
            raise ProblemError(exc.status, _DICOM_TITLES[exc.status], exc.reason) from None
    summary = _summary(outcome, name, engine, started)
    logger.info("segmented a PACS study with %s: shape %s, SEG stored", name, "x".join(map(str, summary.shape)))
    return PacsSegmentResponse(**summary.model_dump(), stored=StoredSeg(
        series_instance_uid=stored.series_instance_uid, sop_instance_uid=stored.sop_instance_uid))
