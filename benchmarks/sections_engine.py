"""Section ``engine`` of the benchmark suite (:mod:`benchmarks.suite`): whole-case model execution by the
engine (ONNX Runtime, OpenVINO fp32 and bf16) against PyTorch eager and MONAI, with parity to ONNX Runtime on
the CPU and the share of the peak."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.harness import (
    FP32_FRACTION_ABOVE,
    FP32_MAX_ABS,
    FP32_PROBABILITY_TOLERANCE,
    OVERLAP,
    Context,
    card_of,
    interleaved,
    mask_agreement,
    median,
    model_paths,
    windows_for,
)
from benchmarks.sections_compute import section_flops

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
    from service.inference.backends import BackendOptions
    from service.inference.openvino_backend import cpu_supports_bf16, openvino_available
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

        ort_cpu = OnnxModel(path, BackendOptions(backend="onnxruntime", providers=("CPUExecutionProvider",)))
        engine_row("a", ort_cpu, "cpu", "reference")
        if openvino_available():
            engine_row("b", OnnxModel(path, BackendOptions(backend="openvino", precision="fp32")), "cpu",
                       "fp32")
            if cpu_supports_bf16():
                engine_row("c", OnnxModel(path, BackendOptions(backend="openvino", precision="bf16")), "cpu",
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
            model = OnnxModel(path, BackendOptions(backend="onnxruntime", providers=("CUDAExecutionProvider",)))
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
