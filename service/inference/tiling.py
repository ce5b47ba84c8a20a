"""Sliding-window inference as small pure parts: tile steps, a Gaussian weight map, tiles, an aggregator.

Pure numpy; the predictor is any callable mapping a float32 batch ``(B, C, *patch)`` to ``(B, K, *patch)``.
Tiles are placed as nnU-Net v2 places them (``compute_steps_for_sliding_window``): the number of tiles per
axis follows from the overlap, and the tiles are spread evenly so that the first starts at 0 and the last
ends exactly at the border. The Gaussian weight map is MONAI's (``compute_importance_map``: centred at
``(p - 1) / 2``, sigma ``p * sigma_scale``), normalised to a maximum of 1 with zeros replaced by the
smallest nonzero weight as nnU-Net does. Being symmetric, it weighs a mirrored volume mirror-symmetrically,
which test-time augmentation by flips relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from typing import Callable, Sequence

import numpy as np

from service.core.preprocess import pad_to

Predictor = Callable[[np.ndarray], np.ndarray]


def _check_sizes(image_size: Sequence[int], patch_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    image_size = tuple(int(s) for s in image_size)
    patch_size = tuple(int(s) for s in patch_size)
    if len(image_size) != len(patch_size):
        raise ValueError(f"image size {list(image_size)} and patch size {list(patch_size)} differ in dimensions")
    if any(p < 1 for p in patch_size):
        raise ValueError(f"patch size must be positive along every axis, got {list(patch_size)}")
    return image_size, patch_size


def _check_overlap(overlap: float) -> float:
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return float(overlap)


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int], overlap: float = 0.5) -> list[list[int]]:
    """Start index of the tiles along each axis, nnU-Net style.

    The target step is ``patch * (1 - overlap)`` voxels (at least 1); the number of tiles per axis is
    ``ceil((image - patch) / target_step) + 1`` and the tiles are spread evenly between 0 and
    ``image - patch``, so the last tile ends exactly at the border.

    Args:
        image_size: spatial size ``(*spatial)``; every axis at least the patch size.
        patch_size: tile size ``(*spatial)``.
        overlap: wanted fraction of a tile shared with its neighbour, in ``[0, 1)``.

    Returns:
        One list of sorted, distinct start indices per axis.
    """
    image_size, patch_size = _check_sizes(image_size, patch_size)
    overlap = _check_overlap(overlap)
    if any(i < p for i, p in zip(image_size, patch_size)):
        raise ValueError(
            f"image size {list(image_size)} is smaller than patch size {list(patch_size)}; pad it first"
        )
    steps = []
    for size, patch in zip(image_size, patch_size):
        target = max(patch * (1.0 - overlap), 1.0)
        num = int(math.ceil((size - patch) / target)) + 1
        if num == 1:
            steps.append([0])
            continue
        actual = (size - patch) / (num - 1)
        steps.append([int(round(actual * i)) for i in range(num)])
    return steps


@lru_cache(maxsize=8)
def _gaussian(patch_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    weight = np.ones((), dtype=np.float64)
    for axis, size in enumerate(patch_size):
        x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        g = np.exp(-(x**2) / (2.0 * (size * sigma_scale) ** 2))
        weight = weight[..., None] * g if axis else g
    weight = (weight / weight.max()).astype(np.float32)
    zero = weight == 0
    if zero.any():
        weight[zero] = weight[~zero].min()
    weight.setflags(write=False)
    return weight


def gaussian_weight(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Gaussian importance map for blending overlapping tiles (cached, read-only).

    Args:
        patch_size: tile size ``(*patch)``.
        sigma_scale: sigma along each axis as a fraction of the patch size.

    Returns:
        Read-only float32 array ``(*patch)`` with maximum 1 and no zeros.
    """
    patch_size = tuple(int(s) for s in patch_size)
    if not patch_size or any(s < 1 for s in patch_size):
        raise ValueError(f"patch size must be positive along every axis, got {list(patch_size)}")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale}")
    return _gaussian(patch_size, float(sigma_scale))


@dataclass(frozen=True)
class Tile:
    """Where one tile lies: one slice per spatial axis."""

    slices: tuple[slice, ...]

    @property
    def start(self) -> tuple[int, ...]:
        return tuple(s.start for s in self.slices)


def iter_tiles(image_shape: Sequence[int], patch_size: Sequence[int], overlap: float = 0.5) -> list[Tile]:
    """All tiles covering ``image_shape`` (spatial), in C order of their start indices."""
    steps = compute_steps(image_shape, patch_size, overlap)
    patch_size = tuple(int(p) for p in patch_size)
    return [
        Tile(tuple(slice(s, s + p) for s, p in zip(start, patch_size))) for start in product(*steps)
    ]


class Aggregator:
    """Blends tile predictions into a whole volume: weighted sum and weight sum, both float32.

    Args:
        num_channels: ``K``, channels of each prediction.
        spatial_shape: spatial size of the whole volume.
        patch_size: tile size; every prediction is ``(K, *patch_size)``.
        gaussian: weigh each tile by :func:`gaussian_weight` (else all voxels weigh 1).
        sigma_scale: see :func:`gaussian_weight`.
    """

    def __init__(
        self,
        *,
        num_channels: int,
        spatial_shape: Sequence[int],
        patch_size: Sequence[int],
        gaussian: bool = True,
        sigma_scale: float = 1 / 8,
    ) -> None:
        spatial_shape, patch_size = _check_sizes(spatial_shape, patch_size)
        if num_channels < 1:
            raise ValueError(f"num_channels must be at least 1, got {num_channels}")
        self.num_channels = int(num_channels)
        self.spatial_shape = spatial_shape
        self.patch_size = patch_size
        if gaussian:
            self._weight = gaussian_weight(patch_size, sigma_scale)
        else:
            self._weight = np.ones(patch_size, dtype=np.float32)
        self._sum = np.zeros((self.num_channels, *spatial_shape), dtype=np.float32)
        self._weight_sum = np.zeros(spatial_shape, dtype=np.float32)
        self._buffer = np.empty((self.num_channels, *patch_size), dtype=np.float32)

    def add(self, tile: Tile, prediction: np.ndarray) -> None:
        """Add one tile's prediction ``(K, *patch)``, weighted."""
        if prediction.shape != self._buffer.shape:
            raise ValueError(f"expected a prediction of shape {self._buffer.shape}, got {prediction.shape}")
        sizes = tuple(s.stop - s.start for s in tile.slices)
        if sizes != self.patch_size or any(
            s.start < 0 or s.stop > n for s, n in zip(tile.slices, self.spatial_shape)
        ):
            raise ValueError(
                f"tile {tile.slices} is not a {list(self.patch_size)} patch inside {list(self.spatial_shape)}"
            )
        np.multiply(prediction, self._weight, out=self._buffer)
        self._sum[(slice(None), *tile.slices)] += self._buffer
        self._weight_sum[tile.slices] += self._weight

    def get(self) -> np.ndarray:
        """The weighted average ``(K, *spatial)`` float32 (a new array)."""
        if not self._weight_sum.all():
            raise ValueError(f"{int((self._weight_sum == 0).sum())} voxels are not covered by any tile")
        return self._sum / self._weight_sum


def sliding_window(
    image: np.ndarray,
    predictor: Predictor,
    *,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 1,
    gaussian: bool = True,
    sigma_scale: float = 1 / 8,
) -> np.ndarray:
    """Predict a whole volume tile by tile.

    An image smaller than the patch along any axis is zero-padded (``pad_to``) and the result cropped back.

    Args:
        image: ``(C, *spatial)``; read, never written.
        predictor: maps a float32 batch ``(B, C, *patch)``, ``B <= batch_size``, to ``(B, K, *patch)``.
        patch_size: tile size ``(*patch)``, one entry per spatial axis.
        overlap: fraction of a tile shared with its neighbour, in ``[0, 1)``.
        batch_size: tiles per predictor call.
        gaussian: blend with :func:`gaussian_weight` (else a plain average).
        sigma_scale: see :func:`gaussian_weight`.

    Returns:
        New float32 array ``(K, *spatial)``.
    """
    image = np.asarray(image)
    patch_size = tuple(int(p) for p in patch_size)
    if image.ndim != len(patch_size) + 1:
        raise ValueError(
            f"expected an image (C, *spatial) with {len(patch_size)} spatial axes for patch size "
            f"{list(patch_size)}, got shape {image.shape}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    _check_overlap(overlap)
    spatial = image.shape[1:]
    crop: tuple[slice, ...] | None = None
    if any(s < p for s, p in zip(spatial, patch_size)):
        image, crop = pad_to(image, patch_size)  # crop starts with slice(None) for the channels
    tiles = iter_tiles(image.shape[1:], patch_size, overlap)
    aggregator: Aggregator | None = None
    for first in range(0, len(tiles), batch_size):
        batch_tiles = tiles[first : first + batch_size]
        batch = np.empty((len(batch_tiles), image.shape[0], *patch_size), dtype=np.float32)
        for i, tile in enumerate(batch_tiles):
            batch[i] = image[(slice(None), *tile.slices)]
        out = np.asarray(predictor(batch))
        if out.ndim != batch.ndim or out.shape[0] != len(batch_tiles) or out.shape[2:] != patch_size:
            raise ValueError(
                f"predictor must map a batch {batch.shape} to (B, K, {', '.join(map(str, patch_size))}) "
                f"with B = {len(batch_tiles)}, got {out.shape}"
            )
        if aggregator is None:
            aggregator = Aggregator(
                num_channels=out.shape[1],
                spatial_shape=image.shape[1:],
                patch_size=patch_size,
                gaussian=gaussian,
                sigma_scale=sigma_scale,
            )
        for tile, prediction in zip(batch_tiles, out):
            aggregator.add(tile, prediction)
    assert aggregator is not None  # at least one tile always exists
    result = aggregator.get()
    if crop is not None:
        result = np.ascontiguousarray(result[crop])
    return result
