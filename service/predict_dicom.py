"""DICOM studies for ``python -m service.predict``: a folder of studies in, a mask or a DICOM-SEG per study out.

A study is a subfolder of ``INPUT`` holding DICOM files at any depth, or a ``.zip`` of them directly in
``INPUT``; its name is the case id. Each is segmented like a DICOM upload (the four series picked by
``BRATS_SERIES_RULES``, :func:`service.inference.pipeline.segment_dicom`), in this process or by a service
(``--url``), and gives ``OUTPUT/CASE.nii.gz`` (the mask on the T1ce series' grid) or, with ``--dicom-seg``,
``OUTPUT/CASE_seg.dcm``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from service.core.files import atomic_write

__all__ = ["DicomStudy", "find_studies", "output_name", "segment_study"]


@dataclass(frozen=True)
class DicomStudy:
    """One study: its name (the case id) and its DICOM files or zip."""

    case_id: str
    files: tuple[Path, ...]
    label = None  # no ground truth: rows hold volumes only


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def find_studies(root: Path) -> list[DicomStudy]:
    """The DICOM studies directly under ``root``: subfolders holding DICOM files (any depth), and zips."""
    studies = []
    for entry in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if entry.is_file() and entry.name.lower().endswith(".zip"):
            studies.append(DicomStudy(entry.name[: -len(".zip")], (entry,)))
        elif entry.is_dir():
            files = tuple(p for p in sorted(entry.rglob("*")) if p.is_file() and _is_dicom(p))
            if files:
                studies.append(DicomStudy(entry.name, files))
    return studies


def output_name(case_id: str, dicom_seg: bool) -> str:
    return f"{case_id}_seg.dcm" if dicom_seg else f"{case_id}.nii.gz"


@dataclass(frozen=True)
class StudyOutcome:
    volumes: dict[str, float]
    seconds: float
    metrics: None = None


def segment_study(study: DicomStudy, out: Path, *, dicom_seg: bool, engine=None, model: str = "",
                  client=None, tta: bool = False, postprocess: bool = True) -> StudyOutcome:
    """Segment one study in process (``engine``) or through a service (``client``) and write its output
    atomically; returns the volumes for ``results.csv``."""
    start = time.perf_counter()
    encode = "dicom-seg" if dicom_seg else "nifti"
    if client is not None:
        from service.client import segment_when_free

        result = segment_when_free(client, dicom=list(study.files), model=model, tta=tta, postprocess=postprocess,
                                   format=encode)
        mask, volumes = result.mask, result.summary["volumes_ml"]
    else:
        from service.core.series_rules import load_rules
        from service.inference.pipeline import segment_dicom

        rules = load_rules(os.environ.get("BRATS_SERIES_RULES") or None)
        outcome = segment_dicom(list(study.files), engine, rules, tta=tta, postprocess=postprocess, encode=encode,
                                model=model, software_version="service.predict")
        mask, volumes = outcome.mask, outcome.volumes_ml
    atomic_write(out, mask)
    return StudyOutcome(volumes, time.perf_counter() - start)
