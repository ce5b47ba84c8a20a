"""Sections ``peak``, ``flops``, ``scaling`` and ``width`` of the benchmark suite (:mod:`benchmarks.suite`): the
dense matmul peak, the FLOPs per window, the model execution time against brain size, overlap and window
batch, and the share of the peak against the network's width."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.harness import (
    E2E_MODEL,
    OVERLAP,
    Context,
    card_of,
    interleaved,
    mask_agreement,
    median,
    model_paths,
    windows_for,
)

WIDE_CHANNELS = (16, 32, 64, 128, 256)
"""A ResU-Net as wide as the reference network of the measurements that set the goals (random weights)."""
PEAK_SIZE, QUICK_PEAK_SIZE = 4096, 1024
SCALING_SIZES, QUICK_SCALING_SIZES = (96, 128), (40, 56)
SCALING_OVERLAPS = (0.25, 0.5)
SCALING_BATCHES = (1, 2, 4)


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


# ------------------------------------------------------------------------------------------ 7. scaling
def section_scaling(ctx: Context) -> dict[str, Any]:
    from service.inference.engine import Engine
    from service.inference.backends import BackendOptions
    from service.inference.model import OnnxModel

    data = ctx.case["data"]
    paths = {p.stem: p for p in model_paths(ctx.models_dir)}
    name = E2E_MODEL if E2E_MODEL in paths else sorted(paths)[0]
    path = paths[name]
    card = card_of(path)
    patch = tuple(int(p) for p in card["patch_size"])
    threshold = float(card.get("output", {}).get("threshold", 0.5))
    flops = ctx.results["sections"].get("flops", {}).get("models", {}).get(name, {}).get("flops_per_window")
    models = {b: OnnxModel(path, BackendOptions(batch_size=b)) for b in SCALING_BATCHES}  # the default backend and precision
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
    from service.inference.backends import OnnxRuntimeBackend
    from service.inference.openvino_backend import OpenVinoBackend, cpu_supports_bf16, openvino_available
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
