"""Preprocess a dataset once into a cache that training reads with memory maps (as nnU-Net does).

For each case, ``cache_dir`` holds:

- ``CASE_image.npy``: the scan cropped to the brain's bounding box and z-scored (``service.core.preprocess``,
  the same code the service runs), ``(4, *cropped)`` float16 by default (half the disk and page cache of
  float32; z-scores keep about 3 significant digits);
- ``CASE_label.npy``: the label cropped the same way, ``(*cropped)`` uint8 in BraTS values (absent for a
  case without a label);
- ``CASE_locations.npz``: for each tumour label present (keys ``"1"``, ``"2"``, ``"4"``) up to
  ``max_locations`` voxel coordinates ``(N, 3)`` int32 in the cropped grid, drawn at random with a seed
  taken from the case id, for the sampler's foreground oversampling;
- ``CASE.json``: case id, bounding box, spacing, affine, original and cropped shapes, voxel counts per
  label, and the size and modification time of every source file.

and ``cases.json``, the index: the case ids of the last :func:`preprocess_dataset` call. :func:`load_cached` opens
exactly the indexed cases, so a cache folder reused for other data never trains on the cases of an earlier
run (their files stay on disk, ignored). The index is removed when a run starts and written when it ends, so
an interrupted run leaves a cache that asks to be preprocessed again.

Every file is written to a temporary name and renamed into place, the JSON last, so a case whose JSON
exists is complete. A case whose JSON records the same source sizes and modification times (and the same
cache format and dtype) is not processed again.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import zlib
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from service.core.datasets import Case, DataError, load_case
from service.core.files import atomic_write
from service.core.labels import TUMOUR_LABELS
from service.core.preprocess import preprocess
from training.data.manifest import CACHE_KINDS
from training.data.provenance import MARKER

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
DEFAULT_MAX_LOCATIONS = 10_000
INDEX = "cases.json"
"""The cache's index: ``{"format": CACHE_FORMAT, "cases": [case ids of the last preprocess_dataset call]}``."""
RERUN = "run `python -m training preprocess DATA CACHE` again"


@dataclass(frozen=True)
class CachedCase:
    """One preprocessed case, its arrays memory-mapped read-only.

    Attributes:
        case_id: The case id.
        image: ``(4, *cropped)`` float16 or float32 memory map (z-scored, cropped to the brain).
        label: ``(*cropped)`` uint8 memory map in BraTS values, or ``None``.
        locations: Tumour label -> ``(N, 3)`` int32 voxel coordinates in the cropped grid (labels that are
            absent from the case have no key).
        meta: The case's JSON record.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    locations: dict[int, np.ndarray] = field(repr=False)
    meta: dict = field(repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the cropped arrays."""
        return tuple(self.image.shape[1:])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel spacing in mm."""
        return tuple(self.meta["spacing"])

    @property
    def bbox(self) -> tuple[slice, ...]:
        """Where the cropped arrays lie in the original grid."""
        return tuple(slice(a, b) for a, b in self.meta["bbox"])


def _stamps(case: Case) -> list[dict]:
    stamps = []
    for path in case.files:
        try:
            st = Path(path).stat()
        except OSError as exc:
            raise DataError(f"{case.case_id}: cannot read the file: {exc} ({path})") from exc
        stamps.append({"name": Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return stamps


def _file_names(case_id: str) -> dict[str, str]:
    return {
        "json": f"{case_id}.json",
        "image": f"{case_id}_image.npy",
        "label": f"{case_id}_label.npy",
        "locations": f"{case_id}_locations.npz",
    }


def _up_to_date(cache_dir: Path, case: Case, stamps: list[dict], dtype: str, max_locations: int) -> bool:
    names = _file_names(case.case_id)
    try:
        meta = json.loads((cache_dir / names["json"]).read_text())
    except (OSError, ValueError):
        return False
    needed = [names["image"], names["locations"]] + ([names["label"]] if case.label is not None else [])
    return (
        meta.get("format") == CACHE_FORMAT
        and meta.get("dtype") == dtype
        and meta.get("max_locations") == max_locations
        and meta.get("label_format") == case.label_format
        and meta.get("source") == stamps
        and all((cache_dir / n).is_file() for n in needed)
    )


def _sample_locations(label: np.ndarray, case_id: str, max_locations: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    out = {}
    for value in TUMOUR_LABELS:
        coords = np.argwhere(label == value)
        if len(coords) == 0:
            continue
        if len(coords) > max_locations:
            coords = coords[np.sort(rng.choice(len(coords), size=max_locations, replace=False))]
        out[str(value)] = coords.astype(np.int32)
    return out


def _cache_case(case: Case, cache_dir: Path, dtype: str, max_locations: int) -> tuple[Path, bool]:
    """Cache one case; returns its JSON path and whether it was (re)processed."""
    names = _file_names(case.case_id)
    json_path = cache_dir / names["json"]
    stamps = _stamps(case)
    if _up_to_date(cache_dir, case, stamps, dtype, max_locations):
        return json_path, False

    image, label, geometry = load_case(case)
    pre = preprocess(image)
    del image
    bbox = tuple(pre.bbox)
    with np.errstate(over="ignore"):  # an overflow is reported below, with what to do about it
        data = pre.data.astype(dtype, copy=False)
    if dtype == "float16" and not np.all(np.isfinite(data)):
        raise DataError(
            f"{case.case_id}: some z-scored intensities are beyond the float16 range of the cache (|z| > 65504), "
            "so the scan holds extreme outlier voxels; check its image files, fix or remove the case, then "
            f"{RERUN} ({case.files[0].parent})"
        )
    atomic_write(cache_dir / names["image"], lambda f: np.save(f, data))
    del pre, data

    counts: dict[str, int] = {}
    locations: dict[str, np.ndarray] = {}
    if label is not None:
        label = np.ascontiguousarray(label[bbox], dtype=np.uint8)
        values, n = np.unique(label, return_counts=True)
        counts = {str(int(v)): int(c) for v, c in zip(values, n)}
        locations = _sample_locations(label, case.case_id, max_locations)
        atomic_write(cache_dir / names["label"], lambda f: np.save(f, label))
    else:
        (cache_dir / names["label"]).unlink(missing_ok=True)
    atomic_write(cache_dir / names["locations"], lambda f: np.savez(f, **locations))

    meta = {
        "format": CACHE_FORMAT,
        "case_id": case.case_id,
        "label_format": case.label_format,
        "has_label": label is not None,
        "dtype": dtype,
        "max_locations": max_locations,
        "full_shape": [int(s) for s in geometry.shape],
        "bbox": [[int(s.start), int(s.stop)] for s in bbox],
        "cropped_shape": [int(s.stop - s.start) for s in bbox],
        "spacing": [float(z) for z in geometry.zooms],
        "affine": np.asarray(geometry.affine, dtype=float).tolist(),
        "label_counts": counts,
        "files": {k: v for k, v in names.items() if k != "json" and (k != "label" or label is not None)},
        "source": stamps,
    }
    atomic_write(json_path, json.dumps(meta, indent=1))
    return json_path, True


def preprocess_dataset(
    cases: Sequence[Case],
    cache_dir: Path | str,
    *,
    progress: bool = True,
    workers: int = 1,
    dtype: str = "float16",
    max_locations: int = DEFAULT_MAX_LOCATIONS,
) -> list[Path]:
    """Crop, z-score and store every case in ``cache_dir`` (see the module docstring for the files).

    Args:
        cases: Cases from :func:`service.core.datasets.find_cases`; case ids must be unique.
        cache_dir: Output folder (created if needed).
        progress: Show a tqdm progress bar.
        workers: Processes to use; each holds one full case in memory (about 0.5 GB for BraTS).
        dtype: ``"float16"`` or ``"float32"`` for the stored image.
        max_locations: Most tumour voxel coordinates stored per label and case.

    Returns:
        The JSON path of each case, in the order of ``cases``; the index ``cases.json`` lists their ids.

    Raises:
        DataError: A case cannot be read (the message names the case and file), case ids repeat, or a case id
            would overwrite the index or the provenance marker.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    if max_locations < 1:
        raise ValueError(f"max_locations must be >= 1, got {max_locations!r}")
    ids = [c.case_id for c in cases]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise DataError(f"case ids must be unique; repeated: {repeated[:10]}")
    reserved = sorted(i for i in ids if f"{i}.json" in (INDEX, MARKER, CACHE_KINDS))
    if reserved:
        raise DataError(
            f"case ids {reserved} clash with the cache's own files {INDEX}, {MARKER} and {CACHE_KINDS}; rename them"
        )
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / INDEX).unlink(missing_ok=True)  # until this run completes, the cache holds no usable dataset

    results: dict[str, Path] = {}
    done = 0
    with tqdm(total=len(cases), desc="preprocess", unit="case", disable=not progress) as bar:
        if workers == 1 or len(cases) <= 1:
            for case in cases:
                results[case.case_id], fresh = _cache_case(case, cache_dir, dtype, max_locations)
                done += fresh
                bar.update()
        else:
            # spawn, not fork: the caller may hold torch/OpenMP threads, which a fork can deadlock.
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_cache_case, c, cache_dir, dtype, max_locations): c for c in cases}
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in finished:
                        if fut.exception() is not None:
                            for other in pending:
                                other.cancel()
                            raise fut.exception()
                        results[futures[fut].case_id], fresh = fut.result()
                        done += fresh
                        bar.update()
    atomic_write(cache_dir / INDEX, json.dumps({"format": CACHE_FORMAT, "cases": ids}, indent=1))
    logger.info("cached %d cases in %s (%d processed, %d up to date)", len(cases), cache_dir, done, len(cases) - done)
    return [results[i] for i in ids]


def _read_index(cache_dir: Path) -> list[str]:
    """The case ids listed in the cache's index."""
    path = cache_dir / INDEX
    if not path.is_file():
        raise DataError(
            f"no cached cases in {cache_dir} (no index {INDEX}: it was never preprocessed, or a preprocess run "
            f"did not finish); {RERUN}"
        )
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable cache index {path}: {exc}; {RERUN}") from exc
    if not isinstance(index, dict):
        index = {}
    ids = index.get("cases")
    if index.get("format") != CACHE_FORMAT or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{path} is not a cache index of format {CACHE_FORMAT}; {RERUN}")
    if not ids:
        raise DataError(f"no cached cases in {cache_dir} (its index lists none); {RERUN} on a folder with cases")
    return ids


def _load_one(cache_dir: Path, case_id: str) -> CachedCase:
    json_path = cache_dir / _file_names(case_id)["json"]
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{case_id}: incomplete cache: unreadable case record: {exc}; {RERUN} ({json_path})") from exc
    if not isinstance(meta, dict) or meta.get("case_id") != case_id:
        raise DataError(f"{case_id}: {json_path.name} is not this case's cache record; {RERUN} ({json_path})")
    if meta.get("format") != CACHE_FORMAT:
        raise DataError(
            f"{case_id}: cache format {meta.get('format')!r}, expected {CACHE_FORMAT}; {RERUN} ({json_path})"
        )
    files = meta.get("files", {})
    try:
        image = np.load(cache_dir / files["image"], mmap_mode="r")
        label = np.load(cache_dir / files["label"], mmap_mode="r") if "label" in files else None
        with np.load(cache_dir / files["locations"]) as npz:
            locations = {int(k): npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{case_id}: incomplete cache: {exc}; {RERUN} ({cache_dir})") from exc
    if image.ndim != 4 or (label is not None and label.shape != image.shape[1:]):
        raise DataError(
            f"{case_id}: cached image {image.shape} and label {None if label is None else label.shape} "
            f"do not match; {RERUN} ({cache_dir})"
        )
    return CachedCase(case_id=case_id, image=image, label=label, locations=locations, meta=meta)


def load_cached(cache_dir: Path | str, case_ids: Sequence[str] | None = None) -> list[CachedCase]:
    """Open the cases of the last :func:`preprocess_dataset` run into ``cache_dir`` (memory-mapped, read-only).

    Only the cases listed in the index ``cases.json`` are opened: files left in the folder by an earlier run on
    other data are ignored.

    Args:
        cache_dir: A folder written by :func:`preprocess_dataset` (``python -m training preprocess``).
        case_ids: Only these indexed cases, in this order (e.g. a training split); default all, sorted by id.

    Raises:
        DataError: The folder is missing or has no index (never preprocessed, or the run did not finish), a
            requested case is not in the index, or a case's files are incomplete; each message says to run
            ``python -m training preprocess DATA CACHE``.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise DataError(
            f"cache folder {cache_dir} does not exist; run `python -m training preprocess DATA CACHE` first"
        )
    indexed = _read_index(cache_dir)
    if case_ids is None:
        wanted = sorted(indexed)
    else:
        wanted = list(case_ids)
        known = set(indexed)
        missing = [c for c in wanted if c not in known]
        if missing:
            raise DataError(
                f"{len(missing)} requested cases are not cached in {cache_dir}: {missing[:10]}; "
                f"preprocess the data that holds them with `python -m training preprocess DATA CACHE`"
            )
    return [_load_one(cache_dir, c) for c in wanted]
