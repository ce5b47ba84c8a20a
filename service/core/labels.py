"""BraTS 2020 labels, evaluation regions and modality order: the one source of truth.

Labels: ``0`` background, ``1`` NCR/NET, ``2`` ED, ``4`` ET (label ``3`` does not exist in BraTS 2020).
Regions: whole tumour ``WT = {1, 2, 4}``, tumour core ``TC = {1, 4}``, enhancing tumour ``ET = {4}``.
Networks predict one sigmoid channel per region, in the order of :data:`REGIONS`.
Datasets in other conventions (MSD Task01, BraTS 2023) are mapped to these values on load, and masks can be
written back in the BraTS 2023 values (:func:`to_label_convention`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
"""Channel order everywhere: training tensors, ONNX inputs, 4D uploads."""

LABELS: dict[int, str] = {0: "background", 1: "NCR/NET", 2: "ED", 4: "ET"}
VALID_LABELS: tuple[int, ...] = tuple(LABELS)
TUMOUR_LABELS: tuple[int, ...] = (1, 2, 4)
"""The labels other than background: NCR/NET, ED, ET."""

REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
"""Evaluation regions as label tuples, in network output channel order."""

REGION_NAMES: tuple[str, ...] = tuple(REGIONS)

# Medical Segmentation Decathlon Task01_BrainTumour: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour.
MSD_TO_BRATS: dict[int, int] = {0: 0, 1: 2, 2: 1, 3: 4}
BRATS_TO_MSD: dict[int, int] = {v: k for k, v in MSD_TO_BRATS.items()}

# BraTS 2023 adult glioma (BraTS-GLI): 1 NCR, 2 edema, 3 enhancing tumour (the BraTS 2020 value 4 moved to 3).
BRATS2023_TO_BRATS: dict[int, int] = {0: 0, 1: 1, 2: 2, 3: 4}
BRATS_TO_BRATS2023: dict[int, int] = {v: k for k, v in BRATS2023_TO_BRATS.items()}
BRATS2023_LABEL_VALUES: tuple[int, ...] = tuple(BRATS2023_TO_BRATS)

RESECTION_CAVITY_LABEL = 4
"""Label 4 of the BraTS 2024 post-treatment glioma data (2023 naming): the resection cavity."""
POST_TREATMENT_REASON = (
    f"holds label {RESECTION_CAVITY_LABEL} (resection cavity in BraTS 2024 post-treatment data); this project "
    "segments pre-operative gliomas (labels NCR, edema, enhancing tumour); use a pre-operative dataset"
)
"""Why a BraTS 2023-style label volume holding label 4 is refused (prefixed by what holds it)."""

LabelConvention = Literal["brats2020", "brats2023"]
LABEL_CONVENTIONS: tuple[str, ...] = ("brats2020", "brats2023")
"""The label values a written mask can use: BraTS 2020 (ET = 4, the project's own) or BraTS 2023 (ET = 3)."""


class LabelError(ValueError):
    """A label volume holds values outside the expected set.

    Attributes:
        values: The unexpected values found (at most the first ten shown in the message).
    """

    def __init__(self, message: str, values: tuple[float, ...] = ()) -> None:
        super().__init__(message)
        self.values = values


def check_labels(seg: np.ndarray, valid: tuple[int, ...] = VALID_LABELS) -> None:
    """Raise :class:`LabelError` naming the unexpected values if ``seg`` holds any outside ``valid``."""
    values = np.unique(seg)
    bad = [v for v in values.tolist() if v not in valid]
    if bad:
        shown = ", ".join(str(int(v)) if float(v).is_integer() else str(v) for v in bad[:10])
        raise LabelError(
            f"label values {{{shown}}} are not allowed; expected only {{{', '.join(map(str, valid))}}}"
            + (" (BraTS 2020 has no label 3)" if 3 in bad and 3 not in valid else ""),
            values=tuple(bad),
        )


def _remap(seg: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    check_labels(seg, tuple(sorted(mapping)))
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[np.asarray(seg).astype(np.intp)]


def msd_to_brats(seg: np.ndarray) -> np.ndarray:
    """Map MSD Task01 labels (1 ED, 2 NET, 3 ET) to BraTS 2020 labels (2, 1, 4); returns a new uint8 array."""
    return _remap(seg, MSD_TO_BRATS)


def brats_to_msd(seg: np.ndarray) -> np.ndarray:
    """Inverse of :func:`msd_to_brats`; returns a new uint8 array."""
    return _remap(seg, BRATS_TO_MSD)


def brats2023_to_brats(seg: np.ndarray) -> np.ndarray:
    """Map BraTS 2023 glioma labels (1 NCR, 2 ED, 3 ET) to BraTS 2020 labels (1, 2, 4); returns a new uint8 array.

    Raises:
        LabelError: a value outside {0, 1, 2, 3} (label 4, the resection cavity of post-treatment data, too).
    """
    return _remap(seg, BRATS2023_TO_BRATS)


def brats_to_brats2023(seg: np.ndarray) -> np.ndarray:
    """Inverse of :func:`brats2023_to_brats` (4 -> 3); returns a new uint8 array."""
    return _remap(seg, BRATS_TO_BRATS2023)


def to_label_convention(labels_brats2020: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """The project's labels (BraTS 2020 values {0, 1, 2, 4}) in the values of ``convention``, for writing masks.

    Args:
        labels_brats2020: A label volume with values in {0, 1, 2, 4}.
        convention: ``"brats2020"`` (values kept) or ``"brats2023"`` (ET 4 -> 3, as BraTS 2021+ tools expect).

    Returns:
        A new ``uint8`` array; the input is not modified.

    Raises:
        ValueError: an unknown convention.
        LabelError: the input holds values outside {0, 1, 2, 4}.
    """
    if convention == "brats2020":
        return _remap(labels_brats2020, {v: v for v in VALID_LABELS})
    if convention == "brats2023":
        return brats_to_brats2023(labels_brats2020)
    raise ValueError(f"unknown label convention {convention!r}; expected one of {', '.join(LABEL_CONVENTIONS)}")


def labels_to_regions(seg: np.ndarray) -> np.ndarray:
    """Turn a label volume ``(*spatial)`` into boolean region masks ``(3, *spatial)`` in WT, TC, ET order."""
    seg = np.asarray(seg)
    return np.stack([np.isin(seg, labels) for labels in REGIONS.values()])


def regions_to_labels(regions: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Turn region channels ``(3, *spatial)`` (probabilities or masks, WT, TC, ET) into BraTS labels.

    A voxel is tumour where WT exceeds ``threshold``; inside the tumour it is core (label 1) where TC also
    does, and enhancing (label 4) where ET does too; the rest of the tumour is edema (label 2). The nesting
    ET within TC within WT is therefore enforced.

    Returns:
        A new ``uint8`` array ``(*spatial)`` with values in {0, 1, 2, 4}.
    """
    regions = np.asarray(regions)
    if regions.ndim < 2 or regions.shape[0] != len(REGIONS):
        raise ValueError(f"expected region channels of shape (3, *spatial), got {regions.shape}")
    wt = regions[0] > threshold
    tc = wt & (regions[1] > threshold)
    et = tc & (regions[2] > threshold)
    out = np.zeros(regions.shape[1:], dtype=np.uint8)
    out[wt] = 2
    out[tc] = 1
    out[et] = 4
    return out
