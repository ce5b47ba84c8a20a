"""Markdown tables of evaluation summaries, for docs/models.md: ``python scripts/models_table.py NAME=SOURCE ...``.

Each ``SOURCE`` is an ``evaluate --out`` folder (its ``summary.json``) or a model card ``NAME.json`` (its
``validation``, written by ``evaluate --update-card``); ``NAME`` labels its rows. Prints the
overall table (Dice, HD95 and lesion-wise Dice per region, false positives on tumour-free brains), the
table per case kind, and the targets of the demo models with whether each summary meets them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REGIONS = ("WT", "TC", "ET")
TARGETS = {"dice_WT": 0.90, "dice_TC": 0.85, "dice_ET": 0.80, "fp_median_ml": 1.0, "hd95_WT": 15.0}


def _f(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def overall(runs: dict[str, dict]) -> str:
    lines = ["| model | cases | Dice WT | Dice TC | Dice ET | HD95 WT | HD95 TC | HD95 ET | lesion Dice WT | "
             "lesion Dice TC | lesion Dice ET | tumour-free: median / max ml marked |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in runs.items():
        fp = s["tumour_free"]["false_positive_ml"] or {}
        lines.append("| " + " | ".join([
            name, str(s["cases"]), *(_f(s["dice"][r], 3) for r in REGIONS), *(_f(s["hd95_mm"][r], 1) for r in REGIONS),
            *(_f(s["lesionwise"]["dice"][r], 3) for r in REGIONS),
            f"{_f(fp.get('median'), 2)} / {_f(fp.get('max'), 2)} ({s['tumour_free']['cases']} cases)",
        ]) + " |")
    return "\n".join(lines)


def by_kind(runs: dict[str, dict]) -> str:
    lines = ["| model | kind | cases | Dice WT | Dice TC | Dice ET | HD95 WT | lesion Dice WT | lesion Dice ET |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in runs.items():
        for kind, k in s["by_kind"].items():
            lines.append("| " + " | ".join([
                name, kind, str(k["cases"]), *(_f(k["dice"][r], 3) for r in REGIONS), _f(k["hd95_mm"]["WT"], 1),
                _f(k["lesionwise_dice"]["WT"], 3), _f(k["lesionwise_dice"]["ET"], 3),
            ]) + " |")
    return "\n".join(lines)


def targets(runs: dict[str, dict]) -> str:
    lines = ["| model | Dice WT >= 0.90 | Dice TC >= 0.85 | Dice ET >= 0.80 | median ml on tumour-free <= 1 | "
             "HD95 WT <= 15 mm |", "|---|---|---|---|---|---|"]
    for name, s in runs.items():
        fp = (s["tumour_free"]["false_positive_ml"] or {}).get("median")
        values = [(s["dice"]["WT"], TARGETS["dice_WT"], ">="), (s["dice"]["TC"], TARGETS["dice_TC"], ">="),
                  (s["dice"]["ET"], TARGETS["dice_ET"], ">="), (fp, TARGETS["fp_median_ml"], "<="),
                  (s["hd95_mm"]["WT"], TARGETS["hd95_WT"], "<=")]
        cells = []
        for value, target, sense in values:
            met = value is not None and (value >= target if sense == ">=" else value <= target)
            cells.append(f"{_f(value, 3 if target < 2 else 1)} {'met' if met else 'NOT met'}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    runs = {}
    for arg in argv:
        name, source = arg.split("=", 1)
        path = Path(source)
        if path.is_file() and path.suffix == ".json":  # a model card
            runs[name] = json.loads(path.read_text())["validation"]
            continue
        path = path / "summary.json"
        if not path.is_file():
            print(f"error: {path} not found; run `python -m training evaluate --out {source}` first", file=sys.stderr)
            return 2
        runs[name] = json.loads(path.read_text())
    print(overall(runs), "", by_kind(runs), "", targets(runs), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
