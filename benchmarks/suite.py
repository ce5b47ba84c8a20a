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
8. ``width``: time per window of the shipped ResU-Net and of a wide one (random weights), per CPU backend and
   precision, as a share of the peak.

``--quick`` runs every section on a small volume with few repetitions (a smoke test, not a measurement).
Writes ``bench.json`` and ``bench.md`` into ``--out`` and prints the tables; progress goes to stderr. The
exit status is 1 when a check fails (an fp32 row that does not match ONNX Runtime, a section that could not
run), 0 otherwise.

This module is the driver and the command line; the sections are in :mod:`benchmarks.sections_compute`
(peak, flops, scaling, width), :mod:`benchmarks.sections_engine` (engine) and :mod:`benchmarks.sections_service`
(e2e, memory, load), and what they share (the case, the context, the timing) in :mod:`benchmarks.harness`.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks import report
from benchmarks.harness import Context, Progress, make_input
from benchmarks.machine import library_versions, machine_info, usable_cores
from benchmarks.sections_compute import section_flops, section_peak, section_scaling, section_width
from benchmarks.sections_engine import section_engine
from benchmarks.sections_service import section_e2e, section_load, section_memory

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
        description="Benchmark suite: peak, engine vs PyTorch/MONAI, FLOPs, end to end, memory, load, scaling, "
        "network width.",
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
