"""Markdown tables of a benchmark run (``bench.md``), from the dictionary written to ``bench.json``.

Numbers are rounded for reading: milliseconds to three significant figures or so, GFLOP/s to a whole
number above 100, differences in scientific notation, Dice to four decimals; ``bench.json`` keeps them all.
"""

from __future__ import annotations

from typing import Any, Sequence

DASH = "–"
REGIONS = ("WT", "TC", "ET")


def ms(value: float | None) -> str:
    if value is None:
        return DASH
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def gflops(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def pct(value: float | None) -> str:
    return DASH if value is None else f"{value:.1f}%"


def ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}x"


def sci(value: float | None) -> str:
    if value is None:
        return DASH
    return "0" if value == 0 else f"{value:.1e}"


def dice(values: dict[str, float] | None) -> str:
    if not values:
        return DASH
    return " / ".join(f"{values[r]:.4f}" for r in REGIONS)


def above(row: dict[str, Any]) -> str:
    count = row.get("voxels_above_tolerance")
    if count is None:
        return DASH
    return f"{count:,} ({row['fraction_above_tolerance']:.0e})" if count else "0"


def mib(value: float | None) -> str:
    return DASH if value is None else f"{value / 2**20:,.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ sections
def _machine(results: dict[str, Any]) -> str:
    m = results["machine"]
    flags = ", ".join(f for f, present in m["cpu"]["flags"].items() if present) or "none of interest"
    gpu = m.get("gpu")
    gpu_text = f"{gpu['name']} ({gpu['memory_bytes'] / 2**30:.0f} GiB, CUDA {gpu['cuda']})" if gpu else "none"
    rows = [
        ("CPU", m["cpu"]["model"]),
        ("cores usable", m["cores_usable"]),
        ("memory", f"{m['memory_bytes'] / 2**30:.1f} GiB" if m.get("memory_bytes") else DASH),
        ("CPU flags", flags),
        ("GPU", gpu_text),
        ("ONNX Runtime providers", ", ".join(m["onnxruntime_providers"])),
        ("OpenVINO CPU capabilities", ", ".join(m["openvino_cpu_capabilities"] or []) or DASH),
        ("load average at start (1, 5, 15 min)", ", ".join(f"{x:.2f}" for x in m["load_average_at_start"])),
        ("GLIBC_TUNABLES", m.get("glibc_tunables") or "unset"),
        ("OS", m["os"]),
    ]
    return table(["machine", ""], rows)


def _versions(results: dict[str, Any]) -> str:
    return table(["library", "version"], list(results["versions"].items()))


def _peak(section: dict[str, Any]) -> str:
    rows = [(r["device"], r["precision"], r["library"], ms(r["ms"]), gflops(r["gflops"])) for r in section["rows"]]
    peaks = ", ".join(f"{k} {gflops(v)}" for k, v in section["peak_gflops"].items())
    return (
        f"{section['size']} x {section['size']} matmul ({section['flop_per_matmul'] / 1e9:.0f} GFLOP), "
        f"torch threads {section['torch_threads']}. Peak used below (the higher library per precision): {peaks} "
        "GFLOP/s.\n\n" + table(["device", "precision", "library", "ms", "GFLOP/s"], rows)
    )


def _flops(section: dict[str, Any]) -> str:
    rows = []
    for name, m in section["models"].items():
        by_op = m["by_op"]
        rows.append((
            name,
            "x".join(map(str, m["window"])),
            f"{m['flops_per_window'] / 1e9:.3f}",
            f"{by_op.get('Convolution', 0) / 1e9:.3f}",
            f"{by_op.get('ConvolutionBackpropData', 0) / 1e9:.3f}",
            ", ".join(f"{k} {v}" for k, v in m["ops"].items()),
            "equal" if m["onnx_graph_flops"] == m["flops_per_window"] else f"{m['onnx_graph_flops'] / 1e9:.3f}",
            f"{m['parameters']:,}" if m.get("parameters") else DASH,
        ))
    method = next(iter(section["models"].values()))["method"] if section["models"] else ""
    return (
        f"One multiply-add = 2 FLOPs; convolutions and transposed convolutions (and matrix products, none here); "
        f"bias, normalisation and activations not counted. Counted from the {method}, cross-checked on the ONNX "
        "graph with shape inference.\n\n"
        + table(["model", "window", "GFLOP/window", "conv", "transposed conv", "ops counted", "ONNX-graph count",
                 "parameters"], rows)
    )


def _engine(section: dict[str, Any]) -> str:
    parts = [
        f"Brain crop {'x'.join(map(str, section['crop_shape'][1:]))} ({section['crop_shape'][0]} channels), "
        f"overlap {section['overlap']}, Gaussian blending (sigma {section['gaussian_sigma_scale']} of the window), "
        f"same weights in every row. PyTorch: {section['torch_threads']} threads, allocator: {section['allocator']} "
        "(PyTorch eager on the CPU is markedly faster with `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:"
        "glibc.malloc.trim_threshold=68719476736`, not used here). MONAI places its windows with a fixed step and "
        "moves the last one back to the border (the engine spreads them evenly, as nnU-Net) and floors its Gaussian "
        "weights at 1e-3, which changes the blend near the volume's borders, so its probabilities differ by "
        "construction; its masks are compared by Dice. "
        "GFLOP/s: model FLOPs of the windows run over the whole-case time; % of the same-precision peak of section 1."
    ]
    tolerances = section.get("tolerances", {})
    tol = tolerances.get("fp32_probability", 1e-3)
    if tolerances:
        parts.append(
            f"Checks: an fp32 row running the same windows as (a) must have at most a fraction "
            f"{tolerances['fp32_fraction_above']:g} of its probabilities more than {tol:g} from (a)'s and none more "
            f"than {tolerances['fp32_max_abs']:g} away (so must MONAI given the engine's windows and weights); "
            f"MONAI's own masks a Dice of at least {tolerances['monai_min_dice']:g} per region; PyTorch's logits on "
            f"one window within {tolerances['torch_logits']:g} x the largest logit of ONNX Runtime's. The last "
            "column is each runtime's distance from a float64 evaluation of the same network (PyTorch) on the "
            "centre window: how much of a difference is whose rounding."
        )
    for name, m in section["models"].items():
        rows = []
        for r in m["rows"]:
            rows.append((
                r["id"], r["runtime"], r["device"], r["precision"], r["windows"] if r["windows"] is not None else DASH,
                ms(r["ms"]), ratio(r.get("speedup_vs_monai")), gflops(r.get("gflops")), pct(r.get("pct_of_peak")),
                sci(r.get("max_abs_diff")), above(r), dice(r.get("dice")),
                sci((r.get("window_vs_float64") or {}).get("max_abs_prob_diff")),
            ))
        parity = "; ".join(
            f"{dev}: max abs logit difference {sci(p['max_abs_logit_diff'])} (largest logit {p['max_abs_logit']:.1f})"
            for dev, p in m["torch_vs_onnxruntime_logits"].items()
        ) or DASH
        recovered = m["weights_recovered_from_graph"]
        rec = (f"{len(recovered)} tensors deduplicated by the exporter recovered from the graph "
               f"({', '.join(sorted(recovered))})" if recovered else "every weight is an initializer of its own name")
        same = m.get("monai_same_windows")
        same_text = (
            f" MONAI given the engine's weights (`roi_weight_map`) on a {'x'.join(map(str, same['crop']))} crop, "
            f"where both place the {same['windows']} windows alike, vs the engine: max abs diff "
            f"{sci(same['max_abs_diff'])}, values > {tol:g}: {above(same)}, Dice {dice(same['dice'])}."
            if same else ""
        )
        parts.append(
            f"**{name}** ({m['flops_per_window'] / 1e9:.2f} GFLOP per window). PyTorch vs ONNX Runtime on one window: "
            f"{parity}. Weights: {rec}; loaded with strict=True.{same_text}\n\n"
            + table(["row", "runtime", "device", "precision", "windows", "ms per case", "speed-up over MONAI",
                     "GFLOP/s", "% of peak", "max abs diff vs (a)", f"values > {tol} vs (a)",
                     "Dice vs (a) WT / TC / ET", "max abs diff vs float64, one window"], rows)
        )
    return "\n\n".join(parts)


def _e2e(section: dict[str, Any]) -> str:
    formats = section["formats"]
    rows = []
    for fmt, f in formats.items():
        t = f["timing_ms"]
        rows.append((fmt, ms(f["latency_ms"]), ms(t.get("total")), ms(t.get("inference")),
                     pct(100 * f["outside_share"]), f"{f['response_bytes'] / 1024:,.0f}"))
    head = (
        f"Model `{section['model']}`, case {'x'.join(map(str, section['shape']))} posted as four .nii.gz parts "
        f"({section['parts_dtype']}, {section['upload_bytes'] / 2**20:.1f} MiB together); service settings: "
        f"{section['settings']}; started in {section['startup_s']:.1f} s. Client latency: POST to the last byte "
        "of the answer. Outside share: 1 - timing_ms.inference / client latency.\n\n"
        + table(["format", "client latency ms", "server total ms", "inference ms", "outside model execution",
                 "answer KiB"], rows)
    )
    labels = {
        "upload": "upload (receive and spool the body, wait for a slot)",
        "decode": "decode the NIfTI parts",
        "preprocess": "preprocess (crop, z-score)",
        "inference": "model execution",
        "postprocess": "postprocess + encode (labels, uncrop, volumes, .nii.gz)",
        "rest": "rest (HTTP, routing, answer encoding, client)",
    }
    part_rows = []
    for key, label in labels.items():
        part_rows.append((label, *[f"{ms(f['parts_ms'][key])} ({pct(100 * f['parts_share'][key])})"
                                   for f in formats.values()]))
    return head + "\n\nWhere the time goes (median ms, share of the client latency):\n\n" + table(
        ["part", *formats.keys()], part_rows)


def _memory(section: dict[str, Any]) -> str:
    rows = [(r["model"], f"{r['startup_s']:.1f}", mib(r["rss_after_startup"]), mib(r["peak_after_startup"]),
             mib(r["peak_rss"]), mib(r["rss_after_request"]), ms(r["latency_ms"])) for r in section["rows"]]
    return (
        f"One fresh `python -m service` process per row (default settings), one request "
        f"({'x'.join(map(str, section['shape']))}, format={section['format']}); VmRSS and VmHWM from /proc. "
        "Every process loads all models at start-up.\n\n"
        + table(["model", "start-up s", "RSS after start-up MiB", "peak at start-up MiB",
                 "peak RSS after one request MiB", "RSS after the request MiB", "request ms"], rows)
    )


def _load(section: dict[str, Any]) -> str:
    rows = [(lv["clients"], lv["requests"], lv["ok"], f"{lv['throughput_rps']:.3f}", ms(lv["p50_ms"]),
             ms(lv["p95_ms"]), f"{lv['wall_s']:.1f}") for lv in section["levels"]]
    return (
        f"One service ({section['settings']}), model `{section['model']}`, format={section['format']}, "
        "one connection per client on loopback, a fixed number of requests per level (p95 of a few requests is "
        "close to the maximum).\n\n"
        + table(["clients", "requests", "ok", "requests/s", "p50 ms", "p95 ms", "wall s"], rows)
    )


def _scaling(section: dict[str, Any]) -> str:
    rows = []
    for r in section["rows"]:
        rows.append((
            r["group"], r["variant"] + (" *" if r["default"] else ""), "x".join(map(str, r["shape"])), r["overlap"],
            r["batch"], r["windows"], ms(r["ms"]), ms(r["ms_per_window"]), ratio(r["relative_to_default"]),
            gflops(r.get("gflops")), dice(r.get("dice")), sci(r.get("max_abs_diff")),
        ))
    return (
        f"Model `{section['model']}` on the default backend ({section['provider']}, {section['precision']}); "
        "* = the default (full crop, overlap 0.5, one window per call). Dice and max abs difference against the "
        "default where the volume is the same.\n\n"
        + table(["group", "variant", "volume", "overlap", "batch", "windows", "ms", "ms per window", "vs default",
                 "GFLOP/s", "Dice vs default WT / TC / ET", "max abs diff"], rows)
    )


def _summary(results: dict[str, Any]) -> str:
    sections = results["sections"]
    out = []
    engine = sections.get("engine")
    if engine:
        columns: list[str] = []
        for m in engine["models"].values():
            for r in m["rows"]:
                label = f"({r['id']}) {r['runtime'].replace('engine, ', '')} {r['precision']}"
                if label not in columns:
                    columns.append(label)
        rows = []
        for name, m in engine["models"].items():
            by_label = {f"({r['id']}) {r['runtime'].replace('engine, ', '')} {r['precision']}": r for r in m["rows"]}
            best = max((r for r in m["rows"] if r.get("speedup_vs_monai")), key=lambda r: r["speedup_vs_monai"],
                       default=None)
            rows.append((name, *[ms(by_label[c]["ms"]) if c in by_label else DASH for c in columns],
                         f"{ratio(best['speedup_vs_monai'])} ({best['id']})" if best else DASH))
        out.append("Whole-case model execution, ms (median):\n\n"
                   + table(["model", *columns, "best speed-up over MONAI"], rows))
    facts = []
    peak = sections.get("peak")
    if peak:
        facts += [(f"dense peak {k}", f"{gflops(v)} GFLOP/s") for k, v in peak["peak_gflops"].items()]
    e2e = sections.get("e2e")
    if e2e:
        for fmt, f in e2e["formats"].items():
            facts.append((f"end to end {e2e['model']} format={fmt}",
                          f"{ms(f['latency_ms'])} ms, {pct(100 * f['outside_share'])} outside model execution"))
    memory = sections.get("memory")
    if memory:
        facts += [(f"service peak RSS, {r['model']}", f"{mib(r['peak_rss'])} MiB (after start-up "
                                                        f"{mib(r['rss_after_startup'])} MiB)")
                  for r in memory["rows"]]
    load = sections.get("load")
    if load:
        facts += [(f"load, {lv['clients']} client(s)", f"{lv['throughput_rps']:.3f} req/s, p50 {ms(lv['p50_ms'])} ms")
                  for lv in load["levels"]]
    if facts:
        out.append(table(["figure", "value"], facts))
    failures = results.get("failures") or []
    out.append("Checks: " + ("all passed." if not failures else "FAILED:\n\n" + "\n".join(f"- {f}" for f in failures)))
    return "\n\n".join(out)


def _width(section: dict[str, Any]) -> str:
    rows = [(r["network"], r["channels"], "x".join(map(str, r["window"])), r["backend"], r["precision"],
             f"{r['gflop_per_window']:.1f}", ms(r["ms"]), gflops(r["gflops"]), pct(r["pct_of_peak"]))
            for r in section["rows"]]
    return (
        "One window (batch 1) on each CPU backend, median after a warm-up; GFLOP/s from the analytic count of "
        "section 3; % of the same-precision dense peak of section 1. The wide network has random weights: only "
        "its speed is measured.\n\n"
        + table(["network", "channels", "window", "backend", "precision", "GFLOP/window", "ms", "GFLOP/s",
                 "% of peak"], rows)
    )


RENDER = {
    "peak": _peak,
    "engine": _engine,
    "flops": _flops,
    "e2e": _e2e,
    "memory": _memory,
    "load": _load,
    "scaling": _scaling,
    "width": _width,
}


def markdown(results: dict[str, Any]) -> str:
    from benchmarks.suite import SECTION_TITLES

    case = results["case"]
    head = [
        "# Benchmarks",
        f"Command: `{results['command']}`  \nStarted {results['started']}, wall time {results['wall_s']:.0f} s"
        + (" (--quick: a smoke test on a small volume, not a measurement)" if results["quick"] else "")
        + f".  \nEvery figure: median of {results['reps']} repetitions, interleaved between the rows compared, "
        f"after a warm-up: {results['warm_up']}.  \nInput: {case['generator']}, "
        f"{'x'.join(map(str, case['shape'][1:]))} x {case['shape'][0]} modalities, spacing "
        f"{'x'.join(map(str, case['spacing_mm']))} mm; brain crop {'x'.join(map(str, case['crop_shape'][1:]))}.",
        "## Machine\n\n" + _machine(results),
        "## Versions\n\n" + _versions(results),
    ]
    # in the numbering of the sections, whatever order they ran in
    for key in sorted(results["sections"], key=lambda k: SECTION_TITLES[k]):
        loads = results.get("load_average", {}).get(key)
        note = f"\n\n_Section wall time {results['section_wall_s'][key]:.0f} s; load average after it " \
               f"{loads[0]:.2f}._" if loads else ""
        head.append(f"## {SECTION_TITLES[key]}\n\n{RENDER[key](results['sections'][key])}{note}")
    head.append("## Summary\n\n" + _summary(results))
    return "\n\n".join(head) + "\n"
