"""DICOM instances in, one volume per MR series out, with its true geometry.

:func:`read_instances` turns uploaded files (DICOM files, or zips of them in any folder structure) into
pydicom datasets, within limits on the number of instances and the bytes a zip may inflate to; nothing is
written to disk and no name from a zip is ever used as a path. :func:`group_series` groups them by series;
:func:`series_volume` builds a series' volume: classic single-frame slices sorted along the slice normal
(instance numbers and file order are not trusted), enhanced multi-frame objects read frame by frame, the
spacing checked to be even and the stack to have no gantry tilt.

Geometry: DICOM positions are in LPS patient coordinates; a volume is indexed ``(i, j, k)`` = (column, row,
slice), and its NIfTI (RAS) affine is ``diag(-1, -1, 1, 1) @`` the LPS one, done here once. Problems raise
:class:`DicomInputError`, whose ``reason`` names series by their description, never by a UID or a patient
field.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from service.core.geometry import Geometry

__all__ = ["DicomInputError", "LPS_TO_RAS", "Series", "group_series", "read_instances", "series_volume", "sorted_instances"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM patient coordinates (LPS) to NIfTI world coordinates (RAS)."""

SPACING_RTOL = 0.01
"""Largest relative difference between slice gaps (and from the nominal spacing) of one evenly spaced series."""
TILT_TOL_MM = 0.01
"""Largest in-plane offset (mm per mm along the normal) between consecutive slices before a stack is tilted."""
ZIP_MAX_RATIO = 200
"""A zip member that inflates more than this many times its compressed size is refused (a zip bomb)."""

MR_STORAGE = {"1.2.840.10008.5.1.4.1.1.4": "MR Image Storage", "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage"}


class DicomInputError(ValueError):
    """DICOM input that cannot be used.

    Attributes:
        reason: What is wrong and what to send instead; names series by description, never a UID.
        status: The HTTP status that fits: 400 unreadable or inconsistent, 413 over a limit, 422 when the
            series found do not give the four modalities.
    """

    def __init__(self, reason: str, status: int = 400) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason)


@dataclass
class Series:
    """The instances of one series, and what identifies it to a person."""

    uid: str
    description: str
    protocol: str
    modality: str
    study_uid: str
    frame_of_reference_uid: str
    number: int | None
    instances: list[Dataset] = field(default_factory=list)

    @property
    def label(self) -> str:
        """How error messages name the series: its description (and number), never its UID."""
        name = self.description or self.protocol or "(no description)"
        return f"'{name}'" + (f" (series {self.number})" if self.number is not None else "")


# ------------------------------------------------------------------------------------------- reading
def _dataset(raw: bytes) -> Dataset | None:
    """The dataset in ``raw``, or ``None`` when it is not a DICOM file (e.g. a README or DICOMDIR in a zip)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(raw))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, AttributeError, OSError):
        return None
    if "SOPClassUID" not in ds or ds.SOPClassUID == "1.2.840.10008.1.3.10":  # the Media Storage Directory
        return None
    return ds


def _members(archive: zipfile.ZipFile, *, max_instances: int, max_bytes: int, read: int = 0,
             inflated: int = 0) -> Iterable[bytes]:
    """The members' bytes; ``read`` instances and ``inflated`` bytes of earlier parts count against the limits."""
    infos = [i for i in archive.infolist() if not i.is_dir()]
    if read + len(infos) > max_instances:
        before = f" after {read} instances in earlier parts" if read else ""
        raise DicomInputError(
            f"a zip holds {len(infos)} files{before}, more than the limit of {max_instances} instances", 413)
    total = inflated
    for info in infos:
        if info.file_size > ZIP_MAX_RATIO * max(info.compress_size, 1) and info.file_size > 1 << 20:
            raise DicomInputError("a zip member inflates over 200 times its size; refused as a zip bomb", 413)
        total += info.file_size
        if total > max_bytes:
            raise DicomInputError(f"the zips inflate to more than the limit of {max_bytes} bytes", 413)
        with archive.open(info) as member:  # the name is never used: no path can come from it
            data = member.read(info.file_size + 1)
        if len(data) > info.file_size:
            raise DicomInputError("a zip member inflates to more than its declared size; refused", 413)
        yield data


def read_instances(paths: Iterable[Path], *, max_instances: int = 5000, max_bytes: int = 2 << 30) -> list[Dataset]:
    """The DICOM datasets in ``paths``, each a DICOM file or a zip of DICOM files.

    Non-DICOM members of a zip are skipped; a part that is neither DICOM nor a zip is an error.

    Raises:
        DicomInputError: unreadable parts (400); more than ``max_instances`` instances or zips that inflate to
            more than ``max_bytes`` (413); no DICOM instance at all (400).
    """
    datasets: list[Dataset] = []
    inflated = 0
    for number, path in enumerate(paths, start=1):
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(path) as archive:
                    for raw in _members(archive, max_instances=max_instances, max_bytes=max_bytes,
                                        read=len(datasets), inflated=inflated):
                        inflated += len(raw)
                        ds = _dataset(raw)
                        if ds is not None:
                            datasets.append(ds)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as err:
                raise DicomInputError(f"dicom part {number}: the zip cannot be read ({err})") from None
            except RuntimeError as err:  # an encrypted member
                raise DicomInputError(f"dicom part {number}: the zip cannot be read ({err})") from None
        else:
            ds = _dataset(Path(path).read_bytes())
            if ds is None:
                raise DicomInputError(f"dicom part {number} is neither a DICOM file nor a zip of DICOM files")
            datasets.append(ds)
        if len(datasets) > max_instances:
            raise DicomInputError(f"more than the limit of {max_instances} DICOM instances", 413)
    if not datasets:
        raise DicomInputError("no DICOM instance was found in the dicom parts")
    return datasets


def group_series(datasets: Iterable[Dataset]) -> list[Series]:
    """The datasets grouped by ``SeriesInstanceUID``, in order of first appearance."""
    by_uid: dict[str, Series] = {}
    for ds in datasets:
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid not in by_uid:
            number = ds.get("SeriesNumber")
            by_uid[uid] = Series(
                uid=uid,
                description=str(ds.get("SeriesDescription", "") or "").strip(),
                protocol=str(ds.get("ProtocolName", "") or "").strip(),
                modality=str(ds.get("Modality", "") or ""),
                study_uid=str(ds.get("StudyInstanceUID", "")),
                frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
                number=None if number in (None, "") else int(number),
            )
        by_uid[uid].instances.append(ds)
    return list(by_uid.values())


# ------------------------------------------------------------------------------------------- geometry
def _vector(value, n: int, what: str, series: Series) -> np.ndarray:
    try:
        vec = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        vec = np.zeros(0)
    if vec.shape != (n,) or not np.all(np.isfinite(vec)):
        raise DicomInputError(f"series {series.label}: {what} is missing or invalid")
    return vec


@dataclass(frozen=True)
class _Frame:
    position: np.ndarray  # ImagePositionPatient (LPS)
    pixels: np.ndarray  # (rows, cols) float32, rescaled


def _frames(series: Series) -> tuple[list[_Frame], np.ndarray, np.ndarray]:
    """Every frame of the series with its position, the row/column direction cosines and the pixel spacing."""
    frames: list[_Frame] = []
    orientation = spacing = None
    for ds in series.instances:
        try:
            pixels = ds.pixel_array
        except Exception as err:  # noqa: BLE001 - pydicom raises many types for pixel data it cannot decode
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            name = getattr(syntax, "name", str(syntax))
            raise DicomInputError(
                f"series {series.label}: its pixel data cannot be decoded (transfer syntax {name}: {err}); send it "
                "uncompressed (Explicit VR Little Endian) or as JPEG / JPEG-LS / RLE"
            ) from None
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if "PerFrameFunctionalGroupsSequence" in ds:  # enhanced multi-frame
            shared = ds.SharedFunctionalGroupsSequence[0]
            pixels = pixels.reshape(-1, *pixels.shape[-2:])
            for index, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
                plane = group.get("PlaneOrientationSequence") or shared.get("PlaneOrientationSequence")
                measures = group.get("PixelMeasuresSequence") or shared.get("PixelMeasuresSequence")
                transform = group.get("PixelValueTransformationSequence") or shared.get(
                    "PixelValueTransformationSequence")
                if plane is None or measures is None or "PlanePositionSequence" not in group:
                    raise DicomInputError(f"series {series.label}: a frame has no plane position or orientation")
                orientation, spacing = _same(orientation, plane[0].ImageOrientationPatient,
                                             spacing, measures[0].PixelSpacing, series)
                s, b = slope, intercept
                if transform:
                    s = float(transform[0].get("RescaleSlope", 1) or 1)
                    b = float(transform[0].get("RescaleIntercept", 0) or 0)
                position = _vector(group.PlanePositionSequence[0].ImagePositionPatient, 3, "ImagePositionPatient",
                                   series)
                frames.append(_Frame(position, pixels[index].astype(np.float32) * s + b))
        else:
            if pixels.ndim != 2:
                raise DicomInputError(f"series {series.label}: expected single-frame slices or an enhanced MR object")
            orientation, spacing = _same(orientation, ds.get("ImageOrientationPatient"), spacing,
                                         ds.get("PixelSpacing"), series)
            position = _vector(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", series)
            frames.append(_Frame(position, pixels.astype(np.float32) * slope + intercept))
    return frames, orientation, spacing


def _same(orientation, new_orientation, spacing, new_spacing, series: Series):
    o = _vector(new_orientation, 6, "ImageOrientationPatient", series)
    s = _vector(new_spacing, 2, "PixelSpacing", series)
    if np.any(s <= 0):
        raise DicomInputError(f"series {series.label}: PixelSpacing must be positive")
    if orientation is not None and (not np.allclose(o, orientation, atol=1e-4) or not np.allclose(s, spacing, rtol=1e-4)):
        raise DicomInputError(f"series {series.label}: its slices differ in orientation or pixel spacing")
    return o, s


def series_volume(series: Series) -> tuple[np.ndarray, Geometry]:
    """The series as a float32 volume ``(columns, rows, slices)`` and its NIfTI geometry.

    Raises:
        DicomInputError: a single slice, slices at one position twice, uneven spacing, a tilted stack,
            slices of different sizes or orientations, or pixel data that cannot be decoded.
    """
    frames, orientation, spacing = _frames(series)
    if len(frames) < 2:
        raise DicomInputError(f"series {series.label}: it has {len(frames)} slice; a volume needs several")
    row_dir, col_dir = orientation[:3], orientation[3:]  # +column index direction, +row index direction
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DicomInputError(f"series {series.label}: ImageOrientationPatient is not two orthogonal unit vectors")
    frames.sort(key=lambda f: float(f.position @ normal))
    depths = np.array([f.position @ normal for f in frames])
    gaps = np.diff(depths)
    if np.any(gaps < 1e-3):
        raise DicomInputError(f"series {series.label}: two slices lie at the same position (a repeated instance?)")
    step = float(np.median(gaps))
    if np.any(np.abs(gaps - step) > SPACING_RTOL * step):
        raise DicomInputError(
            f"series {series.label}: the slices are unevenly spaced ({gaps.min():.3g} to {gaps.max():.3g} mm apart); "
            "send an evenly spaced series"
        )
    drift = np.diff(np.array([f.position for f in frames]), axis=0) - np.outer(gaps, normal)
    if np.any(np.linalg.norm(drift, axis=1) > TILT_TOL_MM * np.maximum(gaps, 1.0) + 1e-3):
        raise DicomInputError(
            f"series {series.label}: the stack is tilted (slice positions do not follow the slice normal, as with "
            "gantry tilt); resample it to an orthogonal grid first"
        )
    shape = {f.pixels.shape for f in frames}
    if len(shape) != 1:
        raise DicomInputError(f"series {series.label}: its slices differ in size")
    volume = np.stack([f.pixels.T for f in frames], axis=-1)  # (cols, rows, slices)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # i: along a row, one column spacing per step
    lps[:3, 1] = col_dir * spacing[0]  # j: down a column, one row spacing per step
    lps[:3, 2] = normal * step
    lps[:3, 3] = frames[0].position
    return np.ascontiguousarray(volume, dtype=np.float32), Geometry.from_affine(volume.shape, LPS_TO_RAS @ lps)


def sorted_instances(series: Series) -> list[Dataset]:
    """Single-frame instances in slice order (as :func:`series_volume` stacks them); an enhanced object alone."""
    if len(series.instances) == 1:
        return list(series.instances)
    orientation = _vector(series.instances[0].ImageOrientationPatient, 6, "ImageOrientationPatient", series)
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(series.instances, key=lambda ds: float(np.asarray(ds.ImagePositionPatient, float) @ normal))
