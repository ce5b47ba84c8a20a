"""One way from a scan to its segmentation and summary, for the service, ``training evaluate`` and benchmarks.

:func:`segment_files` reads the parts (:func:`service.core.scan.load_scan`), and :func:`segment_scan`
segments the scan with an :class:`~service.inference.engine.Engine`, scores it against its ground truth if
it has one, measures the tumour volumes and, when asked, encodes the mask as ``.nii.gz``. Blocking and
CPU-heavy: the service runs it in its inference queue. Nothing here knows about HTTP: input problems are
:class:`~service.core.scan.ScanError`, a cancelled job is
:class:`~service.inference.engine.InferenceCancelled`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from service.core.dicom_scan import load_dicom_scan
from service.core.dicom_series import read_instances
from service.core.dicom_seg import segmentation, segmentation_bytes
from service.core.geometry import Geometry, grid_mismatch
from service.core.nifti import NiftiError, load_label
from service.core.nifti_write import mask_to_bytes
from service.core.scan import LABEL_PART, Scan, ScanError, load_scan
from service.core.series_rules import SeriesRules
from service.core.scoring import region_metrics, volumes_ml
from service.inference.engine import Engine

__all__ = ["SegmentOutcome", "segment_dicom", "segment_files", "segment_scan"]

MaskFormat = Literal["nifti", "dicom-seg"]


@dataclass(frozen=True)
class SegmentOutcome:
    """A segmented scan and its summary.

    Attributes:
        labels: ``(X, Y, Z)`` uint8 BraTS labels {0, 1, 2, 4} on the scan's grid.
        geometry: The scan's voxel grid.
        volumes_ml: Predicted volume per region (WT, TC, ET) in ml.
        metrics: ``{"dice": {...}, "hd95_mm": {...}}`` per region against the scan's ground truth, or
            ``None`` without one (:func:`service.core.scoring.region_metrics`).
        timings_ms: ``decode`` (reading the parts; 0 for a scan already in memory), ``preprocess``,
            ``inference`` and ``postprocess`` (labels, postprocessing rules, scoring, volumes and encoding).
        postprocessed: Whether the model card's postprocessing rules were applied.
        mask: The mask as ``.nii.gz`` bytes (or a DICOM Segmentation, for DICOM input) when encoding was asked
            for, else ``None``.
        series: DICOM input only: modality -> the description of the series used.
    """

    labels: np.ndarray = field(repr=False)
    geometry: Geometry
    volumes_ml: dict[str, float]
    metrics: dict[str, dict[str, float | None]] | None
    timings_ms: dict[str, float]
    postprocessed: bool = False
    mask: bytes | None = field(default=None, repr=False)
    series: dict[str, str] | None = None


def segment_scan(
    scan: Scan,
    engine: Engine,
    *,
    tta: bool = False,
    postprocess: bool = True,
    encode: bool = False,
    cancel: threading.Event | None = None,
    decode_ms: float = 0.0,
) -> SegmentOutcome:
    """Segment a loaded scan, score it against its label (if any), measure volumes, encode the mask if asked.

    Args:
        scan: The scan (:func:`service.core.scan.load_scan`).
        engine: The model or ensemble that segments it.
        tta: Average over mirrored inputs too.
        postprocess: Apply the model card's postprocessing rules (``False``: the raw labels).
        encode: Also encode the mask as ``.nii.gz`` bytes on the scan's geometry.
        cancel: When set from another thread, the inference stops before its next network call.
        decode_ms: Time already spent reading the scan, reported as ``timings_ms["decode"]``.

    Raises:
        InferenceCancelled: ``cancel`` was set before the inference ended.
    """
    geometry = scan.geometry
    result = engine.segment(scan.image, tta=tta, cancel=cancel, postprocess=postprocess, spacing=geometry.zooms)
    segmented = time.perf_counter()
    metrics = None if scan.label is None else region_metrics(result.labels, scan.label, geometry.zooms)
    volumes = volumes_ml(result.labels, geometry.zooms)
    mask = mask_to_bytes(result.labels, geometry) if encode else None
    engine_ms = result.timings_ms
    timings = {
        "decode": decode_ms,
        "preprocess": engine_ms.get("preprocess", 0.0),
        "inference": engine_ms.get("inference", 0.0),
        "postprocess": engine_ms.get("postprocess", 0.0) + 1000 * (time.perf_counter() - segmented),
    }
    return SegmentOutcome(
        labels=result.labels,
        geometry=geometry,
        volumes_ml=volumes,
        metrics=metrics,
        timings_ms=timings,
        postprocessed=result.postprocessed,
        mask=mask,
    )


def segment_files(
    files: Mapping[str, str | Path],
    engine: Engine,
    *,
    tta: bool = False,
    postprocess: bool = True,
    encode: bool = True,
    max_voxels: int | None = None,
    cancel: threading.Event | None = None,
) -> SegmentOutcome:
    """Read a scan's parts (the four modalities or ``image``, and optionally ``label``), then
    :func:`segment_scan` it; the mask is encoded unless ``encode`` is false.

    Raises:
        ScanError: a part cannot be used (see :func:`service.core.scan.load_scan`).
        InferenceCancelled: ``cancel`` was set before the inference ended.
    """
    start = time.perf_counter()
    scan = load_scan(files, max_voxels=max_voxels)
    decode_ms = 1000 * (time.perf_counter() - start)
    return segment_scan(
        scan, engine, tta=tta, postprocess=postprocess, encode=encode, cancel=cancel, decode_ms=decode_ms
    )


def _dicom_label(path: Path, max_voxels: int | None):
    """A ground truth for DICOM input: a NIfTI label on the reference series' grid."""
    try:
        return load_label(path, max_voxels=max_voxels)
    except NiftiError as err:
        raise ScanError(LABEL_PART, err.reason, too_large="more than the limit" in err.reason) from None


def segment_dicom(
    source: list[Path] | list[Dataset],
    engine: Engine,
    rules: SeriesRules,
    *,
    label: Path | None = None,
    tta: bool = False,
    postprocess: bool = True,
    encode: MaskFormat | None = "nifti",
    model: str = "",
    software_version: str = "",
    max_voxels: int | None = None,
    max_instances: int = 5000,
    max_bytes: int = 4 << 30,
    cancel: threading.Event | None = None,
) -> SegmentOutcome:
    """Segment a DICOM study: pick and read its four series (:func:`service.core.dicom_scan.load_dicom_scan`),
    segment, and give the labels, volumes and mask on the grid of its T1ce series; with ``label`` (a NIfTI
    ground truth on that grid), the scores too. ``source``: the uploaded files (DICOM files or zips, read within
    ``max_instances`` and ``max_bytes``) or datasets already read (e.g. fetched from a PACS).

    Args:
        encode: ``nifti`` (the mask as ``.nii.gz`` on the reference grid), ``dicom-seg`` (a DICOM Segmentation
            referencing the T1ce series; ``model`` and ``software_version`` identify the algorithm), or ``None``.

    Raises:
        DicomInputError: the study cannot be read or does not give the four modalities.
        ScanError: the label cannot be read or does not lie on the reference grid.
        InferenceCancelled: ``cancel`` was set before the inference ended.
    """
    start = time.perf_counter()
    truth = None if label is None else _dicom_label(label, max_voxels)
    datasets = [d for d in source if isinstance(d, Dataset)]
    if len(datasets) != len(source):
        datasets = read_instances(source, max_instances=max_instances, max_bytes=max_bytes)
    study = load_dicom_scan(datasets, rules, max_voxels=max_voxels)
    scan = study.scan
    if truth is not None:
        mismatch = grid_mismatch(truth[1], study.reference_geometry)
        if mismatch is not None:
            raise ScanError(LABEL_PART, f"{mismatch}, compared with the t1ce series; the label must lie on its grid",
                            mismatched=True)
        scan = replace(scan, label=study.to_scan(truth[0]))
    decode_ms = 1000 * (time.perf_counter() - start)
    outcome = segment_scan(scan, engine, tta=tta, postprocess=postprocess, cancel=cancel, decode_ms=decode_ms)
    encoding = time.perf_counter()
    labels = study.to_reference(outcome.labels)
    mask = None
    if encode == "nifti":
        mask = mask_to_bytes(labels, study.reference_geometry)
    elif encode == "dicom-seg":
        seg = segmentation(labels, study.reference_instances, model=model, model_sha256=engine.model_sha256,
                           software_version=software_version)
        mask = segmentation_bytes(seg)
    timings = dict(outcome.timings_ms)
    timings["postprocess"] += 1000 * (time.perf_counter() - encoding)
    return replace(outcome, labels=labels, geometry=study.reference_geometry, mask=mask, timings_ms=timings,
                   series=study.used())
