"""Sections ``e2e``, ``memory`` and ``load`` of the benchmark suite (:mod:`benchmarks.suite`): a real service
(:mod:`benchmarks.serving`) sent the case as four ``.nii.gz`` parts."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks import report
from benchmarks.harness import E2E_MODEL, Context, median, model_paths

LOAD_CLIENTS = (1, 2, 4)
LOAD_MAX_QUEUE = 16


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
