"""A DICOM study as a scan: four selected MR series on the grid of the T1ce series, oriented as BraTS data.

:func:`load_dicom_scan` requires one study and one frame of reference, picks the four modalities
(:mod:`service.core.series_rules`), builds each volume (:mod:`service.core.dicom_series`), resamples the
series whose grid differs from the reference (the T1ce series) onto it, and turns the result to the
orientation of BraTS volumes (voxel axes towards Left, Posterior, Superior: an axial DICOM series as
stored) so that sagittal, coronal and axial acquisitions of one head give the networks the same array. The
:class:`DicomScan` maps a mask back onto the reference series' own grid (a lossless flip and transpose),
where the NIfTI mask and the DICOM Segmentation are written. No registration or skull stripping is done:
the models expect BraTS-style preprocessed series.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from nibabel import orientations
from pydicom.dataset import Dataset
from scipy import ndimage

from service.core.dicom_series import (
    DicomInputError,
    Series,
    group_series,
    series_volume,
    sorted_instances,
)
from service.core.geometry import Geometry, grid_mismatch
from service.core.labels import MODALITIES
from service.core.scan import Scan
from service.core.series_rules import SeriesRules, select_series

__all__ = ["BRATS_AXES", "DicomScan", "load_dicom_scan", "resample_to"]

BRATS_AXES = ("L", "P", "S")
"""The orientation of BraTS volumes (nibabel axis codes), which the networks were trained on."""
EDGE_TOL = 1e-3
"""How far (in source voxels) a sampled point may lie outside a resampled volume's edge voxels and still take
their value: rounding in the grid-to-grid transform must not zero a shared edge."""
REFERENCE = "t1ce"
"""The series whose grid the mask lies on and the DICOM Segmentation references."""


@dataclass
class DicomScan:
    """A study read for segmentation.

    Attributes:
        scan: The four volumes oriented as BraTS volumes.
        reference_geometry: The reference series' own grid (columns, rows, slices in slice order).
        reference_instances: The reference series' instances in slice order (what a SEG references).
        series: Modality -> the :class:`Series` used.
    """

    scan: Scan
    reference_geometry: Geometry
    reference_instances: list[Dataset]
    series: dict[str, Series]
    _transform: np.ndarray = field(repr=False, default=None)  # reference grid -> BraTS orientation

    def to_reference(self, array: np.ndarray) -> np.ndarray:
        """A ``(X, Y, Z)`` array of :attr:`scan`'s grid moved back onto the reference series' grid."""
        inverse = orientations.ornt_transform(orientations.axcodes2ornt(BRATS_AXES),
                                              orientations.io_orientation(self.reference_geometry.affine))
        return np.ascontiguousarray(orientations.apply_orientation(array, inverse))

    def to_scan(self, array: np.ndarray) -> np.ndarray:
        """A ``(X, Y, Z)`` array of the reference grid turned as :attr:`scan` (e.g. a ground truth)."""
        return np.ascontiguousarray(orientations.apply_orientation(array, self._transform))

    def used(self) -> dict[str, str]:
        """Modality -> the description of the series used (what a reply may show)."""
        return {m: self.series[m].description or self.series[m].protocol for m in MODALITIES}


def resample_to(volume: np.ndarray, geometry: Geometry, reference: Geometry, *, order: int = 1) -> np.ndarray:
    """``volume`` (on ``geometry``) sampled at the voxel centres of ``reference`` (same world coordinates),
    linearly by default; points outside the volume are 0, points on its edge (within rounding) are not."""
    to_source = np.linalg.inv(geometry.affine) @ reference.affine
    out = ndimage.affine_transform(volume, to_source[:3, :3], offset=to_source[:3, 3], output_shape=reference.shape,
                                   order=order, mode="nearest", prefilter=False).astype(np.float32)
    index = np.ogrid[tuple(slice(0, n) for n in reference.shape)]
    for axis, size in enumerate(volume.shape):  # mode "constant" would zero edge points a rounding error outside
        source = sum(to_source[axis, e] * index[e] for e in range(3)) + to_source[axis, 3]
        out[(source < -EDGE_TOL) | (source > size - 1 + EDGE_TOL)] = 0.0
    return out


def _one(values: Iterable[str], what: str, plural: str, series: list[Series]) -> None:
    distinct = set(values)
    if len(distinct) > 1:
        raise DicomInputError(
            f"the series come from {len(distinct)} different {plural}; send the series of one {what} "
            f"({', '.join(s.label for s in series)})"
        )


def _oriented(geometry: Geometry) -> tuple[np.ndarray, Geometry]:
    """The transform from ``geometry``'s axes to BraTS axes, and the geometry of the turned volume."""
    transform = orientations.ornt_transform(orientations.io_orientation(geometry.affine),
                                            orientations.axcodes2ornt(BRATS_AXES))
    affine = geometry.affine @ orientations.inv_ornt_aff(transform, geometry.shape)
    shape = tuple(int(geometry.shape[int(axis)]) for axis in np.argsort(transform[:, 0]))
    return transform, Geometry.from_affine(shape, affine)


def load_dicom_scan(
    datasets: list[Dataset],
    rules: SeriesRules,
    *,
    max_voxels: int | None = None,
) -> DicomScan:
    """Read a study's MR series into a scan on the grid of its T1ce series, oriented as BraTS volumes.

    Args:
        datasets: The study's instances (any order; other series are ignored once the four are chosen).
        rules: Which series is which modality.
        max_voxels: Refuse a reference grid with more voxels (413).

    Raises:
        DicomInputError: several studies or frames of reference, series missing or ambiguous (422), a series
            that cannot be a volume, or a grid over ``max_voxels`` (413).
    """
    series = group_series(datasets)
    chosen = select_series(series, rules)
    used = list(chosen.values())
    _one((s.study_uid for s in used), "study", "studies", used)
    _one((s.frame_of_reference_uid for s in used), "frame of reference", "frames of reference", used)
    volumes = {m: series_volume(chosen[m]) for m in MODALITIES}
    reference = volumes[REFERENCE][1]
    if max_voxels is not None and int(np.prod(reference.shape)) > max_voxels:
        raise DicomInputError(
            f"the reference series has {int(np.prod(reference.shape))} voxels, more than the limit of {max_voxels}", 413)
    transform, oriented = _oriented(reference)
    image = np.empty((len(MODALITIES), *oriented.shape), dtype=np.float32)
    for index, modality in enumerate(MODALITIES):
        volume, geometry = volumes[modality]
        if grid_mismatch(geometry, reference) is not None:
            volume = resample_to(volume, geometry, reference)
        image[index] = orientations.apply_orientation(volume, transform)
    return DicomScan(
        scan=Scan(image=image, geometry=oriented, image_part="dicom"),
        reference_geometry=reference,
        reference_instances=sorted_instances(chosen[REFERENCE]),
        series=chosen,
        _transform=transform,
    )
