"""Writing synthetic cases to disk in the BraTS 2020 or MSD layout, with a manifest of their kinds.

``brats2020``: ``OUT/MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN/BraTS20_Training_NNN_{flair,t1,t1ce,
t2,seg}.nii.gz`` (images int16, seg uint8) and ``name_mapping.csv`` beside the case folders, as BraTS 2020
has it (columns ``Grade``, ``BraTS_2020_subject_ID``), with the synthetic case's ``Kind`` and volumes added.
``msd``: ``OUT/Task01_BrainTumour/imagesTr/BRATS_NNN.nii.gz`` (4D float32), ``labelsTr/BRATS_NNN.nii.gz``
(MSD labels), ``dataset.json`` and the same ``name_mapping.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.core.files import atomic_write
from service.core.labels import MODALITIES, brats_to_msd
from service.core.scoring import volumes_ml
from service.core.geometry import Geometry
from service.core.nifti_write import save_image, save_mask
from training.data.provenance import mark_synthetic
from training.data.synthetic.anatomy import case_seed, check_grid
from training.data.synthetic.cases import synthesize
from training.data.synthetic.tumours import kind_of_case

logger = logging.getLogger(__name__)

BRATS_DIR = "MICCAI_BraTS2020_TrainingData"
MSD_DIR = "Task01_BrainTumour"
LAYOUTS: tuple[str, ...] = ("brats2020", "msd")
NAME_MAPPING = "name_mapping.csv"
MANIFEST_FIELDS: tuple[str, ...] = ("BraTS_2020_subject_ID", "Grade", "Kind", "WT_ml", "TC_ml", "ET_ml")


def _update_manifest(path: Path, row: dict) -> None:
    """Add or replace ``row`` (by subject id) in the ``name_mapping.csv`` at ``path``, atomically, sorted."""
    rows = {}
    if path.is_file():
        with path.open(newline="") as fh:
            rows = {r["BraTS_2020_subject_ID"]: r for r in csv.DictReader(fh)}
    rows[row["BraTS_2020_subject_ID"]] = row
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=MANIFEST_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[k] for k in sorted(rows))
    atomic_write(path, out.getvalue())


def _write_brats_case(root: Path, name: str, image: np.ndarray, label: np.ndarray, geometry: Geometry) -> Path:
    """Write one case folder aside, then rename it into place (replacing an older case of the same name)."""
    final = root / name
    tmp = root / f".{name}.{uuid.uuid4().hex}.partial"
    tmp.mkdir()
    try:
        for m, modality in enumerate(MODALITIES):
            save_image(image[m], geometry, tmp / f"{name}_{modality}.nii.gz", dtype=np.int16)
        save_mask(label, geometry, tmp / f"{name}_seg.nii.gz")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_msd_case(root: Path, name: str, image: np.ndarray, label: np.ndarray, geometry: Geometry) -> Path:
    """Write the 4D image and the MSD label aside, then move them in, label first (cases are found by image)."""
    images, labels = root / "imagesTr", root / "labelsTr"
    tmp = root / f".{name}.{uuid.uuid4().hex}.partial"
    tmp.mkdir()
    try:
        save_image(image, geometry, tmp / "image.nii.gz")  # (4, X, Y, Z) stored as (X, Y, Z, 4) float32
        save_mask(brats_to_msd(label), geometry, tmp / "label.nii.gz")
        os.replace(tmp / "label.nii.gz", labels / f"{name}.nii.gz")
        os.replace(tmp / "image.nii.gz", images / f"{name}.nii.gz")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return images / f"{name}.nii.gz"


def _write_msd_dataset_json(root: Path) -> None:
    names = sorted(
        p.name
        for p in (root / "imagesTr").iterdir()
        if p.name.endswith(".nii.gz") and not p.name.startswith(".") and (root / "labelsTr" / p.name).exists()
    )
    meta = {
        "name": "BRATS",
        "description": "SYNTHETIC brain tumour cases (MNI152 anatomy, simulated gliomas), MSD Task01 layout",
        "reference": "synthetic: training/data/synthetic.py (no patient data)",
        "licence": "CC-BY-SA 4.0",
        "release": "synthetic",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(names),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
        "test": [],
    }
    atomic_write(root / "dataset.json", json.dumps(meta, indent=4) + "\n")


def generate_dataset(
    out_dir: Path | str,
    n_cases: int,
    *,
    seed: int = 0,
    layout: str = "brats2020",
    size: Sequence[int] = (240, 240, 155),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    start_index: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Write ``n_cases`` synthetic cases numbered from ``start_index`` in a BraTS 2020 or MSD layout.

    ``brats2020``: ``out_dir/MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN/BraTS20_Training_NNN_{flair,
    t1,t1ce,t2,seg}.nii.gz`` (images int16, seg uint8). ``msd``: ``out_dir/Task01_BrainTumour/imagesTr/
    BRATS_NNN.nii.gz`` (4D float32, FLAIR, T1w, T1gd, T2w), ``labelsTr/BRATS_NNN.nii.gz`` (MSD labels: 1 edema,
    2 non-enhancing/necrotic, 3 enhancing) and ``dataset.json`` listing every complete case in the folder.
    Both layouts get a ``name_mapping.csv`` beside the cases with each case's grade, kind and volumes (ml).

    Before any case, ``out_dir/SYNTHETIC.json`` is written (:func:`training.data.provenance.mark_synthetic`,
    with ``seed``, ``n_cases``, ``start_index``, ``size``, ``spacing`` and ``layout`` of this call), so even an
    interrupted run leaves data that says it is synthetic; ``preprocess`` carries the marker into the cache and
    the model card of a model trained on it says so.

    Case number ``i`` is made by :func:`~training.data.synthetic.cases.synthesize` with :func:`case_seed`
    ``(seed, i)`` and the kind :func:`~training.data.synthetic.tumours.kind_of_case` ``(seed, i)`` (every 20
    consecutive numbers hold the shares of ``KIND_DECK``), so it does not depend on
    ``n_cases`` or ``start_index``. Each case appears atomically (written aside, then renamed), so an
    interrupted run leaves only whole cases; an existing case of the same name is replaced.

    Returns:
        The case folders (``brats2020``) or the 4D image files (``msd``), in order.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)) or n_cases < 0:
        raise ValueError(f"n_cases must be a non-negative integer, got {n_cases!r}")
    if isinstance(start_index, bool) or not isinstance(start_index, (int, np.integer)) or start_index < 0:
        raise ValueError(f"start_index must be a non-negative integer, got {start_index!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    size_t, spacing_a = check_grid(size, spacing)

    out = Path(out_dir)
    mark_synthetic(
        out,
        seed=int(seed),
        n_cases=int(n_cases),
        start_index=int(start_index),
        size=list(size_t),
        spacing=[float(s) for s in spacing_a],
        layout=layout,
    )
    if layout == "brats2020":
        root = out / BRATS_DIR
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = out / MSD_DIR
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    written: list[Path] = []
    try:
        for index in tqdm(
            range(start_index, start_index + n_cases), disable=not progress, desc="synthetic cases", unit="case"
        ):
            case = synthesize(case_seed(seed, index), size=size_t, spacing=tuple(spacing_a),
                              kind=kind_of_case(seed, index))
            geometry = Geometry.from_affine(size_t, case.affine)
            if layout == "brats2020":
                name = f"BraTS20_Training_{index:03d}"
                written.append(_write_brats_case(root, name, case.image, case.label, geometry))
            else:
                name = f"BRATS_{index:03d}"
                written.append(_write_msd_case(root, name, case.image, case.label, geometry))
            volumes = volumes_ml(case.label, spacing_a)
            _update_manifest(root / NAME_MAPPING, {
                "BraTS_2020_subject_ID": name, "Grade": case.grade, "Kind": case.kind,
                **{f"{r}_ml": f"{volumes[r]:.3f}" for r in ("WT", "TC", "ET")},
            })
    finally:
        if layout == "msd":
            _write_msd_dataset_json(root)
    logger.info("wrote %d synthetic cases (%s) under %s", len(written), layout, root)
    return written
