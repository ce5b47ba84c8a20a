"""Evaluate exported ONNX models on labelled cases through the same engine that the service uses."""

from __future__ import annotations

import csv
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from service.core.datasets import find_cases, read_scan
from service.core.labels import REGION_NAMES
from service.core.lesions import lesionwise_metrics
from service.core.scoring import BRATS_HD95_SUBSTITUTE_MM, region_metrics, volumes_ml
from service.inference.backends import BackendOptions
from service.inference.engine import Engine
from service.inference.model import OnnxModel
from service.inference.pipeline import segment_scan
from training.data.manifest import read_case_kinds

log = logging.getLogger(__name__)

CARD_BACKEND = BackendOptions(backend="onnxruntime", precision="fp32")
"""What model cards' figures are measured with: ONNX Runtime fp32, all cores."""


def evaluate(model_paths: list[str | Path], data: str | Path, out: str | Path, *,
             options: BackendOptions = CARD_BACKEND, tta: bool = False, overlap: float = 0.5, max_cases: int = 0,
             progress: bool = True, postprocess: bool = True) -> dict:
    """Segment every labelled case under ``data`` and score it against its ground truth.

    Each case goes through the service's pipeline (:func:`service.inference.pipeline.segment_scan`). Several
    model paths form an ensemble (averaged probabilities). ``options`` are the service's backend options;
    model cards record ONNX Runtime fp32 (:data:`CARD_BACKEND`). Writes ``out/cases.csv`` (one row per
    case) and ``out/summary.json`` (means per region; HD95 means both over the cases where it is defined
    and, labelled as such, with the BraTS substitute of 373.13 mm where exactly one mask is empty).
    ``postprocess``: the engine applies the model card's postprocessing rules (``False``: the raw labels);
    ``summary["postprocess"]`` records it.

    Returns:
        The summary dictionary written to ``summary.json``.
    """
    models = [OnnxModel(Path(p), options) for p in model_paths]
    engine = Engine(models, overlap=overlap, batch_size=options.batch_size)
    cases = [case for case in find_cases(data) if case.label is not None]
    if not cases:
        raise ValueError(f"{data}: no labelled cases to evaluate; give a folder of cases with segmentations")
    if max_cases:
        cases = cases[:max_cases]

    kinds = read_case_kinds(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in tqdm(cases, desc="evaluate", disable=not progress, dynamic_ncols=True):
        scan = read_scan(case)
        started = time.perf_counter()
        outcome = segment_scan(scan, engine, tta=tta, postprocess=postprocess)
        seconds = time.perf_counter() - started
        rows.append(score_case(case.case_id, kinds.get(case.case_id, ""), outcome.labels, scan.label,
                               scan.geometry.zooms, seconds, metrics=outcome.metrics))

    summary = summarize(rows)
    summary.update({
        "models": [
            {"name": m.name, "sha256": m.sha256[:12], "provider": m.provider, "precision": m.precision}
            for m in models
        ],
        "data": str(data) if not Path(data).is_absolute() else Path(data).name,  # no local paths in cards
        "tta": tta,
        "postprocess": postprocess,
        "overlap": overlap,
        "runtime": runtime_version(models[0].backend),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    _write_csv(out / "cases.csv", rows)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "summary.json")
    return summary


def runtime_version(backend: str) -> str:
    """``onnxruntime 1.x`` or ``openvino 2026.x``: the library that ran the models."""
    if backend == "openvino":
        import openvino

        return f"openvino {openvino.__version__.split('-')[0]}"
    return f"onnxruntime {ort.__version__}"


def score_case(case_id: str, kind: str, pred: np.ndarray, truth: np.ndarray, spacing, seconds: float, *,
               metrics: dict | None = None) -> dict:
    """One ``cases.csv`` row: Dice, HD95 and lesion-wise Dice/HD95 per region, and both volumes in ml.
    ``metrics``: Dice and HD95 already computed (:func:`~service.core.scoring.region_metrics`), if any."""
    metrics = metrics if metrics is not None else region_metrics(pred, truth, spacing)
    lesions = lesionwise_metrics(pred, truth, spacing)
    pred_ml, truth_ml = volumes_ml(pred, spacing), volumes_ml(truth, spacing)
    row = {"case": case_id, "kind": kind, "seconds": round(seconds, 3)}
    row.update({f"dice_{r}": round(metrics["dice"][r], 5) for r in REGION_NAMES})
    row.update({f"hd95_{r}": (None if metrics["hd95_mm"][r] is None else round(metrics["hd95_mm"][r], 3))
                for r in REGION_NAMES})
    row.update({f"lesion_dice_{r}": round(lesions["dice"][r], 5) for r in REGION_NAMES})
    row.update({f"lesion_hd95_{r}": round(lesions["hd95_mm"][r], 3) for r in REGION_NAMES})
    row.update({f"pred_ml_{r}": round(pred_ml[r], 3) for r in REGION_NAMES})
    row.update({f"truth_ml_{r}": round(truth_ml[r], 3) for r in REGION_NAMES})
    return row


def summarize(rows: list[dict]) -> dict:
    """Means over per-case rows (:func:`score_case`): overall, lesion-wise, per kind, and on tumour-free brains."""
    summary = _means(rows)
    summary["lesionwise"] = {
        "dice": {r: round(float(np.mean([row[f"lesion_dice_{r}"] for row in rows])), 4) for r in REGION_NAMES},
        "hd95_mm": {r: round(float(np.mean([row[f"lesion_hd95_{r}"] for row in rows])), 2) for r in REGION_NAMES},
        "definition": "BraTS 2023: 26-connected lesions, ground truth dilated by 3 voxels for matching, ground-truth "
                      "lesions under 50 voxels ignored, a missed or false-positive lesion scores Dice 0 and HD95 374 mm",
    }
    by_kind = {}
    for kind in sorted({row["kind"] for row in rows if row["kind"]}):
        part = [row for row in rows if row["kind"] == kind]
        means = _means(part)
        by_kind[kind] = {"cases": len(part), "dice": means["dice"], "hd95_mm": means["hd95_mm"],
                         "lesionwise_dice": {r: round(float(np.mean([row[f"lesion_dice_{r}"] for row in part])), 4)
                                             for r in REGION_NAMES}}
    summary["by_kind"] = by_kind
    free = [row["pred_ml_WT"] for row in rows if row["truth_ml_WT"] == 0]
    summary["tumour_free"] = {
        "cases": len(free),
        "false_positive_ml": None if not free else {
            "median": round(float(np.median(free)), 3), "mean": round(float(np.mean(free)), 3),
            "max": round(float(np.max(free)), 3)},
    }
    return summary


def _means(rows: list[dict]) -> dict:
    """Mean Dice and HD95 per region over per-case rows (``dice_WT``, ``hd95_WT``, ...)."""
    dice = {r: float(np.mean([row[f"dice_{r}"] for row in rows])) for r in REGION_NAMES}
    hd95, hd95_sub, undefined = {}, {}, {}
    for r in REGION_NAMES:
        values = [row[f"hd95_{r}"] for row in rows]
        defined = [v for v in values if v is not None]
        hd95[r] = float(np.mean(defined)) if defined else None
        hd95_sub[r] = float(np.mean([BRATS_HD95_SUBSTITUTE_MM if v is None else v for v in values]))
        undefined[r] = len(values) - len(defined)
    return {
        "cases": len(rows),
        "dice": {r: round(v, 4) for r, v in dice.items()},
        "hd95_mm": {r: (None if v is None else round(v, 2)) for r, v in hd95.items()},
        "hd95_undefined_cases": undefined,
        "hd95_mm_with_brats_substitute": {r: round(v, 2) for r, v in hd95_sub.items()},
        "seconds_per_case": round(float(np.median([row["seconds"] for row in rows])), 2),
    }


def card_validation(summary: dict) -> dict:
    """The part of a summary that goes into a model card's ``validation`` field."""
    keys = ("cases", "dice", "hd95_mm", "hd95_undefined_cases", "hd95_mm_with_brats_substitute", "lesionwise",
            "by_kind", "tumour_free", "data", "tta", "postprocess", "overlap", "runtime", "created")
    result = {key: summary[key] for key in keys}
    result["measured_with"] = "python -m training evaluate (ONNX Runtime, the service's engine)"
    return result


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
