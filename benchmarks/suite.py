"""The benchmark suite: ``python -m benchmarks [--out runs/bench] [--reps 5] [--sections ...] [--quick]
[--models-dir models]``.

Input: one full-size synthetic case (240 x 240 x 155, four modalities, seeded) made in memory by the
project's generator, and the shipped models. Every figure is the median of ``--reps`` repetitions after a
warm-up, and every comparison is taken side by side in the same run, the repetitions of the compared rows
interleaved (a shared machine drifts). Sections:

1. ``peak``: dense 4096 x 4096 matmul, fp32 (torch and numpy) and bf16 (torch), and fp32/fp16 on a GPU.
2. ``engine``: whole-case model execution on the preprocessed brain crop, per model: the engine on ONNX
   Runtime, OpenVINO fp32 and bf16, PyTorch eager driven by the project's sliding window, MONAI's
   ``sliding_window_inference``; with parity to the first row (max difference, Dice) and the share of peak.
3. ``flops``: FLOPs per window, counted from the network graph.
4. ``e2e``: a real service, the case posted as four ``.nii.gz`` parts; client latency against the server's
   timings.
5. ``memory``: peak resident memory of a fresh service process after one request, per model.
6. ``load``: throughput and latency percentiles with 1, 2 and 4 concurrent clients.
7. ``scaling``: model execution time against brain size, overlap and window batch size.

``--quick`` runs every section on a small volume with few repetitions (a smoke test, not a measurement).
Writes ``bench.json`` and ``bench.md`` into ``--out`` and prints the tables; progress goes to stderr. The
exit status is 1 when a check fails (an fp32 row that does not match ONNX Runtime, a section that could not
run), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks import report
from benchmarks.machine import library_versions, machine_info, usable_cores

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SECTIONS: tuple[str, ...] = ("peak", "flops", "engine", "scaling", "e2e", "memory", "load", "width")
"""Run order (the figures of ``peak`` and ``flops`` feed ``engine`` and ``scaling``)."""
SECTION_TITLES = {
    "peak": "1. Dense matmul peak",
    "engine": "2. Engine vs peers: whole-case model execution",
    "flops": "3. FLOPs per window (analytic)",
    "e2e": "4. End to end through the service",
    "memory": "5. Memory of the service process",
    "load": "6. Load: concurrent clients",
    "scaling": "7. Scaling: brain size, overlap, window batch",
    "width": "8. Network width: share of the peak per window",
}
WIDE_CHANNELS = (16, 32, 64, 128, 256)
"""A ResU-Net as wide as the reference network of the measurements that set the goals (random weights)."""
CASE_SEED = 20
CASE_KIND = "hgg_necrotic"  # a high-grade tumour: the usual case a request brings
FULL_SIZE = (240, 240, 155)
QUICK_SIZE, QUICK_SPACING = (96, 96, 62), (2.5, 2.5, 2.5)
PEAK_SIZE, QUICK_PEAK_SIZE = 4096, 1024
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
LOGIT_PARITY_TOLERANCE = 1e-3
"""PyTorch's logits on one window may differ from ONNX Runtime's by at most this fraction of the largest
logit (both are fp32 with different summation orders; a wrong or missing weight moves logits by units)."""
MONAI_MIN_DICE = 0.95
"""MONAI places its windows differently (a fixed step, the last window moved back to the border; the engine
spreads them evenly, as nnU-Net) and floors its Gaussian weights at 1e-3, so its probabilities are not
row (a)'s; its masks must still roughly agree (Dice per region at least this: a guard against gross errors).
That the MONAI row runs the same network is checked exactly on a crop where both place the windows alike,
with the engine's weights passed to MONAI (``roi_weight_map``): there the fp32 tolerances apply."""
SAME_WINDOWS_CROP = 96
"""Up to this size (two 64-voxel windows per axis at overlap 0.5) MONAI and the engine place windows alike."""
TF32_PROBABILITY_TOLERANCE = 1e-2
"""ONNX Runtime's CUDA provider may use TF32 for fp32 convolutions on recent GPUs: a looser bound."""
LOAD_CLIENTS = (1, 2, 4)
LOAD_MAX_QUEUE = 16
E2E_MODEL = "resunet"
SCALING_SIZES, QUICK_SCALING_SIZES = (96, 128), (40, 56)
SCALING_OVERLAPS = (0.25, 0.5)
SCALING_BATCHES = (1, 2, 4)


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


# ------------------------------------------------------------------------------------------ 1. peak
def section_peak(ctx: Context) -> dict[str, Any]:
    import torch

    n = QUICK_PEAK_SIZE if ctx.quick else PEAK_SIZE
    flop = 2.0 * n**3
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    cpu = torch.device("cpu")
    candidates: list[tuple[str, str, str, Callable[[], Any]]] = []
    a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
    a_bf, b_bf = a_t.to(torch.bfloat16), b_t.to(torch.bfloat16)
    candidates += [
        ("cpu", "fp32", "numpy", lambda: a_np @ b_np),
        ("cpu", "fp32", "torch", lambda: torch.mm(a_t, b_t)),
        ("cpu", "bf16", "torch", lambda: torch.mm(a_bf, b_bf)),
    ]
    gpu_sync = None
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # true fp32, as the fp32 rows of section 2
        a_g, b_g = a_t.to(gpu), b_t.to(gpu)
        a_h, b_h = a_g.half(), b_g.half()
        candidates += [
            ("cuda", "fp32", "torch", lambda: torch.mm(a_g, b_g)),
            ("cuda", "fp16", "torch", lambda: torch.mm(a_h, b_h)),
        ]

        def gpu_sync(name: str) -> None:
            if name.startswith("cuda"):
                torch.cuda.synchronize()

    rows = [(f"{dev} {prec} {lib}", run) for dev, prec, lib, run in candidates]
    times = interleaved([(f"peak {name}", run) for name, run in rows], ctx.reps, ctx.progress, sync=gpu_sync)
    out_rows = []
    peaks: dict[str, float] = {}
    for (dev, prec, lib, _), (name, _) in zip(candidates, rows):
        t = median(times[f"peak {name}"])
        gflops = flop / (t / 1000) / 1e9
        out_rows.append({"device": dev, "precision": prec, "library": lib, "ms": t, "gflops": gflops,
                         "times_ms": times[f"peak {name}"]})
        key = f"{dev}/{prec}"
        peaks[key] = max(peaks.get(key, 0.0), gflops)
    del a_t, b_t, a_bf, b_bf
    return {"size": n, "flop_per_matmul": flop, "torch_threads": torch.get_num_threads(), "rows": out_rows,
            "peak_gflops": peaks}


# ------------------------------------------------------------------------------------------ 3. flops
def section_flops(ctx: Context) -> dict[str, Any]:
    from benchmarks.flops import count_flops_onnx, network_flops

    models = {}
    for path in model_paths(ctx.models_dir):
        card = card_of(path)
        shape = [1, int(card["in_channels"]), *[int(p) for p in card["patch_size"]]]
        counted = network_flops(path, shape)
        check = count_flops_onnx(path, shape)
        models[path.stem] = {
            "window": shape,
            "flops_per_window": counted["flops"],
            "by_op": counted["by_op"],
            "ops": counted["ops"],
            "method": counted["method"],
            "onnx_graph_flops": check["flops"],
            "parameters": card.get("parameters"),
        }
        ctx.progress(f"flops {path.stem}: {counted['flops'] / 1e9:.3f} GFLOP per window {shape}")
        if check["flops"] != counted["flops"]:
            ctx.fail(f"flops {path.stem}: the OpenVINO and ONNX graph counts differ "
                     f"({counted['flops']} vs {check['flops']})")
    return {"models": models}


# ------------------------------------------------------------------------------------------ 2. engine
def centre_window(data: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """The window ``(1, C, *patch)`` at the centre of ``data (C, *spatial)`` (zero-padded where it is smaller)."""
    from service.core.preprocess import pad_to

    padded, _ = pad_to(data, patch)
    starts = [(s - p) // 2 for s, p in zip(padded.shape[1:], patch)]
    region = tuple(slice(st, st + p) for st, p in zip(starts, patch))
    return np.ascontiguousarray(padded[(slice(None), *region)][None], dtype=np.float32)


def section_engine(ctx: Context) -> dict[str, Any]:
    import copy

    import onnxruntime as ort
    import torch

    from benchmarks.peers import CountingNetwork, TorchPredictor, monai_probabilities, synchronize, torch_network
    from service.inference.backends import cpu_supports_bf16, openvino_available
    from service.inference.engine import Engine, sigmoid
    from service.inference.model import OnnxModel
    from service.inference.tiling import sliding_window

    data = ctx.case["data"]
    flops = ctx.results["sections"].get("flops", {}).get("models") or section_flops(ctx)["models"]
    peaks = ctx.results["sections"].get("peak", {}).get("peak_gflops", {})
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        torch.backends.cudnn.allow_tf32 = False  # the torch fp32 rows run true fp32
        torch.backends.cuda.matmul.allow_tf32 = False
    cuda_ort = "CUDAExecutionProvider" in ort.get_available_providers()
    results: dict[str, Any] = {
        "crop_shape": list(data.shape),
        "overlap": OVERLAP,
        "gaussian_sigma_scale": 0.125,
        "torch_threads": torch.get_num_threads(),
        "allocator": ("glibc default (GLIBC_TUNABLES unset), as a user runs PyTorch"
                      if not os.environ.get("GLIBC_TUNABLES") else f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}"),
        "tolerances": {"fp32_probability": FP32_PROBABILITY_TOLERANCE, "fp32_fraction_above": FP32_FRACTION_ABOVE,
                       "fp32_max_abs": FP32_MAX_ABS, "tf32_max_abs": TF32_PROBABILITY_TOLERANCE,
                       "monai_min_dice": MONAI_MIN_DICE, "torch_logits": LOGIT_PARITY_TOLERANCE},
        "models": {},
    }
    for path in model_paths(ctx.models_dir):
        name = path.stem
        card = card_of(path)
        patch = tuple(int(p) for p in card["patch_size"])
        threshold = float(card.get("output", {}).get("threshold", 0.5))
        window = centre_window(data, patch)
        ours = windows_for(data.shape[1:], patch, OVERLAP)
        rows: list[dict[str, Any]] = []
        runs: list[tuple[str, Callable[[], Any]]] = []
        window_logits: dict[str, Callable[[np.ndarray], np.ndarray]] = {}

        def add(row: dict[str, Any], run: Callable[[], Any], logits: Callable[[np.ndarray], np.ndarray] | None
                ) -> None:
            row["key"] = f"engine {name} ({row['id']}) {row['runtime']} {row['device']} {row['precision']}"
            rows.append(row)
            runs.append((row["key"], run))
            if logits is not None:
                window_logits[row["id"]] = logits

        def engine_row(ident: str, model: OnnxModel, device: str, check: str) -> None:
            engine = Engine([model], overlap=OVERLAP)
            runtime = "engine, " + ("ONNX Runtime" if model.backend == "onnxruntime" else "OpenVINO")
            add({"id": ident, "runtime": runtime, "device": device, "precision": model.precision,
                 "provider": model.provider, "windows": ours, "check": check},
                lambda: engine.probabilities(data), model)

        ort_cpu = OnnxModel(path, backend="onnxruntime", providers=["CPUExecutionProvider"], intra_op_threads=None)
        engine_row("a", ort_cpu, "cpu", "reference")
        if openvino_available():
            engine_row("b", OnnxModel(path, backend="openvino", precision="fp32", intra_op_threads=None), "cpu",
                       "fp32")
            if cpu_supports_bf16():
                engine_row("c", OnnxModel(path, backend="openvino", precision="bf16", intra_op_threads=None), "cpu",
                           "bf16")
        parity: dict[str, Any] = {}
        recovered: dict[str, str] = {}
        float64 = None
        for device in devices:
            dev = device.type
            suffix = "" if dev == "cpu" else "-gpu"
            network, info = torch_network(path, device)
            recovered = info["recovered"]
            if float64 is None:
                float64 = copy.deepcopy(network).to("cpu").double()
            predictor = TorchPredictor(network, device)
            reference_logits = ort_cpu(window)
            diff = float(np.max(np.abs(predictor(window) - reference_logits)))
            largest = float(np.max(np.abs(reference_logits)))
            parity[dev] = {"max_abs_logit_diff": diff, "max_abs_logit": largest, "relative": diff / max(largest, 1.0)}
            ctx.progress(f"engine {name}: torch {dev} vs ONNX Runtime logits on the centre window: max abs diff "
                         f"{diff:.2e} (largest logit {largest:.1f})")
            if diff > LOGIT_PARITY_TOLERANCE * max(largest, 1.0):
                ctx.fail(f"{name}: torch {dev} logits differ from ONNX Runtime's by {diff:.2e} on one window "
                         f"(> {LOGIT_PARITY_TOLERANCE} x the largest logit {largest:.1f})")

            def torch_run(predictor=predictor, device=device, volume=data) -> np.ndarray:
                logits = sliding_window(volume, predictor, patch_size=patch, overlap=OVERLAP)
                synchronize(device)
                return sigmoid(logits, out=logits)

            add({"id": "d" + suffix, "runtime": "PyTorch eager + our sliding_window", "device": dev,
                 "precision": "fp32", "provider": f"torch {dev}", "windows": ours, "check": "fp32"},
                torch_run, predictor)
            counting = CountingNetwork(network)
            monai_windows: dict[str, int] = {}

            def monai_run(counting=counting, device=device, volume=data, seen=monai_windows) -> np.ndarray:
                counting.windows = 0
                probs = monai_probabilities(counting, volume, patch, device, overlap=OVERLAP)
                seen[device.type] = counting.windows
                return probs

            add({"id": "e" + suffix, "runtime": "MONAI sliding_window_inference", "device": dev,
                 "precision": "fp32", "provider": f"torch {dev}", "windows": None, "check": "monai",
                 "_monai_windows": monai_windows, "_network": network},
                monai_run, None)
        if cuda_ort:
            model = OnnxModel(path, backend="onnxruntime", providers=["CUDAExecutionProvider"], intra_op_threads=None)
            if model.provider == "CUDAExecutionProvider":
                engine_row("a-gpu", model, "cuda", "tf32")
            else:
                ctx.progress(f"engine {name}: ONNX Runtime has CUDA but fell back to {model.provider}; no GPU row")

        same_windows = _monai_same_windows(ctx, name, data, patch, threshold, ort_cpu, rows, devices[0])

        # accuracy of each runtime on the centre window against the same network in float64 (PyTorch, CPU)
        with torch.inference_mode():
            exact = float64(torch.from_numpy(window).double()).numpy()
        exact_probs = 1.0 / (1.0 + np.exp(-np.clip(exact, -60, 60)))
        for row in rows:
            logits_fn = window_logits.get(row["id"])
            if logits_fn is not None:
                logits = np.asarray(logits_fn(window), dtype=np.float64)
                row["window_vs_float64"] = {
                    "max_abs_logit_diff": float(np.max(np.abs(logits - exact))),
                    "max_abs_prob_diff": float(np.max(np.abs(1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))
                                                           - exact_probs))),
                }
        del float64

        ctx.progress(f"engine {name}: {len(rows)} rows, crop {list(data.shape)}, {ours} windows")
        reference: dict[str, np.ndarray] = {}

        def keep(key: str, output: np.ndarray) -> None:
            row = next(r for r in rows if r["key"] == key)
            if row["check"] == "reference":
                reference["a"] = np.array(output, copy=True)
                row.update({"max_abs_diff": 0.0, "voxels_above_tolerance": 0, "fraction_above_tolerance": 0.0,
                            "dice": {"WT": 1.0, "TC": 1.0, "ET": 1.0}})
                return
            row.update(mask_agreement(np.asarray(output), reference["a"], threshold))

        times = interleaved(runs, ctx.reps, ctx.progress, keep=keep)
        flop = flops[name]["flops_per_window"]
        monai_ms = {}
        for row in rows:
            if "_monai_windows" in row:
                row["windows"] = row.pop("_monai_windows").get(row["device"])
                del row["_network"]
            row["times_ms"] = times[row["key"]]
            row["ms"] = median(row["times_ms"])
            if row["check"] == "monai":
                monai_ms[row["device"]] = row["ms"]
        for row in rows:
            base = monai_ms.get(row["device"])
            row["speedup_vs_monai"] = base / row["ms"] if base else None
            row["gflops"] = (row["windows"] or 0) * flop / (row["ms"] / 1000) / 1e9
            peak_key = f"{row['device']}/{'bf16' if row['precision'] == 'bf16' else 'fp32'}"
            row["peak_key"] = peak_key
            row["pct_of_peak"] = 100 * row["gflops"] / peaks[peak_key] if peaks.get(peak_key) else None
            _judge_row(ctx, name, row)
        results["models"][name] = {"rows": rows, "torch_vs_onnxruntime_logits": parity,
                                   "monai_same_windows": same_windows,
                                   "weights_recovered_from_graph": recovered, "flops_per_window": flop,
                                   "patch_size": list(patch)}
        del reference
    return results


def _monai_same_windows(ctx: Context, name: str, data: np.ndarray, patch: Sequence[int], threshold: float,
                        ort_cpu, rows: list[dict[str, Any]], device) -> dict[str, Any]:
    """MONAI (the network of row e, the engine's Gaussian as ``roi_weight_map``) against the engine on ONNX
    Runtime, on the centre crop of at most :data:`SAME_WINDOWS_CROP` voxels per axis, where both place the
    windows alike: the two must agree as fp32 rows do."""
    from benchmarks.peers import monai_probabilities
    from service.inference.engine import Engine
    from service.inference.tiling import gaussian_weight

    size = [min(SAME_WINDOWS_CROP, s) for s in data.shape[1:]]
    starts = [(s - c) // 2 for s, c in zip(data.shape[1:], size)]
    crop = np.ascontiguousarray(data[(slice(None), *[slice(st, st + c) for st, c in zip(starts, size)])])
    network = next(r for r in rows if r["check"] == "monai" and r["device"] == device.type)["_network"]
    ours = Engine([ort_cpu], overlap=OVERLAP).probabilities(crop)
    theirs = monai_probabilities(network, crop, patch, device, overlap=OVERLAP,
                                 roi_weight_map=gaussian_weight(patch))
    result = {"crop": size, "windows": windows_for(size, patch, OVERLAP), **mask_agreement(theirs, ours, threshold)}
    ctx.progress(f"engine {name}: MONAI with the engine's weights on a {size} crop (windows placed alike) vs the "
                 f"engine: max abs diff {result['max_abs_diff']:.2e}")
    if result["max_abs_diff"] > FP32_MAX_ABS or result["fraction_above_tolerance"] > FP32_FRACTION_ABOVE:
        ctx.fail(f"{name}: MONAI with the engine's windows and weights differs from the engine by up to "
                 f"{result['max_abs_diff']:.2e} ({result['fraction_above_tolerance']:.1e} of the values by more "
                 f"than {FP32_PROBABILITY_TOLERANCE})")
    return result


def _judge_row(ctx: Context, name: str, row: dict[str, Any]) -> None:
    check, diff = row["check"], row.get("max_abs_diff")
    label = f"{name} row ({row['id']}) {row['runtime']} {row['device']} {row['precision']}"
    if diff is None:
        return
    above = row.get("fraction_above_tolerance", 0.0)
    if check == "fp32" and (diff > FP32_MAX_ABS or above > FP32_FRACTION_ABOVE):
        ctx.fail(f"{label}: probabilities differ from ONNX Runtime CPU's by up to {diff:.2e}, and by more than "
                 f"{FP32_PROBABILITY_TOLERANCE} in a fraction {above:.1e} of the voxels (limits {FP32_MAX_ABS}, "
                 f"{FP32_FRACTION_ABOVE})")
    elif check == "tf32" and diff > TF32_PROBABILITY_TOLERANCE:
        ctx.fail(f"{label}: probabilities differ from ONNX Runtime CPU's by {diff:.2e} "
                 f"(> {TF32_PROBABILITY_TOLERANCE})")
    elif check == "monai" and min(row["dice"].values()) < MONAI_MIN_DICE:
        ctx.fail(f"{label}: masks agree with ONNX Runtime's only to Dice {row['dice']} (< {MONAI_MIN_DICE})")


# ------------------------------------------------------------------------------------------ 7. scaling
def section_scaling(ctx: Context) -> dict[str, Any]:
    from service.inference.engine import Engine
    from service.inference.model import OnnxModel

    data = ctx.case["data"]
    paths = {p.stem: p for p in model_paths(ctx.models_dir)}
    name = E2E_MODEL if E2E_MODEL in paths else sorted(paths)[0]
    path = paths[name]
    card = card_of(path)
    patch = tuple(int(p) for p in card["patch_size"])
    threshold = float(card.get("output", {}).get("threshold", 0.5))
    flops = ctx.results["sections"].get("flops", {}).get("models", {}).get(name, {}).get("flops_per_window")
    models = {b: OnnxModel(path, batch_size=b) for b in SCALING_BATCHES}  # the default backend and precision
    default = models[1]
    sizes = QUICK_SCALING_SIZES if ctx.quick else SCALING_SIZES

    def center_crop(size: int) -> np.ndarray:
        starts = [max((s - size) // 2, 0) for s in data.shape[1:]]
        region = tuple(slice(st, st + min(size, s)) for st, s in zip(starts, data.shape[1:]))
        return np.ascontiguousarray(data[(slice(None), *region)])

    variants: list[dict[str, Any]] = []
    for size in sizes:
        variants.append({"group": "brain size", "variant": f"{size}^3 crop", "volume": center_crop(size),
                         "overlap": OVERLAP, "batch": 1})
    variants.append({"group": "brain size", "variant": "full crop (default)", "volume": data, "overlap": OVERLAP,
                     "batch": 1, "default": True})
    for overlap in SCALING_OVERLAPS:
        if overlap != OVERLAP:
            variants.append({"group": "overlap", "variant": f"overlap {overlap}", "volume": data,
                             "overlap": overlap, "batch": 1})
    for batch in SCALING_BATCHES:
        if batch != 1:
            variants.append({"group": "window batch", "variant": f"batch {batch}", "volume": data,
                             "overlap": OVERLAP, "batch": batch})
    runs = []
    for v in variants:
        engine = Engine([models[v["batch"]]], overlap=v["overlap"], batch_size=v["batch"])
        v["shape"] = list(v["volume"].shape[1:])
        v["windows"] = windows_for(v["shape"], patch, v["overlap"])
        v["key"] = f"scaling {name} {v['variant']}"
        runs.append((v["key"], lambda e=engine, x=v["volume"]: e.probabilities(x)))
    outputs: dict[str, np.ndarray] = {}
    times = interleaved(runs, ctx.reps, ctx.progress,
                        keep=lambda key, out: outputs.__setitem__(key, np.array(out, copy=True)))
    base = next(v for v in variants if v.get("default"))
    base_ms = median(times[base["key"]])
    rows = []
    for v in variants:
        t = median(times[v["key"]])
        row = {k: v[k] for k in ("group", "variant", "shape", "overlap", "batch", "windows")}
        row.update({"times_ms": times[v["key"]], "ms": t, "ms_per_window": t / v["windows"],
                    "relative_to_default": t / base_ms, "default": bool(v.get("default")),
                    "gflops": v["windows"] * flops / (t / 1000) / 1e9 if flops else None})
        if v["shape"] == base["shape"] and not v.get("default"):
            row.update(mask_agreement(outputs[v["key"]], outputs[base["key"]], threshold))
        rows.append(row)
    return {"model": name, "backend": default.backend, "precision": default.precision, "provider": default.provider,
            "rows": rows}


# ------------------------------------------------------------------------------------------ 4-6. service
def _parts(ctx: Context):
    from benchmarks.serving import Parts

    if "parts" not in ctx.case:
        ctx.case["parts"] = Parts.write(ctx.case["image"], ctx.case["affine"], ctx.work / "case", dtype=np.int16)
        ctx.progress(f"case written as four .nii.gz parts (int16, as the generator writes BraTS files): "
                     f"{ctx.case['parts'].bytes / 2**20:.1f} MiB")
    return ctx.case["parts"]


def section_e2e(ctx: Context) -> dict[str, Any]:
    from benchmarks.serving import Server, client_for, outside_share, segment

    parts = _parts(ctx)
    answers: dict[str, list] = {"json": [], "nifti": []}
    with Server(ctx.work, ctx.models_dir) as server:
        ctx.progress(f"e2e: service ready in {server.startup_s:.1f} s on {server.url}")
        with client_for(server) as client:
            for fmt in ("json", "nifti"):  # warm-up
                segment(client, parts, model=E2E_MODEL, fmt=fmt)
            for rep in range(ctx.reps):
                for fmt in ("json", "nifti"):
                    answer = segment(client, parts, model=E2E_MODEL, fmt=fmt)
                    answers[fmt].append(answer)
                    ctx.progress(f"e2e {E2E_MODEL} format={fmt}: rep {rep + 1}/{ctx.reps} "
                                 f"{report.ms(answer.latency_ms)} ms (server inference "
                                 f"{report.ms(answer.timing_ms['inference'])} ms)")
        startup_s = server.startup_s
    formats = {}
    for fmt, items in answers.items():
        shares = [outside_share(a) for a in items]
        keys = list(shares[0])
        formats[fmt] = {
            "latency_ms": median([a.latency_ms for a in items]),
            "latencies_ms": [a.latency_ms for a in items],
            "timing_ms": {k: median([a.timing_ms[k] for a in items]) for k in items[0].timing_ms},
            "outside_share": median([1 - a.timing_ms["inference"] / a.latency_ms for a in items]),
            "parts_ms": {k: median([s[k] for s in shares]) for k in keys},
            "parts_share": {k: median([s[k] / a.latency_ms for s, a in zip(shares, items)]) for k in keys},
            "response_bytes": median([a.response_bytes for a in items]),
        }
    return {"model": E2E_MODEL, "upload_bytes": parts.bytes, "parts_dtype": parts.dtype, "shape": list(parts.shape),
            "startup_s": startup_s, "settings": "defaults; BRATS_MODELS_DIR, BRATS_TMP_DIR set", "formats": formats}


def section_memory(ctx: Context) -> dict[str, Any]:
    from benchmarks.serving import Server, client_for, segment

    parts = _parts(ctx)
    names = [p.stem for p in model_paths(ctx.models_dir)]
    if len(names) > 1:
        names.append("ensemble")
    rows = []
    for model in names:
        with Server(ctx.work, ctx.models_dir) as server:
            at_start = server.memory()
            with client_for(server) as client:
                answer = segment(client, parts, model=model, fmt="nifti")
            after = server.memory()
            rows.append({"model": model, "startup_s": server.startup_s, "rss_after_startup": at_start["VmRSS"],
                         "peak_after_startup": at_start["VmHWM"], "rss_after_request": after["VmRSS"],
                         "peak_rss": after["VmHWM"], "latency_ms": answer.latency_ms})
        ctx.progress(f"memory {model}: RSS after start-up {at_start['VmRSS'] / 2**20:.0f} MiB, peak after one "
                     f"request {after['VmHWM'] / 2**20:.0f} MiB")
    return {"format": "nifti", "shape": list(parts.shape), "rows": rows}


def section_load(ctx: Context) -> dict[str, Any]:
    from benchmarks.serving import Server, client_for, run_clients, segment

    parts = _parts(ctx)
    levels = []
    with Server(ctx.work, ctx.models_dir, {"BRATS_MAX_QUEUE": str(LOAD_MAX_QUEUE)}) as server:
        with client_for(server) as client:
            segment(client, parts, model=E2E_MODEL, fmt="nifti")  # warm-up
        for clients in LOAD_CLIENTS:
            requests = max(2, clients) if ctx.quick else max(4, 2 * clients)
            outcome = run_clients(server, parts, clients=clients, requests=requests, model=E2E_MODEL, fmt="nifti")
            lat = outcome["latencies_ms"]
            level = {
                "clients": clients,
                "requests": requests,
                "ok": len(lat),
                "errors": outcome["errors"],
                "wall_s": outcome["wall_s"],
                "throughput_rps": len(lat) / outcome["wall_s"],
                "p50_ms": float(np.percentile(lat, 50)) if lat else None,
                "p95_ms": float(np.percentile(lat, 95)) if lat else None,
                "latencies_ms": lat,
            }
            levels.append(level)
            ctx.progress(f"load {clients} client(s): {len(lat)}/{requests} ok, {level['throughput_rps']:.3f} req/s, "
                         f"p50 {report.ms(level['p50_ms'])} ms")
            if outcome["errors"]:
                ctx.fail(f"load {clients} clients: {len(outcome['errors'])} requests failed: {outcome['errors'][0]}")
    return {"model": E2E_MODEL, "format": "nifti", "max_queue": LOAD_MAX_QUEUE,
            "settings": f"defaults; BRATS_MAX_QUEUE={LOAD_MAX_QUEUE}", "levels": levels}


# ------------------------------------------------------------------------------------------ 8. width
def _export_wide(ctx: Context) -> Path:
    """A ResU-Net of :data:`WIDE_CHANNELS` with random weights, exported to ONNX (opset 17) in the work folder."""
    import torch

    from training.networks.registry import build_network

    torch.manual_seed(0)
    net = build_network("resunet", spatial_dims=3, in_channels=4, out_channels=3, channels=list(WIDE_CHANNELS)).eval()
    path = ctx.work / "resunet-wide.onnx"
    spatial = {0: "batch", 2: "x", 3: "y", 4: "z"}
    with torch.no_grad():
        torch.onnx.export(
            net, torch.zeros(1, 4, 32, 32, 32), str(path), input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": spatial, "logits": spatial}, opset_version=17, dynamo=False,
        )
    return path


def section_width(ctx: Context) -> dict[str, Any]:
    """Time per window of the shipped resunet and of a wide ResU-Net, on each CPU backend and precision, as a
    share of the dense peak of section 1: how much of the gap to the peak comes from the network's width."""
    from service.inference.backends import OnnxRuntimeBackend, OpenVinoBackend, cpu_supports_bf16, openvino_available
    from benchmarks.flops import network_flops

    peaks = ctx.results["sections"].get("peak", {}).get("peak_gflops", {})
    shipped = ctx.models_dir / "resunet.onnx"
    networks = [("resunet (shipped)", shipped, "8, 16, 32, 64, 128")]
    networks.append(("resunet, wide (random weights)", _export_wide(ctx), ", ".join(map(str, WIDE_CHANNELS))))
    windows = [(32, 32, 32)] if ctx.quick else [(64, 64, 64), (128, 128, 128)]
    rows = []
    for label, path, channels in networks:
        for window in windows:
            if path == shipped and window != (64, 64, 64) and not ctx.quick:
                continue  # the shipped networks run 64^3 windows
            shape = [1, 4, *window]
            flop = network_flops(path, shape)["flops"]
            batch = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
            runtimes: list[tuple[str, str, Callable[[], Any]]] = [
                ("onnxruntime", "fp32", OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"]))
            ]
            if openvino_available():
                runtimes.append(("openvino", "fp32", OpenVinoBackend(path, precision="fp32", patch_size=window,
                                                                      in_channels=4)))
                if cpu_supports_bf16():
                    runtimes.append(("openvino", "bf16", OpenVinoBackend(path, precision="bf16", patch_size=window,
                                                                          in_channels=4)))
            name = f"width {label} {'x'.join(map(str, window))}"
            times = interleaved([(f"{name} {b} {p}", (lambda r=r: r(batch))) for b, p, r in runtimes],
                                ctx.reps, ctx.progress)
            for backend, precision, _ in runtimes:
                t = median(times[f"{name} {backend} {precision}"])
                achieved = flop / (t / 1000) / 1e9
                peak = peaks.get(f"cpu/{precision}")
                rows.append({
                    "network": label, "channels": channels, "window": list(window), "backend": backend,
                    "precision": precision, "gflop_per_window": flop / 1e9, "ms": t, "gflops": achieved,
                    "pct_of_peak": None if not peak else 100 * achieved / peak,
                })
            del runtimes
    return {"rows": rows, "peaks": peaks}


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "peak": section_peak,
    "flops": section_flops,
    "engine": section_engine,
    "scaling": section_scaling,
    "width": section_width,
    "e2e": section_e2e,
    "memory": section_memory,
    "load": section_load,
}


# ------------------------------------------------------------------------------------------ main
def parse_sections(values: Sequence[str] | None) -> list[str]:
    if not values:
        return list(SECTIONS)
    wanted = {s.strip() for v in values for s in v.split(",") if s.strip()}
    unknown = wanted - set(SECTIONS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in wanted]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark suite: peak, engine vs PyTorch/MONAI, FLOPs, end to end, memory, load, scaling.",
    )
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "runs" / "bench",
                        help="folder for bench.json and bench.md (default runs/bench)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per figure, after a warm-up (default 5; 2 with --quick)")
    parser.add_argument("--sections", nargs="+", metavar="SECTION",
                        help=f"sections to run (default all): {' '.join(SECTIONS)}; space or comma separated")
    parser.add_argument("--quick", action="store_true",
                        help="small volume and few repetitions: exercises every section in about a minute")
    parser.add_argument("--models-dir", type=Path, default=PROJECT_ROOT / "models",
                        help="folder of NAME.onnx + NAME.json models (default models/)")
    args = parser.parse_args(argv)
    try:
        args.sections = parse_sections(args.sections)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    import torch

    torch.set_num_threads(usable_cores())  # torch rows use every core, as the other runtimes do
    progress = Progress()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    reps = args.reps or (2 if args.quick else 5)
    results: dict[str, Any] = {
        "command": "python -m benchmarks" + (" " + shlex.join(argv) if argv else ""),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "reps": reps,
        "warm_up": "one untimed run of every row before the timed ones; one request per format in e2e, one in load",
        "sections_run": args.sections,
        "machine": machine_info(),
        "versions": library_versions(),
        "sections": {},
        "section_wall_s": {},
        "load_average": {},
    }
    progress(f"machine: {results['machine']['cpu']['model']}, {results['machine']['cores_usable']} cores, "
             f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        ctx = Context(args=args, reps=reps, quick=args.quick, models_dir=args.models_dir.resolve(), out=out,
                      work=Path(work), progress=progress, results=results)
        make_input(ctx)
        for section in args.sections:
            started = time.perf_counter()
            progress(f"--- section {section}")
            try:
                results["sections"][section] = RUNNERS[section](ctx)
            except Exception as exc:  # record it, run the other sections, fail at the end
                ctx.fail(f"section {section} could not run: {type(exc).__name__}: {exc}")
            results["section_wall_s"][section] = time.perf_counter() - started
            results["load_average"][section] = list(os.getloadavg())
        results["failures"] = ctx.failures
        results["wall_s"] = time.perf_counter() - progress.start
    markdown = report.markdown(results)
    (out / "bench.json").write_text(json.dumps(_clean(results), indent=2) + "\n")
    (out / "bench.md").write_text(markdown)
    print(markdown, flush=True)
    progress(f"wrote {out / 'bench.json'} and {out / 'bench.md'} in {results['wall_s']:.0f} s")
    if ctx.failures:
        print(f"\n{len(ctx.failures)} check(s) failed:", file=sys.stderr)
        for failure in ctx.failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    return 0


def _clean(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN to null, keys starting with ``_`` and the row keys dropped."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.integer):
        return int(value)
    return value
