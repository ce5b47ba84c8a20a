"""A study on a PACS segmented in place: find its series (QIDO-RS), fetch the four it needs (WADO-RS), segment,
and store the DICOM Segmentation back with the study (STOW-RS).

The series are chosen from the PACS's listing with the same rules as uploads
(:mod:`service.core.series_rules`), so only those four are fetched; the rest is the pipeline of DICOM uploads
(:func:`service.inference.pipeline.segment_dicom`). PACS problems are :class:`service.dicomweb.PacsError`.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

import pydicom

from service.core.dicom_series import Series
from service.core.labels import MODALITIES
from service.core.series_rules import SeriesRules, select_series
from service.dicomweb import Pacs
from service.inference.engine import Engine
from service.inference.pipeline import SegmentOutcome, segment_dicom

__all__ = ["StoredSegmentation", "segment_pacs_study"]


@dataclass(frozen=True)
class StoredSegmentation:
    """What was stored on the PACS: the new SEG series and instance, in the segmented study."""

    series_instance_uid: str
    sop_instance_uid: str


def _listed(item: dict, study_uid: str) -> Series:
    number = item.get("SeriesNumber")
    return Series(uid=str(item.get("SeriesInstanceUID", "")), description=str(item.get("SeriesDescription", "")),
                  protocol="", modality=str(item.get("Modality", "")), study_uid=study_uid,
                  frame_of_reference_uid="", number=None if number is None else int(number))


def segment_pacs_study(
    pacs: Pacs,
    study_uid: str,
    engine: Engine,
    rules: SeriesRules,
    *,
    model: str,
    software_version: str,
    tta: bool = False,
    postprocess: bool = True,
    max_voxels: int | None = None,
    cancel: threading.Event | None = None,
) -> tuple[SegmentOutcome, StoredSegmentation]:
    """Segment the study ``study_uid`` of ``pacs`` and store its DICOM Segmentation there.

    Raises:
        PacsError: the PACS is unreachable or fails (502), or does not know the study (404).
        DicomInputError: the study's series do not give the four modalities (422) or cannot be read (400).
        InferenceCancelled: ``cancel`` was set before the inference ended.
    """
    listed = [_listed(item, study_uid) for item in pacs.series_of_study(study_uid)]
    chosen = select_series(listed, rules)
    datasets = [ds for modality in MODALITIES for ds in pacs.fetch_series(study_uid, chosen[modality].uid)]
    outcome = segment_dicom(datasets, engine, rules, tta=tta, postprocess=postprocess, encode="dicom-seg",
                            model=model, software_version=software_version, max_voxels=max_voxels, cancel=cancel)
    seg = pydicom.dcmread(io.BytesIO(outcome.mask))
    pacs.store([seg])
    return outcome, StoredSegmentation(str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID))
