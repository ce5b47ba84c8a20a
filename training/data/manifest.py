"""What kind of case each case is, from the ``name_mapping.csv`` that BraTS 2020 ships beside its cases.

BraTS 2020's ``name_mapping.csv`` has a ``Grade`` column (``HGG`` / ``LGG``) keyed by
``BraTS_2020_subject_ID``; the synthetic cohorts (:mod:`training.data.synthetic`) write the same file with a
``Kind`` column added (high-grade necrotic, low-grade, small, tumour-free, ...). Evaluation breaks its results
down by that kind, or by grade where there is no kind, and training stratifies its validation split by it:
``python -m training preprocess`` copies the kinds into the cache (:data:`CACHE_KINDS`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from service.core.files import atomic_write

NAME_MAPPING = "name_mapping.csv"
ID_COLUMN = "BraTS_2020_subject_ID"
CACHE_KINDS = "kinds.json"
"""The case kinds of a cache's dataset, beside its index (case id -> kind)."""


def read_case_kinds(root: str | Path) -> dict[str, str]:
    """Case id -> kind, from every ``name_mapping.csv`` in ``root`` or up to two folder levels below it.

    The kind is the ``Kind`` column where a file has one, else ``Grade``. Files without an id column, and
    rows with an empty kind, are skipped; a folder without such a file gives an empty mapping.
    """
    root = Path(root)
    paths = [root / NAME_MAPPING, *root.glob(f"*/{NAME_MAPPING}"), *root.glob(f"*/*/{NAME_MAPPING}")]
    kinds: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            continue
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            column = "Kind" if "Kind" in fields else "Grade" if "Grade" in fields else None
            if ID_COLUMN not in fields or column is None:
                continue
            for row in reader:
                case_id, kind = (row.get(ID_COLUMN) or "").strip(), (row.get(column) or "").strip()
                if case_id and kind:
                    kinds[case_id] = kind
    return kinds


def write_cache_kinds(data: str | Path, cache_dir: str | Path) -> dict[str, str]:
    """Copy the kinds of the dataset ``data`` (:func:`read_case_kinds`) into ``cache_dir``; none: no file."""
    kinds = read_case_kinds(data)
    path = Path(cache_dir) / CACHE_KINDS
    if kinds:
        atomic_write(path, json.dumps(kinds, indent=1, sort_keys=True).encode())
    else:
        path.unlink(missing_ok=True)
    return kinds


def read_cache_kinds(cache_dir: str | Path) -> dict[str, str]:
    """The case kinds a cache holds (empty when its dataset had no ``name_mapping.csv``)."""
    path = Path(cache_dir) / CACHE_KINDS
    return json.loads(path.read_text()) if path.is_file() else {}
