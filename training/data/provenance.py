"""Where a dataset came from: synthetic data carries a marker that follows it into the cache and the card.

:func:`training.data.synthetic.generate_dataset` writes ``SYNTHETIC.json`` into the folder it fills; the
``preprocess`` step copies it into the cache (:func:`carry_marker`), and ``train`` reads it from there to say
in the model card that the model saw only synthetic data (SPEC section 3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from service.core.files import atomic_path, atomic_write

MARKER = "SYNTHETIC.json"


def mark_synthetic(root: str | Path, **details) -> Path:
    """Write (atomically) the marker saying that the data under ``root`` was generated, with ``details`` of how."""
    path = Path(root) / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"synthetic": True, "generator": "training.data.synthetic (python -m training synth)", **details}
    atomic_write(path, json.dumps(record, indent=2) + "\n")
    return path


def find_marker(data: str | Path) -> Path | None:
    """The synthetic-data marker in ``data`` or in its direct parent, if there is one.

    The parent counts because the generator marks the folder it was given, which holds the layout's top folder
    (``MICCAI_BraTS2020_TrainingData`` or ``Task01_BrainTumour``) that a user may point at instead.
    """
    data = Path(data).resolve()
    for folder in (data, data.parent):
        if (folder / MARKER).is_file():
            return folder / MARKER
    return None


def carry_marker(data: str | Path, cache: str | Path) -> bool:
    """Make the cache's marker match the dataset: copy it when the data is synthetic, else remove a stale one.

    Returns:
        Whether the data is synthetic.
    """
    marker = find_marker(data)
    target = Path(cache) / MARKER
    if marker is None:
        target.unlink(missing_ok=True)  # the cache may have held synthetic data before
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(marker, tmp)
    return True


def is_synthetic_cache(cache: str | Path) -> bool:
    """Whether a cache folder written by ``preprocess`` holds synthetic data."""
    return (Path(cache) / MARKER).is_file()
