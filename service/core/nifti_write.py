"""NIfTI output that carries a case's geometry and nothing else.

Outputs carry only geometry: shape, affine, qform and sform with their codes, and voxel sizes. Free-text
fields (``descrip``, ``aux_file``, ``intent_name``, ``db_name``) stay empty and no header extension is
written, since an input's free text can hold patient data. ``.gz`` outputs are gzip members without a name
or a time.
"""

from __future__ import annotations

import os
from typing import Union

import nibabel as nib
import numpy as np

from service.core.files import atomic_write
from service.core.geometry import Geometry

try:  # zlib-ng: the gzip format, about 6x faster deflating than zlib
    from zlib_ng import gzip_ng as gzip
except ImportError:  # pragma: no cover - a platform without zlib-ng wheels
    import gzip

__all__ = ["mask_image", "mask_to_bytes", "save_mask", "save_image"]

PathLike = Union[str, "os.PathLike[str]"]

_NIFTI1_MAX_DIM = 32767
_FREE_TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name")


def _fresh_header(geometry: Geometry, shape: tuple[int, ...], dtype: np.dtype) -> nib.Nifti1Header:
    """A new header holding only the geometry (and shape/type): no free text, no extensions."""
    big = max(shape) > _NIFTI1_MAX_DIM
    header = nib.Nifti2Header() if big else nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(geometry.qform, code=geometry.qform_code)
    header.set_sform(geometry.sform, code=geometry.sform_code)
    header.set_zooms(tuple(geometry.zooms) + (1.0,) * (len(shape) - 3))
    header.set_xyzt_units(xyz="mm")
    for field in _FREE_TEXT_FIELDS:
        if field in header.keys():
            header[field] = b""
    return header


def _image(data: np.ndarray, geometry: Geometry) -> nib.Nifti1Image:
    header = _fresh_header(geometry, data.shape, data.dtype)
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    return klass(data, header.get_best_affine(), header=header)


def _check_spatial(shape: tuple[int, ...], geometry: Geometry, what: str) -> None:
    if tuple(shape) != geometry.shape:
        raise ValueError(f"{what} has spatial shape {tuple(shape)} but the geometry is {geometry.shape}")


def mask_image(mask: np.ndarray, geometry: Geometry) -> nib.Nifti1Image:
    """A uint8 NIfTI image of ``mask`` ``(X, Y, Z)`` on ``geometry`` with a fresh, geometry-only header.

    Raises:
        ValueError: shape differs from the geometry, or values are not whole numbers in 0..255.
    """
    mask = np.asarray(mask)
    _check_spatial(mask.shape, geometry, "mask")
    if mask.dtype != np.uint8:
        if mask.dtype.kind not in "biuf":
            raise ValueError(f"expected a numeric or boolean mask, got dtype {mask.dtype}")
        if mask.dtype.kind == "f" and not np.array_equal(mask, np.round(mask)):
            raise ValueError("expected mask values that are whole numbers in 0..255, got fractional values")
        if mask.dtype.kind != "b" and mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"expected mask values in 0..255, got {mask.min()}..{mask.max()}")
        mask = mask.astype(np.uint8)
    return _image(np.array(mask, dtype=np.uint8), geometry)


def mask_to_bytes(mask: np.ndarray, geometry: Geometry, *, compresslevel: int = 3) -> bytes:
    """The mask as ``.nii.gz`` bytes (see :func:`mask_image`); the gzip header holds no name or time."""
    return gzip.compress(mask_image(mask, geometry).to_bytes(), compresslevel=compresslevel, mtime=0)


def _encode(img: nib.Nifti1Image, path: PathLike, compresslevel: int) -> bytes:
    payload = img.to_bytes()
    if os.fspath(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=compresslevel, mtime=0)
    return payload


def save_mask(mask: np.ndarray, geometry: Geometry, path: PathLike, *, compresslevel: int = 3) -> None:
    """Write the mask (see :func:`mask_image`) atomically; gzip-compressed when ``path`` ends in ``.gz``."""
    atomic_write(path, _encode(mask_image(mask, geometry), path, compresslevel))


def save_image(
    image: np.ndarray,
    geometry: Geometry,
    path: PathLike,
    *,
    dtype: np.dtype | type = np.float32,
    compresslevel: int = 3,
) -> None:
    """Write a volume ``(X, Y, Z)`` or channel-first ``(C, X, Y, Z)`` (stored as ``(X, Y, Z, C)``) atomically.

    Same header rules as :func:`mask_image`; voxels are stored as ``dtype`` (float32 by default).
    """
    image = np.asarray(image)
    if image.ndim == 4:
        _check_spatial(image.shape[1:], geometry, "image")
        image = np.moveaxis(image, 0, -1)
    elif image.ndim == 3:
        _check_spatial(image.shape, geometry, "image")
    else:
        raise ValueError(f"expected an image (X, Y, Z) or (C, X, Y, Z), got shape {image.shape}")
    data = np.array(image, dtype=dtype)
    atomic_write(path, _encode(_image(data, geometry), path, compresslevel))
