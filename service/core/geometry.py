"""Where a volume's voxels lie: the geometry a mask must keep, and the check that volumes share one grid.

NIfTI reading (:mod:`service.core.nifti`), writing (:mod:`service.core.nifti_write`) and the scan loader
(:mod:`service.core.scan`) all speak in :class:`Geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import nibabel as nib
import numpy as np

__all__ = ["AFFINE_ATOL", "Geometry", "grid_mismatch"]

NiftiHeader = Union[nib.Nifti1Header, nib.Nifti2Header]

AFFINE_ATOL = 1e-3
"""Largest difference per affine element between volumes of one scan that still counts as one voxel grid."""


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a volume's voxels lie: everything of the header that an output must keep.

    Attributes:
        shape: Spatial shape ``(X, Y, Z)``.
        affine: ``(4, 4)`` float64 voxel-to-world matrix (nibabel's best affine: sform, else qform).
        zooms: Voxel sizes in mm ``(dx, dy, dz)``.
        qform: ``(4, 4)`` float64 qform matrix, with its code ``qform_code``.
        sform: ``(4, 4)`` float64 sform matrix, with its code ``sform_code``.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    zooms: tuple[float, float, float]
    qform: np.ndarray
    qform_code: int
    sform: np.ndarray
    sform_code: int

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        zooms = tuple(float(z) for z in self.zooms)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"expected a spatial shape of 3 positive sizes, got {self.shape}")
        if len(zooms) != 3:
            raise ValueError(f"expected 3 voxel sizes, got {self.zooms}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "zooms", zooms)
        for name in ("affine", "qform", "sform"):
            matrix = np.array(getattr(self, name), dtype=np.float64)
            if matrix.shape != (4, 4):
                raise ValueError(f"expected a 4x4 {name}, got shape {matrix.shape}")
            matrix.setflags(write=False)
            object.__setattr__(self, name, matrix)
        object.__setattr__(self, "qform_code", int(self.qform_code))
        object.__setattr__(self, "sform_code", int(self.sform_code))

    @classmethod
    def from_header(cls, header: NiftiHeader) -> Geometry:
        """Geometry of the first three axes described by a NIfTI-1 or NIfTI-2 header."""
        shape = tuple(header.get_data_shape())
        if len(shape) < 3:
            raise ValueError(f"expected a header of at least 3 dimensions, got shape {shape}")
        qform, qform_code = header.get_qform(coded=True)
        sform, sform_code = header.get_sform(coded=True)
        return cls(
            shape=shape[:3],
            affine=header.get_best_affine(),
            zooms=header.get_zooms()[:3],
            qform=header.get_qform(),
            qform_code=int(qform_code),
            sform=header.get_sform(),
            sform_code=int(sform_code),
        )

    @classmethod
    def from_affine(
        cls, shape: tuple[int, int, int], affine: np.ndarray, *, qform_code: int = 1, sform_code: int = 1
    ) -> Geometry:
        """A geometry whose qform and sform are both ``affine`` (voxel sizes from its column norms).

        Handy for synthetic data; ``affine`` should be a rotation times positive scales plus a translation.
        """
        affine = np.asarray(affine, dtype=np.float64)
        zooms = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        return cls(shape, affine, zooms, affine, qform_code, affine, sform_code)

    def allclose(self, other: Geometry, atol: float = AFFINE_ATOL) -> bool:
        """Whether ``other`` has the same shape and an affine equal element-wise within ``atol``."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, rtol=0.0, atol=atol))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.zooms == other.zooms
            and (self.qform_code, self.sform_code) == (other.qform_code, other.sform_code)
            and all(np.array_equal(getattr(self, n), getattr(other, n)) for n in ("affine", "qform", "sform"))
        )

    __hash__ = None  # type: ignore[assignment]



def grid_mismatch(geometry: Geometry, reference: Geometry, *, atol: float = AFFINE_ATOL) -> str | None:
    """How ``geometry`` fails to lie on ``reference``'s voxel grid (a phrase for an error message), or ``None``
    when it has the same shape and an affine equal within ``atol`` per element."""
    if geometry.shape != reference.shape:
        return f"shape {geometry.shape} differs from {reference.shape}"
    if not geometry.allclose(reference, atol=atol):
        worst = float(np.max(np.abs(geometry.affine - reference.affine)))
        return f"affine differs by up to {worst:.3g} (allowed {atol:g} per element)"
    return None


