"""Find and read the cases of the BraTS dataset layouts in use: BraTS 2020, 2021 and 2023 (adult glioma) and
the MSD Task01_BrainTumour. Torch-free: the service and the training package both read datasets here.

Nothing is renamed on disk; the readers understand the layouts as they are distributed (SPEC section 1):

- BraTS 2020: ``MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN/BraTS20_Training_NNN_{flair,t1,t1ce,t2,seg}.nii``
  (or ``.nii.gz``), including case 355 whose label is named ``W39_1998.09.19_Segm.nii``, and validation
  folders (``BraTS20_Validation_NNN``) without a ``seg`` file. Extra files such as ``name_mapping.csv``
  and ``survival_info.csv`` are ignored.
- BraTS 2021: ``RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021/BraTS2021_NNNNN/BraTS2021_NNNNN_{flair,t1,
  t1ce,t2,seg}.nii.gz``, validation folders without ``seg``; labels 0, 1, 2, 4 as in 2020.
- BraTS 2023 adult glioma: ``ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData/BraTS-GLI-NNNNN-NNN/
  BraTS-GLI-NNNNN-NNN-{t2f,t1n,t1c,t2w,seg}.nii.gz`` (t2f FLAIR, t1n T1, t1c T1ce, t2w T2), validation
  folders (``...-ValidationData``) without ``seg``; labels 1 NCR, 2 edema, 3 enhancing tumour, mapped to the
  BraTS 2020 values on load. BraTS 2024 post-treatment data use the same names, with label 4 for the
  resection cavity: a label volume holding 4 is refused when read (:data:`~service.core.labels.POST_TREATMENT_REASON`).
- MSD Task01_BrainTumour: ``imagesTr/BRATS_NNN.nii.gz`` (4D, channels FLAIR, T1w, T1gd, T2w),
  ``labelsTr/BRATS_NNN.nii.gz`` (1 edema, 2 non-enhancing tumour, 3 enhancing tumour, mapped to the BraTS
  values on load) and ``imagesTs`` without labels. The macOS ``._*`` files of the official tarball are
  ignored.

Every error a user can hit is a :class:`DataError` of the form ``"CASE: problem (file)"``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np

from service.core.case_folder import CaseFolderError, find_case_files, nifti_in
from service.core.geometry import Geometry
from service.core.labels import MODALITIES
from service.core.scan import IMAGE_PART, LABEL_PART, LabelFormat, Scan, ScanError, load_scan, load_scan_label

__all__ = [
    "BRATS2023_MODALITY_SUFFIXES",
    "Case",
    "DataError",
    "find_brats2020_cases",
    "find_brats2021_cases",
    "find_brats2023_cases",
    "find_cases",
    "find_msd_cases",
    "load_case",
    "read_scan",
]

logger = logging.getLogger(__name__)

BRATS_CASE_RE = re.compile(r"^BraTS20_(Training|Validation|Testing)_\d+$")
BRATS2021_CASE_RE = re.compile(r"^BraTS2021_\d+$")
BRATS2023_CASE_RE = re.compile(r"^BraTS-GLI-\d+-\d+$")
MSD_CASE_RE = re.compile(r"^(BRATS_\d+)\.nii(\.gz)?$")

BRATS2023_MODALITY_SUFFIXES: dict[str, str] = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
"""BraTS 2023 file suffix of each modality of ``MODALITIES`` (``BraTS-GLI-00000-000-t2f.nii.gz`` is the FLAIR)."""

_MAX_SEARCH_DEPTH = 3

BRATS_EXPECTED = (
    "MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN/BraTS20_Training_NNN_{flair,t1,t1ce,t2,seg}.nii[.gz]"
)
BRATS2021_EXPECTED = (
    "RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021/BraTS2021_NNNNN/BraTS2021_NNNNN_{flair,t1,t1ce,t2,seg}.nii.gz"
)
BRATS2023_EXPECTED = (
    "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData/BraTS-GLI-NNNNN-NNN/BraTS-GLI-NNNNN-NNN-{t2f,t1n,t1c,t2w,seg}.nii.gz"
)
MSD_EXPECTED = "Task01_BrainTumour/imagesTr/BRATS_NNN.nii.gz with labelsTr/BRATS_NNN.nii.gz"

LABEL_FORMATS: tuple[str, ...] = get_args(LabelFormat)


class DataError(ValueError):
    """A dataset folder or one of its cases cannot be read; the message names the case and the file."""


@dataclass(frozen=True)
class Case:
    """One case on disk: four 3D modality files (BraTS) or one 4D file (MSD), and an optional label.

    Attributes:
        case_id: Folder or file stem, e.g. ``BraTS20_Training_001``, ``BraTS-GLI-00000-000`` or ``BRATS_001``.
        images: Modality name -> path, for the four entries of ``MODALITIES`` (BraTS layouts), else ``None``.
        image4d: Path of a 4D volume ``(X, Y, Z, 4)`` in ``MODALITIES`` order (MSD layout), else ``None``.
        label: Path of the label volume, or ``None`` (validation and test cases).
        label_format: The label file's values: ``"brats"`` (0, 1, 2, 4: BraTS 2020 and 2021), ``"msd"``
            (0, 1, 2, 3 with 1 edema) or ``"brats2023"`` (0, 1, 2, 3 with 3 enhancing); the last two are
            mapped to the BraTS 2020 values on load.
    """

    case_id: str
    images: dict[str, Path] | None = None
    image4d: Path | None = None
    label: Path | None = None
    label_format: LabelFormat = "brats"

    def __post_init__(self) -> None:
        if (self.images is None) == (self.image4d is None):
            raise ValueError(
                f"{self.case_id}: give either images (four modality files) or image4d, not both or neither"
            )
        if self.images is not None and set(self.images) != set(MODALITIES):
            raise ValueError(
                f"{self.case_id}: images must have exactly the keys {list(MODALITIES)}, got {sorted(self.images)}"
            )
        if self.label_format not in LABEL_FORMATS:
            raise ValueError(
                f"{self.case_id}: label_format must be one of {', '.join(map(repr, LABEL_FORMATS))}, "
                f"got {self.label_format!r}"
            )

    @property
    def files(self) -> list[Path]:
        """Every source file of the case (images first, then the label if any)."""
        paths = [self.images[m] for m in MODALITIES] if self.images is not None else [self.image4d]
        return paths + ([self.label] if self.label is not None else [])


def _check_root(root: Path | str) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder")
    return root


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_dirs(root: Path, holds: Callable[[Path], bool]) -> list[Path]:
    """Folders at ``root`` or up to ``_MAX_SEARCH_DEPTH`` levels below it for which ``holds`` is true.

    The search stops descending at a folder that matches, so a dataset folder's own children are not
    searched again.
    """
    found: list[Path] = []
    frontier = [root]
    for depth in range(_MAX_SEARCH_DEPTH + 1):
        below: list[Path] = []
        for folder in frontier:
            if holds(folder):
                found.append(folder)
            elif depth < _MAX_SEARCH_DEPTH:
                below.extend(_visible_dirs(folder))
        frontier = below
    return sorted(found)


def _nifti_in(folder: Path, stem: str) -> Path | None:
    try:
        return nifti_in(folder, stem)
    except CaseFolderError as err:
        raise DataError(str(err)) from None


def _brats_case(folder: Path) -> Case:
    """A case folder named as in BraTS 2020 and 2021: ``CASE/CASE_{flair,t1,t1ce,t2,seg}.nii[.gz]``."""
    try:
        case_id, images, label = find_case_files(folder, case_id=folder.name)
    except CaseFolderError as err:
        raise DataError(str(err)) from None
    return Case(case_id=case_id, images=images, label=label, label_format="brats")


def _brats2023_case(folder: Path) -> Case:
    """A case folder named as in BraTS 2023: ``CASE/CASE-{t2f,t1n,t1c,t2w,seg}.nii[.gz]``."""
    case = folder.name
    images: dict[str, Path] = {}
    for modality, suffix in BRATS2023_MODALITY_SUFFIXES.items():
        path = _nifti_in(folder, f"{case}-{suffix}")
        if path is None:
            raise DataError(f"{case}: missing {modality} volume: no {case}-{suffix}.nii[.gz] in {folder}")
        images[modality] = path
    return Case(case_id=case, images=images, label=_nifti_in(folder, f"{case}-seg"), label_format="brats2023")


@dataclass(frozen=True)
class _FolderLayout:
    """A layout of one folder per case: its name, how case folders are named, read and described."""

    name: str
    case_re: re.Pattern[str]
    read_case: Callable[[Path], Case]
    expected: str

    def holds_cases(self, folder: Path) -> bool:
        """Whether ``folder`` holds case folders with NIfTI files (not, e.g., DICOM studies named by case)."""
        return any(self.case_re.match(p.name) and any(p.glob("*.nii*")) for p in _visible_dirs(folder))

    def find(self, root: Path | str) -> list[Case]:
        root = _check_root(root)
        cases: list[Case] = []
        for folder in _find_dirs(root, self.holds_cases):
            cases.extend(self.read_case(d) for d in _visible_dirs(folder) if self.case_re.match(d.name))
        if not cases:
            raise DataError(f"no {self.name} case folders under {root}; expected {self.expected}")
        return _unique_sorted(cases, root)


BRATS2020 = _FolderLayout("BraTS 2020", BRATS_CASE_RE, _brats_case, BRATS_EXPECTED)
BRATS2021 = _FolderLayout("BraTS 2021", BRATS2021_CASE_RE, _brats_case, BRATS2021_EXPECTED)
BRATS2023 = _FolderLayout("BraTS 2023", BRATS2023_CASE_RE, _brats2023_case, BRATS2023_EXPECTED)


def find_brats2020_cases(root: Path | str) -> list[Case]:
    """Find the BraTS 2020 cases under ``root``.

    Args:
        root: A ``MICCAI_BraTS2020_TrainingData`` or ``MICCAI_BraTS2020_ValidationData`` folder (any folder
            holding ``BraTS20_{Training,Validation}_NNN`` case folders), or a parent of such folders up to
            three levels above them. Every such folder found is read, so a parent holding both training
            and validation data yields both; validation cases have ``label=None``.

    Returns:
        The cases, sorted by case id. Validation cases (no ``seg`` file) have ``label=None``.

    Raises:
        DataError: ``root`` is missing, holds no BraTS 2020 case folder, or a case lacks a modality.
    """
    return BRATS2020.find(root)


def find_brats2021_cases(root: Path | str) -> list[Case]:
    """Find the BraTS 2021 cases (``BraTS2021_NNNNN`` folders, labels 0, 1, 2, 4) under ``root``.

    Args:
        root: A ``RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021`` or validation folder, or a parent of
            such folders up to three levels above them; every one found is read.

    Returns:
        The cases, sorted by case id; validation cases (no ``seg`` file) have ``label=None``.

    Raises:
        DataError: as :func:`find_brats2020_cases`.
    """
    return BRATS2021.find(root)


def find_brats2023_cases(root: Path | str) -> list[Case]:
    """Find the BraTS 2023 adult glioma cases (``BraTS-GLI-NNNNN-NNN`` folders) under ``root``.

    The modalities are ``t2f`` (FLAIR), ``t1n`` (T1), ``t1c`` (T1ce) and ``t2w`` (T2); the cases have
    ``label_format="brats2023"``, so reading maps the enhancing tumour 3 to 4 (and refuses label 4, the
    resection cavity of BraTS 2024 post-treatment data).

    Args:
        root: An ``ASNR-MICCAI-BraTS2023-GLI-Challenge-{Training,Validation}Data`` folder, or a parent of
            such folders up to three levels above them; every one found is read.

    Returns:
        The cases, sorted by case id; validation cases (no ``seg`` file) have ``label=None``.

    Raises:
        DataError: ``root`` is missing, holds no BraTS 2023 case folder, or a case lacks a modality.
    """
    return BRATS2023.find(root)


def _holds_msd(folder: Path) -> bool:
    return (folder / "imagesTr").is_dir() or (folder / "imagesTs").is_dir()


def _msd_images(folder: Path) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.iterdir()):
        match = MSD_CASE_RE.match(p.name)  # "._BRATS_001.nii.gz" (macOS metadata) does not match
        if match and p.is_file():
            found.append((match.group(1), p))
    return found


def find_msd_cases(root: Path | str) -> list[Case]:
    """Find the MSD Task01_BrainTumour cases under ``root``.

    Args:
        root: The ``Task01_BrainTumour`` folder (any folder with ``imagesTr`` or ``imagesTs``), or a parent
            of it up to three levels above.

    Returns:
        The cases sorted by case id: ``imagesTr`` cases with their ``labelsTr`` file, ``imagesTs`` cases
        with ``label=None``.

    Raises:
        DataError: nothing found, or an ``imagesTr`` case has no file in ``labelsTr``.
    """
    root = _check_root(root)
    cases: list[Case] = []
    for task in _find_dirs(root, _holds_msd):
        for case_id, image in _msd_images(task / "imagesTr"):
            label = _nifti_in(task / "labelsTr", case_id) if (task / "labelsTr").is_dir() else None
            if label is None:
                raise DataError(f"{case_id}: no label for {image.name} ({task / 'labelsTr' / image.name})")
            cases.append(Case(case_id=case_id, image4d=image, label=label, label_format="msd"))
        for case_id, image in _msd_images(task / "imagesTs"):
            cases.append(Case(case_id=case_id, image4d=image, label=None, label_format="msd"))
    if not cases:
        raise DataError(f"no MSD cases under {root}; expected {MSD_EXPECTED}")
    return _unique_sorted(cases, root)


def _unique_sorted(cases: Iterable[Case], root: Path) -> list[Case]:
    by_id: dict[str, Case] = {}
    for case in cases:
        if case.case_id in by_id:
            raise DataError(
                f"{case.case_id}: found twice under {root} ({by_id[case.case_id].files[0]} and {case.files[0]})"
            )
        by_id[case.case_id] = case
    return [by_id[k] for k in sorted(by_id)]


_LAYOUTS: tuple[tuple[str, Callable[[Path], bool], Callable[[Path | str], list[Case]]], ...] = (
    (BRATS2020.name, BRATS2020.holds_cases, find_brats2020_cases),
    (BRATS2021.name, BRATS2021.holds_cases, find_brats2021_cases),
    (BRATS2023.name, BRATS2023.holds_cases, find_brats2023_cases),
    ("MSD", _holds_msd, find_msd_cases),
)


def _a(name: str) -> str:
    return f"an {name}" if name.startswith("MSD") else f"a {name}"


def find_cases(root: Path | str) -> list[Case]:
    """Find the cases under ``root``, detecting the layout (BraTS 2020, 2021, 2023 or MSD Task01_BrainTumour).

    Raises:
        DataError: ``root`` is empty or holds no known layout (the message says what was expected), or
            holds more than one, named in the message (the releases share patients, so mixing them would
            leak cases between splits).
    """
    root = _check_root(root)
    found = [(name, find) for name, holds, find in _LAYOUTS if _find_dirs(root, holds)]
    if len(found) > 1:
        names = [_a(name) for name, _ in found]
        which = f"both {names[0]} and {names[1]}" if len(names) == 2 else f"{', '.join(names[:-1])} and {names[-1]}"
        raise DataError(
            f"{root} holds {which} dataset; point at one of them "
            "(they share patients, so mixing them would leak cases between training and validation)"
        )
    if found:
        return found[0][1](root)
    expected = " or ".join((BRATS_EXPECTED, BRATS2021_EXPECTED, BRATS2023_EXPECTED, MSD_EXPECTED))
    raise DataError(f"no dataset found under {root}; expected {expected}")


def _parts(case: Case) -> dict[str, Path]:
    """The case's files by scan part name (:mod:`service.core.scan`)."""
    parts: dict[str, Path] = dict(case.images) if case.images is not None else {IMAGE_PART: case.image4d}
    if case.label is not None:
        parts[LABEL_PART] = case.label
    return parts


def read_scan(case: Case) -> Scan:
    """Read one case into memory with the service's scan loader (:func:`service.core.scan.load_scan`): the
    image ``(4, X, Y, Z)`` float32 in ``MODALITIES`` order, the label in BraTS 2020 values {0, 1, 2, 4} (MSD
    and BraTS 2023 labels are mapped) or ``None``, and the geometry of the first image file.

    Raises:
        DataError: ``"CASE: problem (file)"`` for an unreadable or corrupt file, a wrong number of
            dimensions or channels, shapes or affines (beyond 1e-3) that differ between the volumes, or
            label values outside the expected set (a BraTS 2023-style label holding 4, the resection cavity
            of post-treatment data, says so).
    """
    parts = _parts(case)
    try:
        return load_scan(parts, label_format=case.label_format)
    except (ScanError, OSError) as err:
        raise _data_error(case, err, parts) from err


def read_label(case: Case) -> tuple[np.ndarray, Geometry] | None:
    """The case's label alone, in BraTS 2020 values, and its geometry; ``None`` without one.

    Raises:
        DataError: as :func:`read_scan` for the label file.
    """
    if case.label is None:
        return None
    try:
        return load_scan_label(case.label, label_format=case.label_format)
    except (ScanError, OSError) as err:
        raise _data_error(case, err, {LABEL_PART: case.label}) from err


def _data_error(case: Case, err: Exception, parts: dict[str, Path]) -> DataError:
    if isinstance(err, OSError):
        return DataError(f"{case.case_id}: cannot read the file: {err}")
    what = "MSD label file: " if err.part == LABEL_PART and case.label_format == "msd" else ""
    return DataError(f"{case.case_id}: {what}{err.reason} ({parts[err.part]})")


def load_case(case: Case) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """``(image, label, geometry)`` of :func:`read_scan`."""
    scan = read_scan(case)
    return scan.image, scan.label, scan.geometry
