"""Preprocessing shared by training and inference: crop to the brain, z-score inside it, pad and uncrop.

Images are channel-first ``(C, *spatial)``. Every function returns a new array; none edits its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.core.workers import thread_pool

__all__ = ["STD_FLOOR", "Preprocessed", "mask_bbox", "brain_bbox", "zscore_nonzero", "preprocess", "uncrop", "pad_to"]

STD_FLOOR = 1e-8
"""Smallest standard deviation divided by, so a constant channel maps to zeros instead of NaN."""


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim < 2:
        raise ValueError(f"expected a channel-first image (C, *spatial), got shape {image.shape}")
    return image


def _foreground(image: np.ndarray) -> np.ndarray:
    """Voxels nonzero in any channel, ``(*spatial)`` bool."""
    return np.any(image != 0, axis=0)


def mask_bbox(mask: np.ndarray, *, margin: int = 0) -> tuple[slice, ...]:
    """Bounding box of the nonzero voxels of a mask, grown by ``margin`` voxels and clipped to the array.

    Args:
        mask: ``(*spatial)``, nonzero = inside.
        margin: Voxels added on each side of every axis (at least 0).

    Returns:
        One ``slice(start, stop)`` per axis (stop exclusive); the whole array if no voxel is nonzero.
    """
    mask = np.asarray(mask)
    if margin < 0:
        raise ValueError(f"margin must be at least 0, got {margin}")
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=others))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def brain_bbox(image: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the voxels that are nonzero in any channel.

    Args:
        image: ``(C, *spatial)``.

    Returns:
        One ``slice(start, stop)`` per spatial axis (stop exclusive); the whole volume if no voxel is nonzero.
    """
    return mask_bbox(_foreground(_check_image(image)))


def zscore_nonzero(image: np.ndarray) -> np.ndarray:
    """Z-score each channel over the voxels nonzero in any channel; the other voxels stay 0.

    Args:
        image: ``(C, *spatial)``.

    Returns:
        A new float32 array ``(C, *spatial)``: ``(x - mean) / max(std, 1e-8)`` inside the foreground, where
        mean and (population) std are per channel over the foreground; 0 elsewhere.
    """
    image = _check_image(image)
    fg = _foreground(image)
    out = np.zeros(image.shape, dtype=np.float32)
    if not fg.any():
        return out

    def channel(c: int) -> None:
        values = image[c][fg].astype(np.float32)  # a new array (boolean indexing copies): ours to change
        mean = values.mean(dtype=np.float64)  # statistics accumulate in float64, the arithmetic stays float32
        std = max(float(values.std(dtype=np.float64)), STD_FLOOR)
        values -= np.float32(mean)
        values *= np.float32(1.0 / std)
        out[c][fg] = values

    list(thread_pool().map(channel, range(image.shape[0])))  # NumPy releases the GIL: the channels share the cores
    return out


@dataclass(frozen=True)
class Preprocessed:
    """An image cropped to its brain box and z-scored.

    Attributes:
        data: ``(C, *cropped)`` float32.
        bbox: The crop, one slice per spatial axis of the full image.
        full_shape: Spatial shape of the full image, for :func:`uncrop`.
    """

    data: np.ndarray
    bbox: tuple[slice, ...]
    full_shape: tuple[int, ...]


def preprocess(image: np.ndarray) -> Preprocessed:
    """Crop ``image`` ``(C, *spatial)`` to :func:`brain_bbox`, then :func:`zscore_nonzero` the crop."""
    image = _check_image(image)
    bbox = brain_bbox(image)
    cropped = image[(slice(None), *bbox)]
    return Preprocessed(data=zscore_nonzero(cropped), bbox=bbox, full_shape=tuple(image.shape[1:]))


def uncrop(array: np.ndarray, bbox: Sequence[slice], full_shape: Sequence[int], fill: float = 0) -> np.ndarray:
    """Put a cropped array back into a full grid.

    Args:
        array: ``(..., *cropped)``: any leading axes (channels) followed by the cropped spatial axes.
        bbox: The crop that produced it, one ``slice(start, stop)`` per spatial axis.
        full_shape: The full spatial shape.
        fill: Value outside the crop.

    Returns:
        A new array ``(..., *full_shape)`` of ``array``'s dtype.
    """
    array = np.asarray(array)
    bbox = tuple(bbox)
    full_shape = tuple(int(n) for n in full_shape)
    if len(bbox) != len(full_shape) or array.ndim < len(bbox):
        raise ValueError(
            f"expected one slice per axis of full_shape {full_shape} and an array with at least that many axes, "
            f"got {len(bbox)} slices and an array of shape {array.shape}"
        )
    extents = []
    for s, n in zip(bbox, full_shape):
        start = 0 if s.start is None else s.start
        stop = n if s.stop is None else s.stop
        if s.step not in (None, 1) or not 0 <= start <= stop <= n:
            raise ValueError(f"bbox {bbox} does not lie inside full shape {full_shape}")
        extents.append(stop - start)
    spatial = array.shape[array.ndim - len(bbox) :]
    if tuple(extents) != spatial:
        raise ValueError(f"array spatial shape {spatial} does not match the bbox extents {tuple(extents)}")
    out = np.full(array.shape[: array.ndim - len(bbox)] + full_shape, fill, dtype=array.dtype)
    out[(..., *bbox)] = array
    return out


def pad_to(array: np.ndarray, min_shape: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad the spatial axes of ``array`` symmetrically up to at least ``min_shape``.

    The smaller half of an odd padding goes before the data. Axes already large enough are left alone.

    Args:
        array: ``(C, *spatial)``.
        min_shape: One minimum size per spatial axis.

    Returns:
        ``(padded, crop)``: a new array ``(C, *padded_spatial)`` and one slice per axis of ``array``, the
        channel axis first as ``slice(None)``, so that ``padded[crop]`` (or the same crop applied to any
        ``(K, *padded_spatial)`` output, whatever ``K``) gives back the original extent.
    """
    array = _check_image(array)
    spatial = array.shape[1:]
    min_shape = tuple(int(m) for m in min_shape)
    if len(min_shape) != len(spatial):
        raise ValueError(f"expected {len(spatial)} minimum sizes for spatial shape {spatial}, got {min_shape}")
    widths = [(0, 0)]
    crop = [slice(None)]
    for size, minimum in zip(spatial, min_shape):
        total = max(0, minimum - size)
        before = total // 2
        widths.append((before, total - before))
        crop.append(slice(before, before + size))
    return np.pad(array, widths, mode="constant", constant_values=0), tuple(crop)
