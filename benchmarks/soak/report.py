"""The soak test's results: the :class:`Report` (``soak.json``), the pass criteria, and the tables of ``soak.md``."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import machine_info
from benchmarks.soak.requester import KIND_BY_NAME, KINDS

RSS_TOLERANCE = 0.10
"""The resident memory at the end may exceed the one after the warm-up by at most this fraction."""


@dataclass
class Report:
    """Everything the run measured (``soak.json``)."""

    command: str
    started: str
    settings: dict[str, Any]
    machine: dict[str, Any]
    libraries: dict[str, str]
    reference: dict[str, Any] = field(default_factory=dict)
    load_s: float = 0.0
    wall_s: float = 0.0
    answers: dict[str, dict[str, int]] = field(default_factory=dict)
    latency_s: dict[str, dict[str, float]] = field(default_factory=dict)
    correct_200: int = 0
    incorrect_200: int = 0
    server_errors: int = 0
    unexpected: int = 0
    unexpected_by_kind: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    drain: dict[str, Any] = field(default_factory=dict)
    final_request: str = ""
    resources: dict[str, dict[str, int]] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    server_statuses: dict[str, int] = field(default_factory=dict)
    server_stop: dict[str, Any] = field(default_factory=dict)
    criteria: list[dict[str, Any]] = field(default_factory=list)
    passed: bool = False


def soak_machine() -> dict[str, Any]:
    """The machine (:func:`benchmarks.machine.machine_info`) with the figures the soak report prints."""
    info = machine_info()
    info.update({"cores": os.cpu_count(), "accelerator": "none used (BRATS_PROVIDERS=CPUExecutionProvider)",
                 "load_average_at_start": os.getloadavg()[0]})
    return info


def percentiles(values: list[float]) -> dict[str, float | None]:
    """``n``, median and 95th percentile of ``values`` (``None`` when there are none)."""
    if not values:
        return {"n": 0, "p50": None, "p95": None}
    array = np.asarray(values)
    return {"n": len(values), "p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95))}


# ------------------------------------------------------------------------------------------ the criteria
def _criterion(name: str, measured: str, ok: bool) -> dict[str, Any]:
    return {"criterion": name, "measured": measured, "result": "PASS" if ok else "FAIL"}


def judge(report: Report) -> None:
    """Fill ``report.criteria`` and ``report.passed``."""
    total = sum(sum(c.values()) for c in report.answers.values())
    warm, end = report.resources.get("warm_up", {}), report.resources.get("end", {})
    criteria = [
        _criterion("every answer is the expected one (or 503 with Retry-After)",
                   f"{report.unexpected} unexpected of {total}", report.unexpected == 0),
        _criterion("no 5xx other than 503 with Retry-After", f"{report.server_errors}", report.server_errors == 0),
        _criterion(
            "every 200 carries the reference mask",
            f"{report.correct_200} of {report.correct_200 + report.incorrect_200} identical; final request: "
            f"{report.final_request}",
            report.incorrect_200 == 0 and report.correct_200 > 0 and report.final_request == "200, identical",
        ),
        _criterion(
            "the service drains after the load",
            (f"idle after {report.drain['seconds']:.1f} s" if report.drain.get("drained")
             else f"still {report.drain.get('running')} running, {report.drain.get('waiting')} waiting after "
                  f"{report.drain.get('seconds', 0):.0f} s"),
            bool(report.drain.get("drained")),
        ),
    ]
    if warm and end:
        change = end["rss"] / warm["rss"] - 1.0
        criteria.append(_criterion(
            f"RSS at the end at most {RSS_TOLERANCE:.0%} above warm-up",
            f"{warm['rss'] / 2**20:.1f} -> {end['rss'] / 2**20:.1f} MiB ({change:+.1%})",
            end["rss"] <= warm["rss"] * (1.0 + RSS_TOLERANCE),
        ))
        criteria.append(_criterion(
            "open FDs at the end not above warm-up", f"{warm['fds']} -> {end['fds']}", end["fds"] <= warm["fds"],
        ))
    else:
        criteria.append(_criterion("resources measured", "the service was gone", False))
    criteria.append(_criterion("nothing left in BRATS_TMP_DIR", f"{len(report.leftovers)} entries",
                               not report.leftovers))
    report.criteria = criteria
    report.passed = all(c["result"] == "PASS" for c in criteria)


# ------------------------------------------------------------------------------------------ output
def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def markdown(report: Report) -> str:
    """The tables of ``soak.md``: answers per kind, latency, resources, criteria."""
    s, ref = report.settings, report.reference
    runs_on = ", ".join(str(x) for x in (ref.get("provider"), ref.get("precision")) if x)
    lines = [
        f"Soak run of {report.load_s:.0f} s: {s['clients']} clients, BRATS_MAX_CONCURRENT={s['max_concurrent']}, "
        f"BRATS_MAX_QUEUE={s['max_queue']}, model {ref.get('model')} ({runs_on}), scan "
        f"{'x'.join(map(str, s['shape']))} voxels; {report.machine['cpu']['model']}, {report.machine['cores']} cores, "
        "no GPU.",
        "",
        "| request kind | sent | expected | answers | unexpected |",
        "|---|---:|---|---|---:|",
    ]
    grand = Counter()
    for kind in KINDS:
        counts = report.answers.get(kind.name, {})
        grand.update(counts)
        if kind.group == "abandoned":
            expected = "none; 200 or 503 if it comes first"
        else:
            expected = f"{'/'.join(map(str, kind.expected))} or 503"
        shown = ", ".join(f"{a}: {n}" for a, n in sorted(counts.items())) or "-"
        lines.append(f"| {kind.label} | {sum(counts.values())} | {expected} | {shown} | "
                     f"{report.unexpected_by_kind.get(kind.name, 0)} |")
    shown = ", ".join(f"{a}: {n}" for a, n in sorted(grand.items()))
    lines.append(f"| **all** | {sum(grand.values())} | | {shown} | {report.unexpected} |")
    lines += ["", "| latency of valid 200s (client side) | n | p50 (s) | p95 (s) |", "|---|---:|---:|---:|"]
    for name, figures in report.latency_s.items():
        label = KIND_BY_NAME[name].label if name in KIND_BY_NAME else name
        p50, p95 = (("-" if v is None else f"{v:.2f}") for v in (figures["p50"], figures["p95"]))
        lines.append(f"| {label} | {figures['n']} | {p50} | {p95} |")
    warm, end = report.resources.get("warm_up", {}), report.resources.get("end", {})
    lines += [
        "",
        "| server process | after warm-up | at the end |",
        "|---|---:|---:|",
        f"| RSS (MiB) | {mib(warm.get('rss'))} | {mib(end.get('rss'))} |",
        f"| peak RSS, VmHWM (MiB) | {mib(warm.get('peak_rss'))} | {mib(end.get('peak_rss'))} |",
        f"| open file descriptors | {warm.get('fds', '-')} | {end.get('fds', '-')} |",
        f"| entries left in BRATS_TMP_DIR | | {len(report.leftovers)} |",
        "",
        "| criterion | measured | result |",
        "|---|---|---|",
    ]
    lines += [f"| {c['criterion']} | {c['measured']} | {c['result']} |" for c in report.criteria]
    if report.server_statuses:
        shown = ", ".join(f"{status}: {n}" for status, n in report.server_statuses.items())
        lines += ["", f"The service's own count of POST /segment by status (`/metrics`; reference, warm-up and "
                      f"final request included; 499: the client left before its answer): {shown}."]
    overall = f"Overall: {'PASS' if report.passed else 'FAIL'}."
    stop = report.server_stop
    if stop:
        how = "was killed (no exit within 15 s of SIGTERM)" if stop["killed"] else "stopped on SIGTERM"
        overall += f" The service {how} in {stop['seconds']:.1f} s."
    lines += ["", overall]
    return "\n".join(lines) + "\n"


def write_outputs(report: Report, out: Path) -> None:
    """``soak.json`` and ``soak.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report.__dict__, indent=2, default=str) + "\n")
    (out / "soak.md").write_text(markdown(report))
