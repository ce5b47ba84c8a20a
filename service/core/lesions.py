"""Lesion-wise Dice and HD95 as the BraTS 2023 challenge defines them.

The definition follows the challenge's metrics script (``get_LesionWiseScores`` and
``get_LesionWiseResults`` in github.com/rachitsaluja/BraTS-2023-Metrics, ``metrics.py``), per region mask:

1. Lesions are connected components, 26-connected in 3D (8-connected in 2D). Predicted components are
   taken as they are.
2. The ground truth is dilated :data:`DILATION_VOXELS` times with the 18-connected structuring element
   (``generate_binary_structure(3, 2)``; 8-connected in 2D). Ground-truth voxels that fall in one
   connected component of that dilation form one lesion, so lesions whose dilations touch are merged.
3. A ground-truth lesion matches every predicted component that intersects its dilation. Its Dice and
   HD95 are those between the lesion and the union of the matched components (whole components, also
   where they reach beyond the dilation). A lesion with no match scores Dice 0 and
   :data:`LESION_HD95_PENALTY_MM`.
4. Ground-truth lesions under :data:`MIN_GT_LESION_VOXELS` voxels (counted after merging) are left out of
   the score, but only after matching: a predicted component that touches one is not a false positive.
5. Every predicted component that matches no ground-truth lesion is a false positive: Dice 0 and
   :data:`LESION_HD95_PENALTY_MM`.
6. The score is the sum over the counted lesions and the false positives divided by their number; with
   nothing to count (both masks empty, or only small ground-truth lesions and no false positive) it is
   Dice 1 and HD95 0.

Where this differs from the script: HD95 is the project's one HD95 (:func:`service.core.scoring.hd95`,
MONAI's definition) rather than DeepMind's ``surface_distance``; the size threshold is in voxels and keeps a
lesion of exactly 50 voxels (the specification's "under 50 voxels"), where the script drops lesions of at
most 50 mm³ (the same count of voxels on BraTS's 1 mm grid). The dilation and the threshold are in voxels;
the voxel spacing enters only HD95.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from service.core.labels import REGIONS
from service.core.scoring import _pair, _spacing, dice, hd95
from service.core.preprocess import mask_bbox

__all__ = [
    "DILATION_VOXELS",
    "LESION_HD95_PENALTY_MM",
    "MIN_GT_LESION_VOXELS",
    "LesionScores",
    "lesion_scores",
    "lesionwise_metrics",
]

LESION_HD95_PENALTY_MM = 374.0
"""HD95 of a missed ground-truth lesion or of a false-positive component."""

MIN_GT_LESION_VOXELS = 50
"""Ground-truth lesions with fewer voxels than this (after merging) are left out of the score."""

DILATION_VOXELS = 3
"""Iterations of the ground-truth dilation used to merge and match lesions."""


@dataclass(frozen=True)
class LesionScores:
    """Lesion-wise scores of one region mask pair.

    Attributes:
        dice: Lesion-wise Dice in [0, 1].
        hd95_mm: Lesion-wise HD95 in mm, at most :data:`LESION_HD95_PENALTY_MM`.
        n_gt_lesions: Ground-truth lesions counted (after merging, at least the minimum size).
        n_true_positive: Counted ground-truth lesions matched by at least one predicted component.
        n_false_negative: Counted ground-truth lesions with no match.
        n_false_positive: Predicted components that match no ground-truth lesion (of any size).
    """

    dice: float
    hd95_mm: float
    n_gt_lesions: int
    n_true_positive: int
    n_false_negative: int
    n_false_positive: int


def _structures(ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """The connectivity of components (full) and the dilation's structuring element (rank 2)."""
    if ndim not in (2, 3):
        raise ValueError(f"expected 2D or 3D masks, got {ndim} dimensions")
    return ndimage.generate_binary_structure(ndim, ndim), ndimage.generate_binary_structure(ndim, 2)


def _union_box(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(len(boxes[0])))


def lesion_scores(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float]) -> LesionScores:
    """Lesion-wise Dice and HD95 of one region (see the module docstring for the definition).

    Args:
        pred_mask: Predicted region mask ``(X, Y, Z)`` or ``(X, Y)``, nonzero = inside.
        gt_mask: Ground-truth region mask of the same shape.
        spacing: Voxel size in mm per axis (used only for HD95).

    Returns:
        The scores and the lesion counts.

    Raises:
        ValueError: If the shapes differ, the masks are not 2D or 3D, or ``spacing`` does not hold one
            finite positive size per axis.
    """
    pred, gt = _pair(pred_mask, gt_mask)
    connectivity, grow = _structures(pred.ndim)
    spacing = _spacing(spacing, pred.ndim)
    if not pred.any() and not gt.any():
        return LesionScores(1.0, 0.0, 0, 0, 0, 0)
    # Nothing outside the masks' box grown by the dilation takes part: work on that box only.
    box = mask_bbox(pred | gt, margin=DILATION_VOXELS)
    pred, gt = pred[box], gt[box]

    components, n_components = ndimage.label(pred, structure=connectivity)
    dilated = ndimage.binary_dilation(gt, structure=grow, iterations=DILATION_VOXELS)
    zones, n_lesions = ndimage.label(dilated, structure=connectivity)
    # Lesion k is the ground truth inside zone k; zone k is also exactly the dilation of lesion k.
    lesions = np.where(gt, zones, 0)
    sizes = np.bincount(lesions.ravel(), minlength=n_lesions + 1)

    touching = (zones > 0) & (components > 0)
    codes = np.unique(zones[touching].astype(np.int64) * (n_components + 1) + components[touching])
    pair_lesion, pair_component = np.divmod(codes, n_components + 1)
    n_false_positive = n_components - np.unique(pair_component).size

    lesion_boxes = ndimage.find_objects(lesions)
    component_boxes = ndimage.find_objects(components)
    dice_sum = hd95_sum = 0.0
    n_counted = n_true_positive = 0
    for lesion in range(1, n_lesions + 1):
        if sizes[lesion] < MIN_GT_LESION_VOXELS:
            continue
        n_counted += 1
        matched = pair_component[pair_lesion == lesion]
        if matched.size == 0:
            hd95_sum += LESION_HD95_PENALTY_MM
            continue
        n_true_positive += 1
        sub = _union_box([lesion_boxes[lesion - 1]] + [component_boxes[c - 1] for c in matched])
        gt_lesion, pred_lesion = lesions[sub] == lesion, np.isin(components[sub], matched)
        dice_sum += dice(pred_lesion, gt_lesion)
        distance = hd95(pred_lesion, gt_lesion, spacing)
        hd95_sum += LESION_HD95_PENALTY_MM if distance is None else distance

    n_scored = n_counted + n_false_positive
    if n_scored == 0:
        return LesionScores(1.0, 0.0, 0, 0, 0, 0)
    return LesionScores(
        dice=dice_sum / n_scored,
        hd95_mm=(hd95_sum + n_false_positive * LESION_HD95_PENALTY_MM) / n_scored,
        n_gt_lesions=n_counted,
        n_true_positive=n_true_positive,
        n_false_negative=n_counted - n_true_positive,
        n_false_positive=int(n_false_positive),
    )


def lesionwise_metrics(
    pred_labels: np.ndarray, gt_labels: np.ndarray, spacing: Sequence[float]
) -> dict[str, dict[str, object]]:
    """Lesion-wise Dice, HD95 and lesion counts for each region (WT, TC, ET) of two BraTS label volumes.

    Args:
        pred_labels: Predicted labels ``(X, Y, Z)`` (or 2D) in BraTS 2020 values 0, 1, 2, 4.
        gt_labels: Ground-truth labels of the same shape and values.
        spacing: Voxel size in mm per axis (used only for HD95).

    Returns:
        ``{"dice": {"WT": .., "TC": .., "ET": ..}, "hd95_mm": {...}, "lesions": {"WT": {"gt": n, "tp": n,
        "fn": n, "fp": n}, ...}}`` with the fields of :class:`LesionScores`.

    Raises:
        ValueError: As :func:`lesion_scores`.
    """
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(
            f"prediction and ground truth must have the same shape, got {pred_labels.shape} and {gt_labels.shape}"
        )
    _structures(pred_labels.ndim)
    _spacing(spacing, pred_labels.ndim)
    # Every region lies within the nonzero labels: crop once, with room for the dilation.
    box = mask_bbox((pred_labels != 0) | (gt_labels != 0), margin=DILATION_VOXELS)
    pred_labels, gt_labels = pred_labels[box], gt_labels[box]
    result: dict[str, dict[str, object]] = {"dice": {}, "hd95_mm": {}, "lesions": {}}
    for name, labels in REGIONS.items():
        scores = lesion_scores(np.isin(pred_labels, labels), np.isin(gt_labels, labels), spacing)
        result["dice"][name] = scores.dice
        result["hd95_mm"][name] = scores.hd95_mm
        result["lesions"][name] = {
            "gt": scores.n_gt_lesions,
            "tp": scores.n_true_positive,
            "fn": scores.n_false_negative,
            "fp": scores.n_false_positive,
        }
    return result
