"""The one scan loader: named NIfTI parts in, the image, the label and their geometry out.

A scan comes in one of two forms (SPEC section 2), each with an optional ground truth:

- four 3D volumes, one per modality, named by :data:`~service.core.labels.MODALITIES`;
- one 4D volume :data:`IMAGE_PART` ``(X, Y, Z, 4)`` with the channels in that order.

Every header is read once; the four modality parts are decoded in parallel straight into their channel of
the image. The service's uploads, the training readers and the benchmarks all load scans here, so a part is
judged the same way everywhere. Every problem is one :class:`ScanError` naming the part (never a path).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from service.core.geometry import Geometry, grid_mismatch
from service.core.labels import (
    BRATS2023_LABEL_VALUES,
    MODALITIES,
    MSD_TO_BRATS,
    POST_TREATMENT_REASON,
    RESECTION_CAVITY_LABEL,
    LabelError,
    brats2023_to_brats,
    msd_to_brats,
)
from service.core.nifti import NiftiError, VolumeTooLargeError, load_label, load_volume, read_header
from service.core.workers import thread_pool

__all__ = ["IMAGE_PART", "LABEL_PART", "KNOWN_PARTS", "Scan", "ScanError", "image_parts", "load_scan",
           "load_scan_label"]

IMAGE_PART = "image"
"""The part holding the whole image as one 4D volume ``(X, Y, Z, 4)``."""
LABEL_PART = "label"
"""The optional ground-truth part (BraTS 2020 labels 0/1/2/4)."""
KNOWN_PARTS: tuple[str, ...] = (*MODALITIES, IMAGE_PART, LABEL_PART)

LabelFormat = Literal["brats", "msd", "brats2023"]
MSD_LABEL_VALUES = tuple(MSD_TO_BRATS)
"""Values of an MSD Task01 label file: 0 background, 1 edema, 2 non-enhancing tumour, 3 enhancing tumour."""


class ScanError(ValueError):
    """A part of a scan cannot be used.

    Attributes:
        part: The part's name (``flair`` ... ``t2``, ``image`` or ``label``).
        reason: What is wrong and what was expected, without any file name (safe to show to a user).
        too_large: The part's header declares more voxels than allowed (a 413, not a 400, over HTTP).
        mismatched: The part is readable but does not lie on the voxel grid of the others.
    """

    def __init__(self, part: str, reason: str, *, too_large: bool = False, mismatched: bool = False) -> None:
        self.part = part
        self.reason = reason
        self.too_large = too_large
        self.mismatched = mismatched
        super().__init__(f"part {part}: {reason}")


@dataclass(frozen=True)
class Scan:
    """A loaded scan.

    Attributes:
        image: ``(4, X, Y, Z)`` float32 raw intensities in ``MODALITIES`` order.
        geometry: The voxel grid of every part (that of the first image part).
        label: ``(X, Y, Z)`` uint8 BraTS 2020 labels {0, 1, 2, 4}, or ``None`` without a ground truth.
        image_part: The part whose grid the others were checked against (``flair`` or ``image``).
    """

    image: np.ndarray
    geometry: Geometry
    label: np.ndarray | None = None
    image_part: str = MODALITIES[0]


def image_parts(names: set[str] | frozenset[str] | Mapping[str, object]) -> tuple[str, ...]:
    """The image parts among ``names``: the four modalities in order, or ``(IMAGE_PART,)``.

    Raises:
        ValueError: the names hold neither form completely, or both.
    """
    present = set(names)
    modalities = [m for m in MODALITIES if m in present]
    if IMAGE_PART in present and not modalities:
        return (IMAGE_PART,)
    if len(modalities) == len(MODALITIES) and IMAGE_PART not in present:
        return MODALITIES
    raise ValueError(
        f"expected either the four parts {', '.join(MODALITIES)} or the one part {IMAGE_PART}, got "
        f"{', '.join(sorted(present)) or 'none'}"
    )


def _read(part: str, path: Path, *, ndim: int, max_voxels: int | None, out: np.ndarray | None = None,
          label_format: LabelFormat = "brats") -> tuple[np.ndarray, Geometry]:
    """Read one part (``label``: as BraTS labels), its NIfTI problem turned into a :class:`ScanError`."""
    try:
        if part != LABEL_PART:
            return load_volume(path, ndim=ndim, max_voxels=max_voxels, out=out)
        if label_format == "msd":
            raw, geometry = load_label(path, valid=MSD_LABEL_VALUES, max_voxels=max_voxels)
            return msd_to_brats(raw), geometry
        if label_format == "brats2023":
            raw, geometry = load_label(path, valid=BRATS2023_LABEL_VALUES, max_voxels=max_voxels)
            return brats2023_to_brats(raw), geometry
        return load_label(path, max_voxels=max_voxels)
    except VolumeTooLargeError as err:
        raise ScanError(part, err.reason, too_large=True) from None
    except NiftiError as err:
        cause = err.__cause__
        if label_format == "brats2023" and isinstance(cause, LabelError) and RESECTION_CAVITY_LABEL in cause.values:
            raise ScanError(part, f"the ground truth {POST_TREATMENT_REASON}") from None
        raise ScanError(part, err.reason) from None


def load_scan_label(path: str | Path, *, label_format: LabelFormat = "brats",
                    max_voxels: int | None = None) -> tuple[np.ndarray, Geometry]:
    """A ground truth alone, as :func:`load_scan` reads its ``label`` part (mapped to BraTS 2020 values).

    Raises:
        ScanError: as for the ``label`` part of :func:`load_scan`.
    """
    return _read(LABEL_PART, Path(path), ndim=3, max_voxels=max_voxels, label_format=label_format)


def _header_geometry(part: str, path: Path) -> Geometry | None:
    """The part's geometry from its header alone; ``None`` when the header's geometry is invalid (reading the
    whole part then says precisely why)."""
    try:
        header = read_header(path)
    except NiftiError as err:
        raise ScanError(part, err.reason) from None
    try:
        return Geometry.from_header(header)
    except Exception:  # noqa: BLE001 - nibabel's HeaderDataError, ValueError, OverflowError: see the docstring
        return None


def _check_same_grid(part: str, geometry: Geometry, reference: Geometry, reference_part: str) -> None:
    mismatch = grid_mismatch(geometry, reference)
    if mismatch is not None:
        raise ScanError(
            part,
            f"{mismatch}, compared with part {reference_part}; all parts must be co-registered on the same voxel grid",
            mismatched=True,
        )


def _load_4d(path: Path, max_voxels: int | None) -> tuple[np.ndarray, Geometry]:
    data, geometry = _read(IMAGE_PART, path, ndim=4, max_voxels=max_voxels)
    if data.shape[-1] != len(MODALITIES):
        raise ScanError(
            IMAGE_PART,
            f"expected a 4D volume (X, Y, Z, {len(MODALITIES)}) with the channels {', '.join(MODALITIES)} on the "
            f"last axis, got shape {data.shape}",
        )
    return np.ascontiguousarray(np.moveaxis(data, -1, 0), dtype=np.float32), geometry


def _load_modalities(files: Mapping[str, Path], max_voxels: int | None) -> tuple[np.ndarray, Geometry]:
    """The four modality parts decoded in parallel into one ``(4, X, Y, Z)`` image (shape from the first
    part's header); problems are reported for the first part, in ``MODALITIES`` order, that has one."""
    first = MODALITIES[0]
    reference = _header_geometry(first, files[first])
    if reference is None or (max_voxels is not None and math.prod(reference.shape) > max_voxels):
        # the full read of the first part reports what is wrong with it (or, should it pass, its geometry)
        reference = _read(first, files[first], ndim=3, max_voxels=max_voxels)[1]
    image = np.empty((len(MODALITIES), *reference.shape), dtype=np.float32)

    def decode(index: int) -> Geometry:
        part = MODALITIES[index]
        if index > 0:
            geometry = _header_geometry(part, files[part])
            if geometry is not None and geometry.shape != reference.shape:
                return geometry  # mismatched shape: reported below, nothing to decode
        return _read(part, files[part], ndim=3, max_voxels=max_voxels, out=image[index])[1]

    geometries = list(thread_pool().map(decode, range(len(MODALITIES))))
    for part, geometry in zip(MODALITIES[1:], geometries[1:]):
        _check_same_grid(part, geometry, geometries[0], first)
    return image, geometries[0]


def load_scan(
    files: Mapping[str, str | Path], *, max_voxels: int | None = None, label_format: LabelFormat = "brats"
) -> Scan:
    """Load a scan from its parts.

    Args:
        files: Part name -> file: the four modalities or ``image``, and optionally ``label``.
        max_voxels: Refuse, from the header alone and before inflating, a part declaring more voxels.
        label_format: ``brats`` (values 0, 1, 2, 4), ``msd`` (0, 1, 2, 3, mapped to BraTS on load) or
            ``brats2023`` (0, 1, 2, 3 with ET = 3, mapped to BraTS on load; label 4, the resection cavity of
            BraTS 2024 post-treatment data, is refused).

    Raises:
        ScanError: the first problem found: an unreadable or invalid part, a part over ``max_voxels``
            (``too_large``), a 4D image without 4 channels, parts on different voxel grids (``mismatched``).
        ValueError: ``files`` holds neither form of a scan (see :func:`image_parts`) or unknown parts.
    """
    unknown = set(files) - set(KNOWN_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; expected {', '.join(KNOWN_PARTS)}")
    paths = {name: Path(path) for name, path in files.items()}
    form = image_parts(paths)
    if form == (IMAGE_PART,):
        image, geometry = _load_4d(paths[IMAGE_PART], max_voxels)
    else:
        image, geometry = _load_modalities(paths, max_voxels)
    label = None
    if LABEL_PART in paths:
        label, label_geometry = _read(LABEL_PART, paths[LABEL_PART], ndim=3, max_voxels=max_voxels,
                                      label_format=label_format)
        _check_same_grid(LABEL_PART, label_geometry, geometry, form[0])
    return Scan(image=image, geometry=geometry, label=label, image_part=form[0])
