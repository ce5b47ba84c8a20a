"""Learn postprocessing rules on validation cases, as nnU-Net does, and write them into the model card.

:func:`learn_postprocessing` decides as nnU-Net v2's ``determine_postprocessing``
(``nnunetv2/postprocessing/remove_connected_components.py``) does, one region at a time and in the order WT,
TC, ET, each on the predictions with the earlier regions' choices already applied; nnU-Net tries only keeping
the largest component, here removing the components below a size is a candidate too. Every candidate rule
(remove the components below a size of :data:`MIN_SIZE_GRID_ML`, or keep only the largest component) is
applied to every case, and the one with the highest mean Dice of that region is kept if it beats doing
nothing by more than ``margin`` and lowers no other region's mean Dice (a WT rule also removes TC and ET).
The ET -> NCR volume threshold of nnU-Net's BraTS 2020 entry is then chosen from
:data:`ET_TO_NCR_GRID_ML` the same way on the mean ET Dice. Dice is
:func:`service.core.scoring.dice` (1.0 when both masks are empty), and the rules are applied with
:func:`service.core.postprocess.apply_postprocessing`, the function the engine applies them with.

:func:`learn_for_model` is ``python -m training learn-postprocessing``: it segments the validation cases
through the service's engine with postprocessing off, learns the rules and writes them into ``NAME.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.core.datasets import Case, find_cases, read_scan
from service.core.labels import REGION_NAMES, REGIONS, check_labels
from service.core.scoring import dice
from service.core.postprocess import (
    PostprocessingRules,
    RegionRule,
    apply_postprocessing,
    apply_region_rule,
    voxel_volume_ml,
)
from service.core.preprocess import mask_bbox
from service.inference.card import ModelCard, PostprocessingSpec, card_path, write_card
from service.inference.backends import BackendOptions
from service.inference.engine import Engine
from service.inference.model import OnnxModel
from service.inference.pipeline import segment_scan
from training.evaluate import CARD_BACKEND

log = logging.getLogger(__name__)

MIN_SIZE_GRID_ML: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""Candidate sizes (ml) below which a region's components are removed (10 to 2,000 voxels of 1 mm^3)."""

ET_TO_NCR_GRID_ML: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
"""Candidate ET volumes (ml) below which all ET becomes NCR/NET; not changing anything (0) is the baseline."""

MARGIN = 1e-3
"""A rule is kept only if it raises the region's mean Dice by more than this."""

_TOLERANCE = 1e-12  # "lowers no other region": floating-point noise aside


@dataclass(frozen=True)
class LearnedPostprocessing:
    """What :func:`learn_postprocessing` decided and measured.

    Attributes:
        rules: the rules, for :func:`~service.core.postprocess.apply_postprocessing`.
        cases: number of validation cases.
        dice_before: mean Dice per region of the predictions as given.
        dice_after: mean Dice per region after the rules.
        tried: per step (``WT``, ``TC``, ``ET``, ``ET->NCR``), the mean Dice of that region for each candidate,
            ``none`` (the baseline) first.
    """

    rules: PostprocessingRules
    cases: int
    dice_before: dict[str, float]
    dice_after: dict[str, float]
    tried: dict[str, dict[str, float]] = field(default_factory=dict)

    def learned_on(self, **extra) -> dict:
        """The card's ``postprocessing.learned_on``: cases, ``extra``, and the mean Dice before and after and of
        every candidate tried (rounded to 4 digits)."""
        return {
            "cases": self.cases,
            **extra,
            "dice_before": {r: round(v, 4) for r, v in self.dice_before.items()},
            "dice_after": {r: round(v, 4) for r, v in self.dice_after.items()},
            "dice_tried": {step: {k: round(v, 4) for k, v in scores.items()} for step, scores in self.tried.items()},
        }


def describe(rules: PostprocessingRules) -> str:
    """One line, e.g. ``WT largest_component, TC none, ET remove_small < 0.1 ml, ET->NCR below 0.5 ml``."""
    parts = []
    for name in REGION_NAMES:
        rule = rules.region(name)
        size = f" < {rule.min_size_ml:g} ml" if rule.action == "remove_small" else ""
        parts.append(f"{name} {rule.action}{size}")
    threshold = rules.et_to_ncr_below_ml
    parts.append(f"ET->NCR below {threshold:g} ml" if threshold > 0 else "ET->NCR off")
    return ", ".join(parts)


def _candidate_name(rule: RegionRule) -> str:
    return f"remove_small<{rule.min_size_ml:g}ml" if rule.action == "remove_small" else rule.action


def _region_means(predictions: Sequence[np.ndarray], truths: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    scores = {name: [] for name in REGION_NAMES}
    for pred, truth in zip(predictions, truths):
        for name, labels in REGIONS.items():
            scores[name].append(dice(np.isin(pred, labels), truth[name]))
    return {name: float(np.mean(values)) for name, values in scores.items()}


def _choose(
    region: str,
    candidates: Sequence[tuple[str, Callable[[np.ndarray, Sequence[float]], np.ndarray]]],
    state: list[np.ndarray],
    spacings: Sequence[Sequence[float]],
    truths: Sequence[dict[str, np.ndarray]],
    margin: float,
) -> tuple[int | None, dict[str, float], list[np.ndarray]]:
    """Try each candidate on every case of ``state`` and pick the one for ``region``.

    The best candidate is kept when it raises ``region``'s mean Dice by more than ``margin`` and lowers no
    other region's; candidates come mildest first, and among equal scores the first wins.

    Returns:
        The index of the chosen candidate (``None``: none), the mean Dice of ``region`` per candidate
        (``none`` first), and the cases after the chosen candidate (``state`` itself when none is).
    """
    baseline = _region_means(state, truths)
    tried = {"none": baseline[region]}
    best, best_score, best_state = None, baseline[region], state
    for index, (name, apply) in enumerate(candidates):
        trial = [apply(labels, spacing) for labels, spacing in zip(state, spacings)]
        means = _region_means(trial, truths)
        tried[name] = means[region]
        gains = means[region] - baseline[region] > margin
        harmless = all(means[o] >= baseline[o] - _TOLERANCE for o in REGION_NAMES if o != region)
        if gains and harmless and means[region] > best_score:
            best, best_score, best_state = index, means[region], trial
    return best, tried, best_state


def learn_postprocessing(
    predictions: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]],
    *,
    min_size_grid_ml: Sequence[float] = MIN_SIZE_GRID_ML,
    et_to_ncr_grid_ml: Sequence[float] = ET_TO_NCR_GRID_ML,
    margin: float = MARGIN,
) -> LearnedPostprocessing:
    """Learn the rules that raise the mean Dice of the validation cases (see the module docstring).

    Args:
        predictions: per case, the predicted ``(X, Y, Z)`` BraTS labels without postprocessing.
        truths: per case, the ground-truth labels, same shape.
        spacings: per case, the voxel sizes in mm.
        min_size_grid_ml: candidate sizes (ml) for ``remove_small``.
        et_to_ncr_grid_ml: candidate ET -> NCR thresholds (ml); doing nothing is always the baseline.
        margin: least rise of a region's mean Dice for a rule to be kept.

    Returns:
        The rules and the mean Dice per region before and after them.

    Raises:
        ValueError: no cases, lists of different lengths, a prediction and truth of different shapes,
            labels outside {0, 1, 2, 4}, a bad spacing, or a grid value that is not a volume > 0.
    """
    if not len(predictions) == len(truths) == len(spacings):
        raise ValueError(
            f"expected one truth and one spacing per prediction, got {len(predictions)} predictions, "
            f"{len(truths)} truths and {len(spacings)} spacings"
        )
    if not predictions:
        raise ValueError("no validation cases to learn postprocessing from")
    if margin < 0:
        raise ValueError(f"margin must be at least 0, got {margin}")
    candidates = [RegionRule("remove_small", float(size)) for size in sorted(min_size_grid_ml)]
    candidates.append(RegionRule("largest_component"))
    thresholds = sorted(float(t) for t in et_to_ncr_grid_ml)
    PostprocessingRules(et_to_ncr_below_ml=min(thresholds, default=0.0))  # the grid's values are volumes >= 0
    state, truth_masks = [], []
    for index, (pred, truth, spacing) in enumerate(zip(predictions, truths, spacings)):
        pred, truth = np.asarray(pred), np.asarray(truth)
        if pred.shape != truth.shape:
            raise ValueError(f"case {index}: prediction shape {pred.shape} differs from its truth's {truth.shape}")
        voxel_volume_ml(spacing)
        check_labels(truth)
        state.append(pred.astype(np.uint8))
        truth_masks.append({name: np.isin(truth, labels) for name, labels in REGIONS.items()})

    before = _region_means(state, truth_masks)
    chosen: dict[str, RegionRule] = {}
    tried: dict[str, dict[str, float]] = {}
    for region in REGION_NAMES:
        trials = [(_candidate_name(rule), partial(_region_rule, region=region, rule=rule)) for rule in candidates]
        best, tried[region], state = _choose(region, trials, state, spacings, truth_masks, margin)
        if best is not None:
            chosen[region] = candidates[best]
        log.info("%s: %s", region, _candidate_name(chosen.get(region, RegionRule())))
    trials = [
        (f"below<{t:g}ml", partial(_et_to_ncr, rules=PostprocessingRules(et_to_ncr_below_ml=t))) for t in thresholds
    ]
    best, tried["ET->NCR"], state = _choose("ET", trials, state, spacings, truth_masks, margin)
    rules = PostprocessingRules(**chosen, et_to_ncr_below_ml=0.0 if best is None else thresholds[best])
    return LearnedPostprocessing(
        rules=rules, cases=len(state), dice_before=before, dice_after=_region_means(state, truth_masks), tried=tried
    )


def _region_rule(labels: np.ndarray, spacing: Sequence[float], *, region: str, rule: RegionRule) -> np.ndarray:
    return apply_region_rule(labels, spacing, region, rule)


def _et_to_ncr(labels: np.ndarray, spacing: Sequence[float], *, rules: PostprocessingRules) -> np.ndarray:
    return apply_postprocessing(labels, spacing, rules)


def crop_to_tumour(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both volumes cropped to the box of their tumour voxels together (a ``(1, 1, 1)`` background pair when
    neither has any): components, Dice and volumes stay the same, the memory held per case shrinks."""
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    either = (prediction != 0) | (truth != 0)
    if not either.any():
        empty = np.zeros((1, 1, 1), dtype=np.uint8)
        return empty, empty.copy()
    box = mask_bbox(either)
    return prediction[box].copy(), truth[box].copy()


def validation_cases(data: str | Path, split: str | Path | None = None) -> list[Case]:
    """The labelled cases of ``data`` named by ``split``'s ``validation`` list, or all labelled cases.

    Raises:
        ValueError: the split is unreadable or has no ``validation`` list of case ids, names cases that are not
            labelled cases of ``data``, or there is no case at all.
    """
    cases = {case.case_id: case for case in find_cases(data) if case.label is not None}
    if split is None:
        if not cases:
            raise ValueError(f"{data}: no labelled cases; give a folder of cases with segmentations")
        return [cases[cid] for cid in sorted(cases)]
    try:
        ids = json.loads(Path(split).read_text())["validation"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{split}: expected a split.json of training ({{\"train\": [...], \"validation\": [...]}}), "
            f"could not read its validation list ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(ids, list) or not ids or not all(isinstance(cid, str) for cid in ids):
        raise ValueError(f"{split}: 'validation' must be a non-empty list of case ids, got {str(ids)[:80]}")
    missing = [cid for cid in ids if cid not in cases]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"{split}: {len(missing)} of {len(ids)} validation cases are not labelled cases in {data}: {shown}"
        )
    return [cases[cid] for cid in ids]


def learn_for_model(
    model_path: str | Path,
    data: str | Path,
    *,
    split: str | Path | None = None,
    options: BackendOptions = CARD_BACKEND,
    tta: bool = False,
    overlap: float = 0.5,
    progress: bool = True,
    command: str = "",
) -> tuple[ModelCard, LearnedPostprocessing]:
    """Segment the validation cases with postprocessing off, learn the rules, write them into ``NAME.json``.

    The card is rewritten atomically with the rules in ``postprocessing`` and, in its ``learned_on``, the
    case count, the data folder's name, the mean Dice per region before and after, and how the cases were
    segmented; its sha256 (the ONNX file's) does not change.

    Returns:
        The updated card and what was learned.

    Raises:
        ValueError: see :func:`validation_cases`, :class:`~service.inference.model.OnnxModel`, and
            :func:`~service.core.datasets.read_scan`.
    """
    cases = validation_cases(data, split)
    model = OnnxModel(Path(model_path), options)
    engine = Engine([model], overlap=overlap, batch_size=options.batch_size)
    predictions, truths, spacings = [], [], []
    for case in tqdm(cases, desc="learn-postprocessing", disable=not progress, dynamic_ncols=True):
        scan = read_scan(case)
        raw = segment_scan(replace(scan, label=None), engine, tta=tta, postprocess=False)  # scored below
        geometry = scan.geometry
        pred, truth = crop_to_tumour(raw.labels, scan.label)
        predictions.append(pred)
        truths.append(truth)
        spacings.append(geometry.zooms)
    learned = learn_postprocessing(predictions, truths, spacings)
    learned_on = learned.learned_on(
        data=str(data) if not Path(data).is_absolute() else Path(data).name,  # no local paths in cards
        split=None if split is None else Path(split).name,
        tta=tta,
        overlap=overlap,
        runtime=f"{model.backend} {model.precision}",
        margin=MARGIN,
        command=command,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    spec = PostprocessingSpec.from_rules(learned.rules, learned_on=learned_on)
    card = ModelCard.model_validate({**model.card.model_dump(), "postprocessing": spec.model_dump()})
    write_card(card, card_path(model_path))
    return card, learned
