"""Where a dataset came from: synthetic data carries a marker that follows it into the cache and the card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MARKER = "SYNTHETIC.json"


def mark_synthetic(root: str | Path, **details) -> Path:
    """Write the marker saying that the data under ``root`` was generated, with how."""
    path = Path(root) / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    text = {"synthetic": True, "generator": "python -m training synth", **details}
    path.write_text(json.dumps(text, indent=2) + "\n")
    return path


def find_marker(data: str | Path) -> Path | None:
    """The synthetic-data marker in ``data`` or in one of its two parent folders, if there is one."""
    data = Path(data).resolve()
    for folder in (data, data.parent, data.parent.parent):
        if (folder / MARKER).is_file():
            return folder / MARKER
    return None


def carry_marker(data: str | Path, cache: str | Path) -> bool:
    """Copy the marker from a dataset into its cache; returns whether the data is synthetic."""
    marker = find_marker(data)
    if marker is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(marker, Path(cache) / MARKER)
    return marker is not None


def is_synthetic_cache(cache: str | Path) -> bool:
    """Whether a cache folder written by ``preprocess`` holds synthetic data."""
    return (Path(cache) / MARKER).is_file()
