"""The files of one BraTS case folder, found the same way by the client and the training readers.

A case folder holds ``CASE_{flair,t1,t1ce,t2}.nii[.gz]`` and, in training data, ``CASE_seg.nii[.gz]``
(``BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz``). The case id is the folder's name, or, for a
renamed folder, the prefix of its one ``*_flair`` file. BraTS 2020 case 355 names its label
``W39_1998.09.19_Segm.nii``: a single ``*Segm.nii[.gz]`` file is taken as the label when there is no
``CASE_seg``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

from service.core.labels import MODALITIES

__all__ = ["CaseFiles", "CaseFolderError", "find_case_files", "nifti_in", "nifti_stem"]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SEGM_QUIRK_RE = re.compile(r"^[^.].*Segm\.nii(\.gz)?$")


class CaseFolderError(ValueError):
    """A case folder lacks a modality or holds a file twice; the message says which and where."""


class CaseFiles(NamedTuple):
    """A case's files: its id, ``{modality: path}`` in ``MODALITIES`` order, and the label or ``None``."""

    case_id: str
    images: dict[str, Path]
    label: Path | None


def nifti_stem(path: Path) -> str | None:
    """The name without ``.nii``/``.nii.gz`` (any case), or ``None`` if the name has neither."""
    lower = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def nifti_in(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii`` or ``folder/stem.nii.gz``; ``None`` if neither.

    Raises:
        CaseFolderError: both exist.
    """
    present = [folder / f"{stem}{ext}" for ext in (".nii", ".nii.gz") if (folder / f"{stem}{ext}").is_file()]
    if len(present) > 1:
        raise CaseFolderError(f"{folder.name}: both {present[0].name} and {present[1].name} exist; keep one ({folder})")
    return present[0] if present else None


def _flair_case(path: Path) -> str | None:
    stem = nifti_stem(path)
    return stem[: -len("_flair")] if stem and stem.endswith("_flair") and len(stem) > len("_flair") else None


def _case_id(folder: Path) -> str:
    """The folder's name when ``NAME_flair.nii[.gz]`` exists, else the prefix of its one ``*_flair`` file."""
    if nifti_in(folder, f"{folder.name}_flair") is not None:
        return folder.name
    flairs = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _flair_case(p) is not None
    )
    cases = sorted({_flair_case(p) for p in flairs})
    if len(cases) != 1:
        found = f"found {', '.join(p.name for p in flairs)}" if flairs else "found none"
        raise CaseFolderError(f"expected one CASE_flair.nii[.gz] file in the case folder {folder} ({found})")
    return cases[0]


def _label(folder: Path, case: str) -> Path | None:
    label = nifti_in(folder, f"{case}_seg")
    if label is not None:
        return label
    quirks = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and SEGM_QUIRK_RE.match(p.name)
    )
    if len(quirks) > 1:
        raise CaseFolderError(f"{case}: several candidate label files {[p.name for p in quirks]} in {folder}")
    if quirks:
        logger.info("%s: using %s as the label (known BraTS 2020 naming quirk)", case, quirks[0].name)
        return quirks[0]
    return None


def find_case_files(folder: str | os.PathLike, *, case_id: str | None = None) -> CaseFiles:
    """The files of the case folder ``folder``.

    Args:
        folder: The case folder.
        case_id: The case's id when known (the readers pass the folder's name); default: found as above.

    Raises:
        CaseFolderError: a modality is missing, a file exists both as ``.nii`` and ``.nii.gz``, no single
            ``*_flair`` file names the case, or several ``*Segm`` files could be the label.
    """
    folder = Path(folder)
    case = case_id if case_id is not None else _case_id(folder)
    images: dict[str, Path] = {}
    for modality in MODALITIES:
        path = nifti_in(folder, f"{case}_{modality}")
        if path is None:
            raise CaseFolderError(f"{case}: missing {modality} volume: no {case}_{modality}.nii[.gz] in {folder}")
        images[modality] = path
    return CaseFiles(case, images, _label(folder, case))
