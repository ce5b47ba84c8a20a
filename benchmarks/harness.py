"""What every section of the benchmark suite (:mod:`benchmarks.suite`) shares: the input case, the run's
:class:`Context`, the interleaved timing of compared rows, the agreement of two outputs, and the model files."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks import report

CASE_SEED = 20
CASE_KIND = "hgg_necrotic"  # a high-grade tumour: the usual case a request brings
FULL_SIZE = (240, 240, 155)
QUICK_SIZE, QUICK_SPACING = (96, 96, 62), (2.5, 2.5, 2.5)
OVERLAP = 0.5
FP32_PROBABILITY_TOLERANCE = 1e-3
FP32_FRACTION_ABOVE = 1e-4
FP32_MAX_ABS = 1e-2
"""An fp32 row that runs the same windows as row (a) agrees with it when at most a fraction
``FP32_FRACTION_ABOVE`` of the probabilities differ by more than ``FP32_PROBABILITY_TOLERANCE`` and none by
more than ``FP32_MAX_ABS``. The maximum alone is no gate at 1e-3: over some 10 million probabilities, fp32
rounding puts a handful of voxels (of order 1e-6 of them) 1-4e-3 apart even between PyTorch and ONNX
Runtime, and on one window ONNX Runtime itself is further from a float64 evaluation of the same network
than PyTorch is (section 2 reports both). A wrong weight, window or blending moves far more, far further."""
E2E_MODEL = "resunet"


# ------------------------------------------------------------------------------------------ plumbing
class Progress:
    """One line per measurement on stderr, with the time since the start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", file=sys.stderr, flush=True)


@dataclass
class Context:
    args: argparse.Namespace
    reps: int
    quick: bool
    models_dir: Path
    out: Path
    work: Path
    progress: Progress
    results: dict[str, Any]
    failures: list[str] = field(default_factory=list)
    case: dict[str, Any] = field(default_factory=dict)

    def fail(self, message: str) -> None:
        self.failures.append(message)
        self.progress(f"CHECK FAILED: {message}")


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def interleaved(
    rows: Sequence[tuple[str, Callable[[], Any]]],
    reps: int,
    progress: Progress,
    *,
    sync: Callable[[str], None] | None = None,
    keep: Callable[[str, Any], None] | None = None,
) -> dict[str, list[float]]:
    """Run each row once untimed (the warm-up), then time it ``reps`` times, the repetitions interleaved (row 1,
    row 2, ..., row 1, row 2, ...).

    ``sync(name)`` runs inside the timed region after the call (waits for GPU work); ``keep(name, output)``
    receives each row's first timed output (outside the timed region).
    """
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    for name, run in rows:
        start = time.perf_counter()
        run()
        if sync is not None:
            sync(name)
        progress(f"{name}: warm-up {report.ms(1000 * (time.perf_counter() - start))} ms")
    for rep in range(reps):
        for name, run in rows:
            start = time.perf_counter()
            output = run()
            if sync is not None:
                sync(name)
            elapsed = 1000 * (time.perf_counter() - start)
            times[name].append(elapsed)
            progress(f"{name}: rep {rep + 1}/{reps} {report.ms(elapsed)} ms")
            if rep == 0 and keep is not None:
                keep(name, output)
            del output
    return times


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (BraTS convention)."""
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def mask_agreement(probs: np.ndarray, reference: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Max abs probability difference and the Dice per region (WT, TC, ET) of the service's masks."""
    from service.core.labels import labels_to_regions, regions_to_labels

    ours = labels_to_regions(regions_to_labels(probs, threshold))
    ref = labels_to_regions(regions_to_labels(reference, threshold))
    difference = np.abs(probs - reference)
    above = int(np.count_nonzero(difference > FP32_PROBABILITY_TOLERANCE))
    return {
        "max_abs_diff": float(difference.max()),
        "voxels_above_tolerance": above,
        "fraction_above_tolerance": above / difference.size,
        "dice": {region: dice(ours[i], ref[i]) for i, region in enumerate(("WT", "TC", "ET"))},
    }


def windows_for(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    from service.inference.tiling import iter_tiles

    padded = [max(int(s), int(p)) for s, p in zip(shape, patch)]
    return len(iter_tiles(padded, patch, overlap))


def model_paths(models_dir: Path) -> list[Path]:
    paths = sorted(models_dir.glob("*.onnx"))
    if not paths:
        raise SystemExit(f"python -m benchmarks: no NAME.onnx models in {models_dir}")
    return paths


def card_of(path: Path) -> dict[str, Any]:
    return json.loads(path.with_suffix(".json").read_text())


# ------------------------------------------------------------------------------------------ the case
def make_input(ctx: Context) -> None:
    """The synthetic case (seeded), its preprocessed crop, and its four parts written as ``.nii.gz``."""
    from service.core.preprocess import preprocess
    from training.data.synthetic import case_seed, make_case

    seed = case_seed(CASE_SEED, 1)
    start = time.perf_counter()
    if ctx.quick:
        image, _, affine = make_case(seed, size=QUICK_SIZE, spacing=QUICK_SPACING, kind=CASE_KIND)
    else:
        image, _, affine = make_case(seed, size=FULL_SIZE, kind=CASE_KIND)
    pre = preprocess(image)
    ctx.case = {"image": image, "affine": affine, "data": np.ascontiguousarray(pre.data)}
    ctx.results["case"] = {
        "generator": f"training.data.synthetic.make_case(case_seed({CASE_SEED}, 1), kind={CASE_KIND!r})",
        "shape": list(image.shape),
        "spacing_mm": list(QUICK_SPACING) if ctx.quick else [1.0, 1.0, 1.0],
        "crop_shape": list(pre.data.shape),
        "made_in_s": round(time.perf_counter() - start, 2),
    }
    ctx.progress(f"case {list(image.shape)} -> brain crop {list(pre.data.shape)} ({time.perf_counter() - start:.1f} s)")
