"""Random training patches from cached cases, with foreground oversampling (as nnU-Net does).

A patch is cut straight out of the memory-mapped cache, so only the voxels of the patch are read. With
probability ``foreground_fraction`` a patch is centred on a tumour voxel: a tumour label present in the case
is picked at random (so rare labels such as enhancing tumour are seen as often as edema), then one of its
stored voxel locations. Otherwise the patch lies uniformly at random in the case. Cases smaller than the
patch are padded with zeros (the z-scored background value) at a random offset.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from training.data.cache import CachedCase


class PatchSampler:
    """An endless stream of random ``(image, label)`` patches.

    Args:
        cases: Cached cases with labels (:func:`training.data.cache.load_cached`).
        patch_size: Three sizes for 3D patches, or two for 2D patches (a random axial slice, i.e. a fixed
            index along the last axis).
        foreground_fraction: Probability that a patch is centred on a tumour voxel.
        seed: Seed of the generator; the stream is the same for the same seed and cases.

    Yields:
        ``(image float32 (4, *patch_size), label uint8 (*patch_size))``.
    """

    def __init__(
        self,
        cases: Sequence[CachedCase],
        *,
        patch_size: Sequence[int],
        foreground_fraction: float = 1 / 3,
        seed: int | None = None,
    ) -> None:
        if not cases:
            raise ValueError("PatchSampler needs at least one case, got none")
        unlabelled = [c.case_id for c in cases if c.label is None]
        if unlabelled:
            raise ValueError(f"PatchSampler needs labelled cases; these have no label: {unlabelled[:10]}")
        patch = tuple(int(p) for p in patch_size)
        if len(patch) not in (2, 3) or any(p < 1 for p in patch):
            raise ValueError(f"patch_size must be 2 or 3 positive sizes, got {tuple(patch_size)!r}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction!r}")
        self.cases = list(cases)
        self.patch_size = patch
        self.spatial_dims = len(patch)
        self.foreground_fraction = float(foreground_fraction)
        self.rng = np.random.default_rng(seed)
        # 2D patches are 3D crops of depth one along the last axis.
        self._crop_size = patch if len(patch) == 3 else (*patch, 1)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.sample()

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """One random patch ``(image float32 (4, *patch_size), label uint8 (*patch_size))``."""
        case = self.cases[self.rng.integers(len(self.cases))]
        shape = case.image.shape[1:]
        centre = None
        if self.rng.random() < self.foreground_fraction:
            centre = self._foreground_voxel(case)
        starts = []
        for axis, (n, p) in enumerate(zip(shape, self._crop_size)):
            low, high = min(0, n - p), max(0, n - p)
            if centre is None:
                starts.append(int(self.rng.integers(low, high + 1)))
            else:
                starts.append(int(np.clip(centre[axis] - p // 2, low, high)))
        image, label = _crop(case, starts, self._crop_size)
        if self.spatial_dims == 2:
            image, label = image[..., 0], label[..., 0]
        return image, label

    def _foreground_voxel(self, case: CachedCase) -> np.ndarray | None:
        present = [k for k in sorted(case.locations) if len(case.locations[k])]
        if not present:
            return None
        coords = case.locations[present[self.rng.integers(len(present))]]
        return coords[self.rng.integers(len(coords))]


def _crop(case: CachedCase, starts: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``size`` voxels from ``starts`` (which may lie outside the case) and pad with zeros."""
    shape = case.image.shape[1:]
    src, dst = [], []
    for start, p, n in zip(starts, size, shape):
        lo, hi = max(start, 0), min(start + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    image = np.zeros((case.image.shape[0], *size), dtype=np.float32)
    label = np.zeros(tuple(size), dtype=np.uint8)
    image[(slice(None), *dst)] = case.image[(slice(None), *src)]
    label[tuple(dst)] = case.label[tuple(src)]
    return image, label
