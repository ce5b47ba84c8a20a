"""The mask as a DICOM Segmentation (highdicom) that references the series it was drawn on.

Segments 1 necrosis / non-enhancing tumour (BraTS label 1), 2 edema (label 2) and 3 enhancing tumour (label 4),
with SNOMED CT coded concepts, the brain as anatomic region, and the algorithm identified by the model's name
and the first 12 hex digits of its sha256. highdicom copies from the source series what filing the object with
its study needs (the patient and study modules, the frame of reference) and nothing else.
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = ["SEGMENTS", "segmentation", "segmentation_bytes"]

_CATEGORY = Code("49755003", "SCT", "Morphologically Altered Structure")
_BRAIN = Code("12738006", "SCT", "Brain")
SEGMENTS: tuple[tuple[int, str, Code, tuple[int, int, int]], ...] = (
    (1, "Necrosis and non-enhancing tumour", Code("6574001", "SCT", "Necrosis"), (255, 0, 0)),
    (2, "Edema", Code("79654002", "SCT", "Edema"), (0, 200, 0)),
    (4, "Enhancing tumour", Code("108369006", "SCT", "Neoplasm"), (255, 220, 0)),
)
"""BraTS label, segment label, coded type and display colour of each segment, in segment-number order."""

SERIES_NUMBER = 9900
SERIES_DESCRIPTION = "Brain tumour segmentation"


def _frame_order(instance: Dataset) -> np.ndarray:
    """The order that sorts an enhanced object's frames along the slice normal (as the volume was built)."""
    shared = instance.SharedFunctionalGroupsSequence[0]
    orientations = []
    positions = []
    for group in instance.PerFrameFunctionalGroupsSequence:
        plane = group.get("PlaneOrientationSequence") or shared.PlaneOrientationSequence
        orientations.append(np.asarray(plane[0].ImageOrientationPatient, float))
        positions.append(np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float))
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    return np.argsort([p @ normal for p in positions], kind="stable")


def segmentation(mask: np.ndarray, reference: list[Dataset], *, model: str, model_sha256: str,
                 software_version: str) -> hd.seg.Segmentation:
    """A Segmentation of ``mask`` ``(columns, rows, slices)``, BraTS labels on the grid of ``reference``.

    Args:
        mask: uint8 labels {0, 1, 2, 4} on the reference series' grid, slices in the order of ``reference``.
        reference: The reference series' single-frame instances in slice order, or its one enhanced object.
        model: The model's name (``ensemble`` included), recorded as the algorithm's name.
        model_sha256: The model's sha256 (or several joined by ``+``), recorded as the algorithm's version.
        software_version: This software's version.
    """
    frames = np.transpose(np.asarray(mask), (2, 1, 0))  # (slices, rows, columns)
    numbers = np.zeros(frames.shape, dtype=np.uint8)
    for number, (label, *_rest) in enumerate(SEGMENTS, start=1):
        numbers[frames == label] = number
    if len(reference) == 1 and "PerFrameFunctionalGroupsSequence" in reference[0]:
        order = _frame_order(reference[0])
        unsorted = np.empty_like(numbers)
        unsorted[order] = numbers  # frame f of the source is slice position order.index(f)
        numbers = unsorted
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model, family=codes.cid7162.ArtificialIntelligence, version=model_sha256[:64])
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=_CATEGORY,
            segmented_property_type=code,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[_BRAIN],
            display_color=hd.color.CIELabColor.from_rgb(*colour),
        )
        for number, (_, name, code, colour) in enumerate(SEGMENTS, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=reference,
        pixel_array=numbers,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="brats-seg",
        manufacturer_model_name=model,
        software_versions=software_version,
        device_serial_number=model_sha256[:12],
        series_description=SERIES_DESCRIPTION,
        omit_empty_frames=bool(numbers.any()),
    )


def segmentation_bytes(seg: Dataset) -> bytes:
    """The Segmentation as a DICOM file (Part 10, with its file meta)."""
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
