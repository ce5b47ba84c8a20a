"""The anatomy of a synthetic case: MNI152 tissue templates warped onto the case grid, and landmarks.

The templates are the MNI152 2009 (ICBM 152 non-linear symmetric 09a) T1, grey-matter and white-matter images
that ship inside nilearn's wheel (package data, no download). The brain is the skull-stripped template above
0.2, as nilearn's own ``load_mni152_brain_mask``; CSF is the brain minus grey and white matter.

Landmarks (:func:`landmarks`) are point sets in template world coordinates (mm) where tumours and non-tumour
findings are placed: deep white matter, the ventricles, the cortical surface and the dural sinuses. A case maps
them through its own random affine, so every case gets them at its own anatomy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

_BRAIN_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask threshold on the T1 template


# --------------------------------------------------------------------------------------------------------
# Template (loaded once per process)


@dataclass(frozen=True)
class _Template:
    tissue: np.ndarray  # (3, X, Y, Z) float32 fractions of GM, WM, CSF; they sum to the brain mask
    affine: np.ndarray  # voxel -> world (mm), RAS


@functools.lru_cache(maxsize=1)
def mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, GM and WM templates (float32, 1 mm) and their affine, from nilearn's package data."""
    from nilearn import datasets  # slow import (about 1 s): only when a case is made

    t1_img = datasets.load_mni152_template(resolution=1)
    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm_img = datasets.load_mni152_wm_template(resolution=1)
    for name, img in (("GM", gm_img), ("WM", wm_img)):
        if img.shape != t1_img.shape or not np.allclose(img.affine, t1_img.affine):
            raise ValueError(f"nilearn's MNI152 {name} template does not lie on the T1 template's grid")
    t1, gm, wm = (np.asarray(img.get_fdata(dtype=np.float32)) for img in (t1_img, gm_img, wm_img))
    return t1, gm, wm, np.asarray(t1_img.affine, dtype=np.float64)


@functools.lru_cache(maxsize=1)
def brain_extent() -> tuple[np.ndarray, np.ndarray]:
    """World centre ``(3,)`` and corners ``(8, 3)`` of the template brain's bounding box (mm)."""
    t1, _, _, affine = mni152()
    idx = np.nonzero(t1 > _BRAIN_THRESHOLD)
    lo = np.array([i.min() for i in idx], dtype=np.float64)
    hi = np.array([i.max() for i in idx], dtype=np.float64)
    corners_vox = np.array([[(lo, hi)[b][a] for a, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
    return apply_affine(affine, (lo + hi) / 2), apply_affine(affine, corners_vox)


@functools.lru_cache(maxsize=4)
def _template(factor: tuple[int, int, int]) -> _Template:
    """Tissue fractions of the template, block-averaged by ``factor`` voxels per axis (anti-aliasing)."""
    t1, gm, wm, affine = mni152()
    brain = (t1 > _BRAIN_THRESHOLD).astype(np.float32)
    gm = np.clip(gm, 0.0, 1.0) * brain
    wm = np.clip(wm, 0.0, 1.0) * brain
    total = gm + wm
    over = np.maximum(total, 1.0)
    gm, wm = gm / over, wm / over
    tissue = np.stack([gm, wm, brain - gm - wm]).astype(np.float32)

    f = np.asarray(factor)
    if np.any(f > 1):
        n = np.array(tissue.shape[1:]) // f
        tissue = tissue[:, : n[0] * f[0], : n[1] * f[1], : n[2] * f[2]]
        tissue = tissue.reshape(3, n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(2, 4, 6), dtype=np.float32)
        scale = np.eye(4)
        scale[:3, :3] = np.diag(f)
        scale[:3, 3] = (f - 1) / 2
        affine = affine @ scale
    return _Template(np.ascontiguousarray(tissue), affine)


@functools.lru_cache(maxsize=1)
def tumour_sites() -> tuple[np.ndarray, np.ndarray]:
    """World positions (N, 3) of supratentorial white-matter voxels (2 mm grid) and their depth in mm."""
    tpl = _template((2, 2, 2))
    brain = tpl.tissue.sum(axis=0) > 0.5
    zooms = np.sqrt((tpl.affine[:3, :3] ** 2).sum(axis=0))
    depth = ndi.distance_transform_edt(brain, sampling=zooms)
    wm = tpl.tissue[1] > 0.6 * np.maximum(tpl.tissue.sum(axis=0), 1e-6)
    pick = wm & (depth >= 12.0)
    vox = np.argwhere(pick).astype(np.float64)
    world = apply_affine(tpl.affine, vox)
    keep = world[:, 2] > -10.0  # above the tentorium, roughly: gliomas are mostly supratentorial
    return world[keep], depth[pick][keep]


@dataclass(frozen=True)
class Landmarks:
    """Point sets ``(N, 3)`` in template world coordinates (mm, 2 mm grid) where findings are placed."""

    ventricles: np.ndarray  # CSF deep inside the brain: the lateral and third ventricles
    atria: np.ndarray  # the posterior bodies and atria of the lateral ventricles (largest choroid plexus)
    surface: np.ndarray  # the outer surface of the brain, where cortical veins run
    sinuses: np.ndarray  # the brain's edge along the superior sagittal sinus and the transverse sinuses


@functools.lru_cache(maxsize=1)
def landmarks() -> Landmarks:
    """The template's :class:`Landmarks` (computed once per process)."""
    tpl = _template((2, 2, 2))
    total = tpl.tissue.sum(axis=0)
    brain = total > 0.5
    zooms = np.sqrt((tpl.affine[:3, :3] ** 2).sum(axis=0))
    depth = ndi.distance_transform_edt(brain, sampling=zooms)
    csf = tpl.tissue[2] > 0.6 * np.maximum(total, 1e-6)
    ventricles = apply_affine(tpl.affine, np.argwhere(brain & csf & (depth >= 14.0)).astype(np.float64))
    x, y, z = ventricles.T
    ventricles = ventricles[(np.abs(x) < 35.0) & (y > -50.0) & (y < 35.0) & (z > -12.0) & (z < 40.0)]
    x, y = ventricles[:, 0], ventricles[:, 1]
    atria = ventricles[(y < -15.0) & (y > -50.0) & (np.abs(x) > 8.0)]
    edge = brain & ~ndi.binary_erosion(brain)
    surface = apply_affine(tpl.affine, np.argwhere(edge).astype(np.float64))
    sx, sy, sz = surface.T
    # Superior sagittal sinus: the top of the brain along the midline, front to back.
    midline = surface[(np.abs(sx) < 4.0) & (sz > 0.0)]
    top = []
    for yy in np.unique(np.round(midline[:, 1])):
        column = midline[np.round(midline[:, 1]) == yy]
        top.append(column[np.argmax(column[:, 2])])
    # Transverse sinuses: the lower back of the occipital lobes.
    transverse = surface[(sy < -70.0) & (sz < 0.0) & (sz > -30.0) & (np.abs(sx) > 10.0)]
    sinuses = np.concatenate([np.asarray(top).reshape(-1, 3), transverse])
    return Landmarks(ventricles=ventricles, atria=atria, surface=surface, sinuses=sinuses)


# --------------------------------------------------------------------------------------------------------
# Small helpers


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points ``(..., 3)``."""
    return points @ affine[:3, :3].T + affine[:3, 3]


def _rotation(angles_rad: Sequence[float]) -> np.ndarray:
    """Rotation matrix from angles about x, y and z (radians)."""
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def soft_step(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def smooth_noise(
    rng: np.random.Generator, shape: Sequence[int], spacing: np.ndarray, corr_mm: float
) -> np.ndarray:
    """Smooth random field over ``shape`` (about zero mean, unit standard deviation), features of ``corr_mm``."""
    step = max(corr_mm / 2.0, 0.5)
    coarse_shape = np.maximum(np.ceil(np.asarray(shape) * spacing / step).astype(int) + 3, 4)
    coarse = ndi.gaussian_filter(rng.standard_normal(tuple(coarse_shape)), 1.0, mode="wrap")
    coarse = (coarse - coarse.mean()) / max(float(coarse.std()), 1e-6)
    coords = [np.linspace(1.0, n - 2.0, s) for n, s in zip(coarse_shape, shape)]
    # Separable linear interpolation: cheap, and the coarse field is already smooth.
    out = coarse.astype(np.float32)
    for axis, c in enumerate(coords):
        i0 = np.floor(c).astype(int)
        w = (c - i0).astype(np.float32)
        shape_w = [1] * 3
        shape_w[axis] = len(c)
        w = w.reshape(shape_w)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i0 + 1, axis=axis) * w
    return out.astype(np.float32)


def grid_affine(size: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Voxel-to-world affine of a synthetic grid: ``diag(-sx, -sy, sz)`` with the brain centred on the grid."""
    size_a, spacing_a = check_grid(size, spacing)
    centre, _ = brain_extent()
    affine = np.diag([-spacing_a[0], -spacing_a[1], spacing_a[2], 1.0])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(size_a, dtype=np.float64) - 1) / 2)
    return affine


def check_grid(size: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, int, int], np.ndarray]:
    size_t = tuple(size)
    if len(size_t) != 3 or not all(isinstance(s, (int, np.integer)) and s >= 8 for s in size_t):
        raise ValueError(f"size must be 3 integers >= 8 (voxels along X, Y, Z), got {size!r}")
    spacing_a = np.asarray(spacing, dtype=np.float64)
    if spacing_a.shape != (3,) or not np.all(np.isfinite(spacing_a)) or np.any(spacing_a <= 0):
        raise ValueError(f"spacing must be 3 finite positive numbers (mm), got {spacing!r}")
    return tuple(int(s) for s in size_t), spacing_a


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a dataset generated with ``seed`` (independent of the other cases)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0])


# --------------------------------------------------------------------------------------------------------
# Anatomy


def warp_anatomy(
    rng: np.random.Generator, size: tuple[int, int, int], spacing: np.ndarray, out_affine: np.ndarray
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """Warp the template tissue fractions onto the case grid with a random affine.

    Returns:
        The brain's bounding box on the grid, the tissue fractions ``(3, *box)`` float32 (GM, WM, CSF) and the
        4x4 template-world -> case-world transform.
    """
    factor = tuple(int(max(1, math.floor(s + 1e-6))) for s in spacing)
    tpl = _template(factor)
    scale = rng.uniform(0.94, 1.04) * rng.uniform(0.97, 1.03, size=3)
    rot = _rotation(np.deg2rad(rng.uniform(-6.0, 6.0, size=3)))
    shift = rng.uniform(-4.0, 4.0, size=3)
    linear = rot @ np.diag(scale)
    to_case = np.eye(4)
    to_case[:3, :3] = linear
    centre, corners = brain_extent()
    to_case[:3, 3] = centre + shift - linear @ centre

    corners = apply_affine(np.linalg.inv(out_affine) @ to_case, corners)
    lo = np.clip(np.floor(corners.min(axis=0)).astype(int) - 2, 0, np.asarray(size))
    hi = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 3, 0, np.asarray(size))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    box_shape = tuple(int(b - a) for a, b in zip(lo, hi))

    pull = np.linalg.inv(tpl.affine) @ np.linalg.inv(to_case) @ out_affine  # case voxel -> template voxel
    matrix = pull[:3, :3]
    offset = matrix @ lo + pull[:3, 3]
    tissue = np.empty((3, *box_shape), dtype=np.float32)
    for c in range(3):
        ndi.affine_transform(
            tpl.tissue[c], matrix, offset=offset, output_shape=box_shape, output=tissue[c], order=1, cval=0.0
        )
    np.clip(tissue, 0.0, 1.0, out=tissue)
    return box, tissue, to_case


