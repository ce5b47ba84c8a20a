"""Postprocessing of BraTS label volumes by connected components, with rules learned on validation cases.

The rules are those nnU-Net learns (``nnunetv2/postprocessing/remove_connected_components.py``), per region
and in the order WT, TC, ET, plus the rule of nnU-Net's BraTS 2020 entry for enhancing tumour:

- per region, one :class:`RegionRule`: ``none``; ``largest_component`` (keep only the largest 26-connected
  component); or ``remove_small`` (remove the 26-connected components smaller than ``min_size_ml``). Sizes
  are in millilitres, not voxels, so a rule transfers across voxel spacings (one voxel is
  ``prod(spacing) / 1000`` ml). What leaves a region keeps the nesting ET in TC in WT: removed from WT it
  becomes background (0), removed from TC edema (2, its ET included), removed from ET NCR/NET (1);
- ``et_to_ncr_below_ml``: when the whole predicted ET is smaller than this volume, all of it becomes NCR/NET
  (4 -> 1), since a little predicted ET in a case without any is the costliest error of the ET Dice
  (0 when the ground truth has none). ``0`` turns the rule off.

The engine applies the rules of a model card (:mod:`service.inference.engine`); ``python -m training
learn-postprocessing`` learns them (:mod:`training.postprocessing`). Both call :func:`apply_postprocessing`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from service.core.labels import REGION_NAMES, REGIONS, check_labels
from service.core.preprocess import mask_bbox

__all__ = [
    "ACTIONS",
    "PostprocessingRules",
    "RegionRule",
    "apply_postprocessing",
    "apply_region_rule",
    "largest_component",
    "remove_small_components",
    "voxel_volume_ml",
]

Action = Literal["none", "largest_component", "remove_small"]
ACTIONS: tuple[str, ...] = ("none", "largest_component", "remove_small")

REMOVED_TO: dict[str, int] = {"WT": 0, "TC": 2, "ET": 1}
"""The label that voxels removed from a region take: background, edema, NCR/NET."""

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def _finite(value: object) -> bool:
    """A real number (not a bool) that is finite."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and bool(
        math.isfinite(value)
    )


@dataclass(frozen=True)
class RegionRule:
    """What to do with one region's connected components.

    Attributes:
        action: ``none``, ``largest_component`` or ``remove_small``.
        min_size_ml: for ``remove_small`` only (and then required, > 0): components with a smaller volume
            in ml are removed.
    """

    action: Action = "none"
    min_size_ml: float | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"region rule action must be one of {list(ACTIONS)}, got {self.action!r}")
        if self.action == "remove_small":
            size = self.min_size_ml
            if not _finite(size) or size <= 0:
                raise ValueError(f"rule remove_small needs min_size_ml, a finite volume > 0 in ml, got {size!r}")
        elif self.min_size_ml is not None:
            raise ValueError(
                f"min_size_ml belongs to the rule remove_small only, got {self.min_size_ml!r} with {self.action!r}"
            )

    @property
    def changes_masks(self) -> bool:
        """Whether the rule can change a mask (``False`` for ``none``)."""
        return self.action != "none"


@dataclass(frozen=True)
class PostprocessingRules:
    """The rules for the three regions (applied WT, TC, ET) and the ET -> NCR volume threshold (after them).

    Attributes:
        WT: rule of the whole tumour (labels 1, 2, 4).
        TC: rule of the tumour core (labels 1, 4).
        ET: rule of the enhancing tumour (label 4).
        et_to_ncr_below_ml: all ET becomes NCR/NET when its total volume is below this (ml); ``0``: off.
    """

    WT: RegionRule = RegionRule()
    TC: RegionRule = RegionRule()
    ET: RegionRule = RegionRule()
    et_to_ncr_below_ml: float = 0.0

    def __post_init__(self) -> None:
        for name in REGION_NAMES:
            if not isinstance(getattr(self, name), RegionRule):
                raise ValueError(f"rule of region {name} must be a RegionRule, got {getattr(self, name)!r}")
        threshold = self.et_to_ncr_below_ml
        if not _finite(threshold) or threshold < 0:
            raise ValueError(f"et_to_ncr_below_ml must be a finite volume >= 0 in ml (0: off), got {threshold!r}")

    def region(self, name: str) -> RegionRule:
        """The rule of region ``name`` (``WT``, ``TC`` or ``ET``)."""
        if name not in REGION_NAMES:
            raise ValueError(f"expected a region among {list(REGION_NAMES)}, got {name!r}")
        return getattr(self, name)

    @property
    def changes_masks(self) -> bool:
        """Whether any rule can change a mask; ``False`` when applying the rules gives back the input."""
        return any(self.region(name).changes_masks for name in REGION_NAMES) or self.et_to_ncr_below_ml > 0


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in ml (``prod(spacing) / 1000``, spacing in mm), after checking the spacing.

    Raises:
        ValueError: ``spacing`` is not three finite voxel sizes > 0.
    """
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"expected three voxel sizes in mm, got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"expected three finite voxel sizes > 0 in mm, got {tuple(spacing)}")
    return math.prod(values) / 1000.0


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components of a 3D mask: the component map (0 outside) and the voxel count per id."""
    components, _ = ndimage.label(mask, structure=_CONNECTIVITY_26)
    return components, np.bincount(components.ravel())


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a 3D mask (the first in scan order among equals).

    Returns:
        A new boolean mask; empty for an empty ``mask``.
    """
    mask = np.asarray(mask, dtype=bool)
    components, sizes = _components(mask)
    if len(sizes) <= 1:
        return np.zeros(mask.shape, dtype=bool)
    return components == 1 + int(np.argmax(sizes[1:]))


def remove_small_components(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """A 3D mask without its 26-connected components of fewer than ``min_voxels`` voxels.

    Returns:
        A new boolean mask.
    """
    mask = np.asarray(mask, dtype=bool)
    components, sizes = _components(mask)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[components]


def _kept(mask: np.ndarray, rule: RegionRule, voxel_ml: float) -> np.ndarray:
    if rule.action == "largest_component":
        return largest_component(mask)
    if rule.action == "remove_small":  # a component of exactly min_size_ml stays, whatever the rounding
        return remove_small_components(mask, rule.min_size_ml / voxel_ml * (1 - 1e-9))
    return mask


def _check(labels: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, float]:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label volume (X, Y, Z), got shape {labels.shape}")
    voxel_ml = voxel_volume_ml(spacing)
    check_labels(labels)
    return labels, voxel_ml


def apply_region_rule(labels: np.ndarray, spacing: Sequence[float], region: str, rule: RegionRule) -> np.ndarray:
    """Apply one region's rule to a label volume (see the module docstring for what removed voxels become).

    Args:
        labels: ``(X, Y, Z)`` BraTS labels {0, 1, 2, 4} (read, never written).
        spacing: voxel sizes in mm.
        region: ``WT``, ``TC`` or ``ET``.
        rule: what to do with the region's components.

    Returns:
        A new ``uint8`` label volume.

    Raises:
        ValueError: not a 3D volume, a spacing that is not three finite sizes > 0, labels outside
            {0, 1, 2, 4}, or an unknown region.
    """
    labels, voxel_ml = _check(labels, spacing)
    if region not in REGIONS:
        raise ValueError(f"expected a region among {list(REGION_NAMES)}, got {region!r}")
    out = labels.astype(np.uint8, copy=True)
    _apply_region(out, region, rule, voxel_ml)
    return out


def _apply_region(out: np.ndarray, region: str, rule: RegionRule, voxel_ml: float) -> None:
    """Apply ``rule`` to ``out`` in place, working on the box of its tumour voxels (components never leave it)."""
    if not rule.changes_masks or not out.any():
        return
    box = mask_bbox(out)
    view = out[box]
    mask = np.isin(view, REGIONS[region])
    removed = mask & ~_kept(mask, rule, voxel_ml)
    view[removed] = REMOVED_TO[region]


def apply_postprocessing(
    labels: np.ndarray, spacing: Sequence[float], rules: PostprocessingRules
) -> np.ndarray:
    """Apply ``rules`` to a label volume: the WT, TC and ET rules in that order, then the ET -> NCR threshold.

    Args:
        labels: ``(X, Y, Z)`` BraTS labels {0, 1, 2, 4}, any shape (a 2D model's output is such a volume too);
            read, never written.
        spacing: voxel sizes in mm, one per axis; sizes in ml are converted to voxels with them.
        rules: the rules, e.g. ``ModelCard.postprocessing.rules()``.

    Returns:
        A new ``uint8`` label volume of the same shape, in which ET lies within TC within WT wherever the
        input's did.

    Raises:
        ValueError: not a 3D volume, a spacing that is not three finite sizes > 0, or labels outside
            {0, 1, 2, 4} (:class:`~service.core.labels.LabelError`).
    """
    labels, voxel_ml = _check(labels, spacing)
    out = labels.astype(np.uint8, copy=True)
    for region in REGION_NAMES:
        _apply_region(out, region, rules.region(region), voxel_ml)
    if rules.et_to_ncr_below_ml > 0:
        et = out == 4
        if 0 < np.count_nonzero(et) * voxel_ml < rules.et_to_ncr_below_ml * (1 - 1e-9):  # as for remove_small
            out[et] = 1
    return out
