"""BraTS 2020 labels, evaluation regions and modality order: the one source of truth.

Labels: ``0`` background, ``1`` NCR/NET, ``2`` ED, ``4`` ET (label ``3`` does not exist in BraTS 2020).
Regions: whole tumour ``WT = {1, 2, 4}``, tumour core ``TC = {1, 4}``, enhancing tumour ``ET = {4}``.
Networks predict one sigmoid channel per region, in the order of :data:`REGIONS`.
"""

from __future__ import annotations

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


class LabelError(ValueError):
    """A label volume holds values outside the expected set."""


def check_labels(seg: np.ndarray, valid: tuple[int, ...] = VALID_LABELS) -> None:
    """Raise :class:`LabelError` naming the unexpected values if ``seg`` holds any outside ``valid``."""
    values = np.unique(seg)
    bad = [v for v in values.tolist() if v not in valid]
    if bad:
        shown = ", ".join(str(int(v)) if float(v).is_integer() else str(v) for v in bad[:10])
        raise LabelError(
            f"label values {{{shown}}} are not allowed; expected only {{{', '.join(map(str, valid))}}}"
            + (" (BraTS 2020 has no label 3)" if 3 in bad and 3 not in valid else "")
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
