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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.core.geometry import Geometry
from service.core.nifti_write import mask_to_bytes
from service.core.scan import Scan, load_scan
from service.core.scoring import region_metrics, volumes_ml
from service.inference.engine import Engine

__all__ = ["SegmentOutcome", "segment_files", "segment_scan"]


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
        mask: The mask as ``.nii.gz`` bytes when encoding was asked for, else ``None``.
    """

    labels: np.ndarray = field(repr=False)
    geometry: Geometry
    volumes_ml: dict[str, float]
    metrics: dict[str, dict[str, float | None]] | None
    timings_ms: dict[str, float]
    postprocessed: bool = False
    mask: bytes | None = field(default=None, repr=False)


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
