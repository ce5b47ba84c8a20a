"""Synthetic BraTS 2020-like cases built on real anatomy, for when BraTS itself cannot be downloaded.

The anatomy comes from the MNI152 2009 (ICBM 152 non-linear symmetric 09a) T1, grey-matter and
white-matter templates that ship inside nilearn's wheel (package data, no download). Each case:

1. takes the template tissue fractions (grey matter, white matter, CSF = brain minus both; the brain is the
   skull-stripped template above 0.2, as nilearn's own ``load_mni152_brain_mask``), and resamples them once,
   with a small random affine (scaling, rotation, shift), onto the BraTS grid (240 x 240 x 155 at 1 mm by
   default, axes L-P-S like BraTS, brain centred);
2. grows one tumour (sometimes two): an irregular core (union of rotated ellipsoids plus smooth noise,
   10-28 mm), mostly centred in white matter and inside the brain; an enhancing rim (label 4, 2-5 mm) around
   necrosis (label 1), or a thick enhancing mass with little necrosis, or a non-enhancing solid core
   (label 1 only); and edema (label 2) 5-20 mm beyond the core, reaching further along white matter than into
   cortex, never into CSF or outside the brain;
3. synthesises FLAIR, T1, T1ce and T2 from the tissue and tumour fractions (partial volumes at the edges),
   with per-case jitter of the contrasts, a smooth multiplicative bias field per modality, Rician noise and
   an arbitrary intensity scale per modality; everything outside the brain is exactly 0 (skull-stripped).

Relative intensities (white matter = 1; see :data:`INTENSITIES`): T1 WM > GM > CSF; T2 CSF > GM > WM;
FLAIR CSF dark, GM > WM; edema bright on FLAIR and T2, a little dark on T1; necrosis dark on T1/T1ce and
bright on T2; the enhancing rim is the brightest thing on T1ce.

Everything is deterministic given the seed (a :class:`numpy.random.Generator` per case), and case ``i`` of a
dataset uses :func:`case_seed` ``(seed, i)``, so any case can be regenerated alone.

:func:`generate_dataset` writes cases to disk in the BraTS 2020 or MSD layout and marks the folder as synthetic
(``SYNTHETIC.json``, :mod:`training.data.provenance`), so that a model trained on it says so in its card. From
the command line: ``python -m training synth OUT [--cases 10] [--layout brats2020|msd] [--seed 0]
[--size 240,240,155] [--spacing 1,1,1] [--start-index 1]``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from service.core.files import atomic_write
from service.core.labels import MODALITIES, brats_to_msd
from service.core.nifti import Geometry, save_image, save_mask
from training.data.provenance import mark_synthetic

logger = logging.getLogger(__name__)

BRATS_DIR = "MICCAI_BraTS2020_TrainingData"
MSD_DIR = "Task01_BrainTumour"
LAYOUTS: tuple[str, ...] = ("brats2020", "msd")
DEFAULT_SIZE: tuple[int, int, int] = (240, 240, 155)
DEFAULT_SPACING: tuple[float, float, float] = (1.0, 1.0, 1.0)

# Relative intensities, white matter = 1, in MODALITIES order (flair, t1, t1ce, t2). Each case jitters them.
INTENSITIES: dict[str, tuple[float, float, float, float]] = {
    "csf": (0.30, 0.30, 0.35, 2.60),
    "gm": (1.25, 0.72, 0.78, 1.35),
    "wm": (1.00, 1.00, 1.00, 1.00),
    "edema": (2.10, 0.76, 0.80, 1.95),
    "necrosis": (1.00, 0.36, 0.40, 2.30),  # FLAIR of necrosis varies a lot between cases (0.6-1.5)
    "enhancing": (1.50, 0.80, 2.10, 1.50),
    "solid": (1.70, 0.66, 0.72, 1.80),  # non-enhancing solid tumour
}
TISSUE_CLASSES: dict[int, str] = {0: "background", 1: "csf", 2: "gm", 3: "wm"}
"""Values of :attr:`SyntheticCase.tissue` (dominant tissue per voxel)."""

_BRAIN_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask threshold on the T1 template
_INT16_MAX = 32000.0


@dataclass(frozen=True)
class SyntheticCase:
    """One synthetic case.

    Attributes:
        image: ``(4, X, Y, Z)`` float32 in MODALITIES order; whole numbers (so int16 files are lossless),
            at least 1 inside the brain and exactly 0 outside.
        label: ``(X, Y, Z)`` uint8 with BraTS 2020 values {0, 1, 2, 4}.
        affine: 4x4 voxel-to-world (mm) matrix, ``diag(-sx, -sy, sz)`` (L-P-S axes like BraTS) with the brain
            centred on the grid and world coordinates close to MNI millimetres.
        tissue: ``(X, Y, Z)`` uint8 dominant healthy tissue per voxel (see :data:`TISSUE_CLASSES`), 0 outside
            the brain; under the tumour it is the tissue the tumour replaced.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray


# --------------------------------------------------------------------------------------------------------
# Template (loaded once per process)


@dataclass(frozen=True)
class _Template:
    tissue: np.ndarray  # (3, X, Y, Z) float32 fractions of GM, WM, CSF; they sum to the brain mask
    affine: np.ndarray  # voxel -> world (mm), RAS


@functools.lru_cache(maxsize=1)
def _mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
def _brain_extent() -> tuple[np.ndarray, np.ndarray]:
    """World centre ``(3,)`` and corners ``(8, 3)`` of the template brain's bounding box (mm)."""
    t1, _, _, affine = _mni152()
    idx = np.nonzero(t1 > _BRAIN_THRESHOLD)
    lo = np.array([i.min() for i in idx], dtype=np.float64)
    hi = np.array([i.max() for i in idx], dtype=np.float64)
    corners_vox = np.array([[(lo, hi)[b][a] for a, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
    return _apply(affine, (lo + hi) / 2), _apply(affine, corners_vox)


@functools.lru_cache(maxsize=4)
def _template(factor: tuple[int, int, int]) -> _Template:
    """Tissue fractions of the template, block-averaged by ``factor`` voxels per axis (anti-aliasing)."""
    t1, gm, wm, affine = _mni152()
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
def _tumour_sites() -> tuple[np.ndarray, np.ndarray]:
    """World positions (N, 3) of supratentorial white-matter voxels (2 mm grid) and their depth in mm."""
    tpl = _template((2, 2, 2))
    brain = tpl.tissue.sum(axis=0) > 0.5
    zooms = np.sqrt((tpl.affine[:3, :3] ** 2).sum(axis=0))
    depth = ndi.distance_transform_edt(brain, sampling=zooms)
    wm = tpl.tissue[1] > 0.6 * np.maximum(tpl.tissue.sum(axis=0), 1e-6)
    pick = wm & (depth >= 12.0)
    vox = np.argwhere(pick).astype(np.float64)
    world = _apply(tpl.affine, vox)
    keep = world[:, 2] > -10.0  # above the tentorium, roughly: gliomas are mostly supratentorial
    return world[keep], depth[pick][keep]


# --------------------------------------------------------------------------------------------------------
# Small helpers


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points ``(..., 3)``."""
    return points @ affine[:3, :3].T + affine[:3, 3]


def _rotation(angles_rad: Sequence[float]) -> np.ndarray:
    """Rotation matrix from angles about x, y and z (radians)."""
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def _smooth_noise(
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
    size_a, spacing_a = _check_grid(size, spacing)
    centre, _ = _brain_extent()
    affine = np.diag([-spacing_a[0], -spacing_a[1], spacing_a[2], 1.0])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(size_a, dtype=np.float64) - 1) / 2)
    return affine


def _check_grid(size: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, int, int], np.ndarray]:
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


def _anatomy(
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
    centre, corners = _brain_extent()
    to_case[:3, 3] = centre + shift - linear @ centre

    corners = _apply(np.linalg.inv(out_affine) @ to_case, corners)
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


# --------------------------------------------------------------------------------------------------------
# Tumour


@dataclass(frozen=True)
class _Focus:
    centre: np.ndarray  # voxel coordinates within the brain box
    radius: float  # mm
    edema: float  # mm beyond the core
    kind: str  # "necrotic", "solid_enhancing" or "non_enhancing"
    rim: float  # mm of enhancing rim (for "solid_enhancing": depth beyond which necrosis starts)


@dataclass
class _Lesion:
    box: tuple[slice, ...]  # within the brain box
    core: np.ndarray  # bool
    inner: np.ndarray  # bool, the part of the core deeper than the rim
    edema: np.ndarray  # bool, outside the core
    core_w: np.ndarray  # soft core fraction
    inner_w: np.ndarray  # soft fraction of the core that is inner
    edema_w: np.ndarray  # edema strength
    texture: np.ndarray  # (2, *box) smooth noise for heterogeneity
    kind: str


def _draw_foci(
    rng: np.random.Generator,
    to_box_voxel: np.ndarray,
    box_shape: tuple[int, ...],
) -> list[_Focus]:
    """Draw one tumour focus (two in 10% of cases) centred in deep white matter of the deformed anatomy."""
    sites, depth = _tumour_sites()
    n_foci = 2 if rng.random() < 0.1 else 1
    foci: list[_Focus] = []
    placed: list[tuple[np.ndarray, float]] = []  # world centre and radius of the foci drawn so far
    for k in range(n_foci):
        radius = float(rng.uniform(10.0, 28.0) if k == 0 else rng.uniform(7.0, 14.0))
        need = depth >= 0.85 * radius + 4.0
        for other_centre, other_radius in placed:
            need &= np.linalg.norm(sites - other_centre, axis=1) >= other_radius + radius + 12.0
        candidates = np.flatnonzero(need)
        if candidates.size == 0:
            candidates = np.array([int(np.argmax(depth))])
        world = sites[rng.choice(candidates)] + rng.uniform(-1.0, 1.0, size=3)
        placed.append((world, radius))
        centre = _apply(to_box_voxel, world)
        if np.any(centre < 0) or np.any(centre > np.asarray(box_shape) - 1):
            continue  # outside the (cropped) grid: no tumour there
        u = rng.random()
        if k > 0:
            kind = "necrotic" if u < 0.4 else ("solid_enhancing" if u < 0.85 else "non_enhancing")
        else:
            kind = "necrotic" if u < 0.68 else ("solid_enhancing" if u < 0.85 else "non_enhancing")
        rim = float(rng.uniform(2.0, 5.0)) if kind != "solid_enhancing" else float(rng.uniform(5.0, 9.0))
        foci.append(_Focus(centre, radius, float(rng.uniform(5.0, 20.0)), kind, rim))
    return foci


def _core_shape(
    rng: np.random.Generator, focus: _Focus, box: tuple[slice, ...], spacing: np.ndarray
) -> np.ndarray:
    """Irregular core: union of a few rotated ellipsoids, roughened by smooth noise. Returns bool ``box``."""
    axes = [(np.arange(s.start, s.stop) - c) * sp for s, c, sp in zip(box, focus.centre, spacing)]
    x, y, z = np.meshgrid(*[a.astype(np.float32) for a in axes], indexing="ij", sparse=True)
    level = None
    n_lobes = 1 + int(rng.integers(0, 3))
    for lobe in range(n_lobes):
        if lobe == 0:
            centre, r = np.zeros(3), focus.radius
        else:
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            centre, r = direction * focus.radius * rng.uniform(0.35, 0.7), focus.radius * rng.uniform(0.4, 0.7)
        q = _random_rotation(rng).T / (r * rng.uniform(0.78, 1.22, size=3))[:, None]
        t = q @ centre
        r2 = sum((q[i, 0] * x + q[i, 1] * y + q[i, 2] * z - t[i]) ** 2 for i in range(3))
        lobe_level = 1.0 - np.sqrt(r2)
        level = lobe_level if level is None else np.maximum(level, lobe_level)
    shape = tuple(s.stop - s.start for s in box)
    level = level + 0.22 * _smooth_noise(rng, shape, spacing, max(4.0, focus.radius / 2.5))
    core = level > 0
    centre_vox = tuple(int(round(c - s.start)) for c, s in zip(focus.centre, box))
    if all(0 <= c < n for c, n in zip(centre_vox, shape)):
        core[centre_vox] = True
    return core


def _lesion(
    rng: np.random.Generator,
    focus: _Focus,
    tissue: np.ndarray,
    brain: np.ndarray,
    spacing: np.ndarray,
) -> _Lesion:
    """Labels and soft fractions of one tumour focus over a box around it."""
    box_shape = np.asarray(brain.shape)
    half = (focus.radius * 1.8 + focus.edema * 1.3 + 4.0) / spacing
    lo = np.clip(np.floor(focus.centre - half).astype(int), 0, box_shape)
    hi = np.clip(np.ceil(focus.centre + half).astype(int) + 1, 0, box_shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    shape = tuple(int(b - a) for a, b in zip(lo, hi))
    half_core = (focus.radius * 1.8 + 2.0) / spacing
    clo = np.clip(np.floor(focus.centre - half_core).astype(int), lo, hi)
    chi = np.clip(np.ceil(focus.centre + half_core).astype(int) + 1, lo, hi)
    core_box = tuple(slice(int(a), int(b)) for a, b in zip(clo, chi))
    in_box = tuple(slice(int(a - l), int(b - l)) for a, b, l in zip(clo, chi, lo))

    brain_b = brain[box]
    core = np.zeros(shape, dtype=bool)
    core[in_box] = _core_shape(rng, focus, core_box, spacing) & brain[core_box]

    half_voxel = 0.5 * float(spacing.min())
    tau = 0.25 * float(spacing.min())  # a sigmoid of this width mimics the partial volume of a voxel
    d_in = ndi.distance_transform_edt(np.pad(core[in_box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    depth = np.zeros(shape, dtype=np.float32)
    depth[in_box] = d_in - half_voxel
    d_out = ndi.distance_transform_edt(~core, sampling=spacing).astype(np.float32)
    d_out = np.maximum(d_out - half_voxel, 0.0)
    signed = np.where(core, depth, -d_out)
    core_w = _sigmoid(signed / tau) * _near_core(core, d_out, 3.0 * tau)

    rim_noise = _smooth_noise(rng, shape, spacing, 6.0)
    rim = np.maximum(focus.rim * (1.0 + 0.3 * rim_noise), 1.2)
    inner = core & (depth > rim)
    inner_w = _sigmoid((depth - rim) / tau) * core

    t = tissue[(slice(None), *box)]
    total = np.maximum(t.sum(axis=0), 1e-6)
    parenchyma = (t[0] + t[1]) / total
    wm_frac = t[1] / total
    reach = focus.edema * (0.3 + 0.7 * wm_frac) * np.exp(0.35 * _smooth_noise(rng, shape, spacing, 10.0))
    reach = np.minimum(reach, 1.3 * focus.edema)  # further along white matter than into cortex, but bounded
    edema = (d_out <= reach) & ~core & brain_b & (parenchyma > 0.5)
    # Edema is one with its tumour: drop islands that do not touch the core (across a sulcus, say).
    parts, _ = ndi.label(edema | core)
    attached = np.isin(parts, np.unique(parts[core]))
    edema &= attached
    strength = 0.7 + 0.3 * np.exp(-d_out / np.maximum(0.5 * reach, 1.0))
    edema_w = _sigmoid((reach - d_out) / max(tau, 0.5)) * strength * parenchyma * brain_b
    edema_w *= ndi.binary_dilation(attached)  # keep soft edges, but no signal on the dropped islands
    texture = np.stack([_smooth_noise(rng, shape, spacing, 4.0), _smooth_noise(rng, shape, spacing, 7.0)])
    return _Lesion(
        box, core, inner, edema, core_w, inner_w.astype(np.float32), edema_w.astype(np.float32), texture, focus.kind
    )


def _near_core(core: np.ndarray, d_out: np.ndarray, width: float) -> np.ndarray:
    """1 inside the core and within ``width`` mm of it, 0 further out (keeps soft edges local)."""
    return (core | (d_out < width)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Contrasts


def _case_intensities(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """This case's relative intensities: :data:`INTENSITIES` jittered (white matter stays 1)."""
    values = {}
    for name, base in INTENSITIES.items():
        spread = 0.05 if name in ("csf", "gm", "wm") else 0.08
        v = np.asarray(base, dtype=np.float64) * np.exp(rng.normal(0.0, spread, size=4))
        values[name] = v
    values["wm"] = np.ones(4)
    values["necrosis"][0] = rng.uniform(0.6, 1.5)  # FLAIR: from suppressed fluid to proteinaceous
    values["enhancing"][2] = max(values["enhancing"][2], 1.75)
    return values


def _bias_field(rng: np.random.Generator, coords: np.ndarray, strength: float) -> np.ndarray:
    """Smooth multiplicative field: exp of a random polynomial of degree 2 of normalised coordinates.

    Args:
        coords: ``(3, N)`` float32 coordinates in [-1, 1] of the voxels where the field is wanted.
        strength: standard deviation of the linear coefficients (the quadratic ones get 0.6 of it).

    Returns:
        ``(N,)`` float32 field values.
    """
    x, y, z = coords
    log_field = np.zeros(coords.shape[1], dtype=np.float32)
    for term in (x, y, z):
        log_field += np.float32(rng.normal(0.0, strength)) * term
    for a, b in ((x, x), (y, y), (z, z), (x, y), (x, z), (y, z)):
        log_field += np.float32(rng.normal(0.0, 0.6 * strength)) * (a * b)
    return np.exp(log_field)


# --------------------------------------------------------------------------------------------------------
# Cases


def synthesize(
    seed: int,
    *,
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING,
) -> SyntheticCase:
    """Make one synthetic case, with its healthy tissue map (for checks and tests).

    Args:
        seed: non-negative integer; the same seed gives the same case.
        size: grid shape ``(X, Y, Z)``; the grid covers ``size * spacing`` mm around the brain.
        spacing: voxel size in mm.

    Returns:
        A :class:`SyntheticCase`.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    size_t, spacing_a = _check_grid(size, spacing)
    rng = np.random.default_rng(int(seed))
    affine = grid_affine(size_t, spacing_a)

    box, tissue, to_case = _anatomy(rng, size_t, spacing_a, affine)
    box_shape = tissue.shape[1:]
    total = tissue.sum(axis=0)
    brain = total > 0.5
    safe_total = np.maximum(total, 1e-6)

    to_box_voxel = np.linalg.inv(affine) @ to_case  # template world (where tumour sites are) -> box voxel
    to_box_voxel[:3, 3] -= [s.start for s in box]
    lesions = [
        _lesion(rng, focus, tissue, brain, spacing_a) for focus in _draw_foci(rng, to_box_voxel, box_shape)
    ]

    label = np.zeros(box_shape, dtype=np.uint8)
    for les in lesions:
        label[les.box][les.edema] = 2
    for les in lesions:
        view = label[les.box]
        view[les.core] = 1 if les.kind == "non_enhancing" else 4
        view[les.inner] = 1
    label[~brain] = 0

    values = _case_intensities(rng)
    flat_idx = np.flatnonzero(brain)  # brain voxels in the box; all intensity work happens on them only
    vox = np.unravel_index(flat_idx, box_shape)
    fractions = tissue.reshape(3, -1)[:, flat_idx] / safe_total.ravel()[flat_idx]
    coords = np.stack([(v * (2.0 / max(n - 1, 1)) - 1.0).astype(np.float32) for v, n in zip(vox, box_shape)])
    position = np.full(box_shape, -1, dtype=np.int64)
    position.ravel()[flat_idx] = np.arange(flat_idx.size)
    where = []  # per lesion: (mask of its box voxels inside the brain, their positions in the brain vector)
    for les in lesions:
        pos = position[les.box]
        inside = pos >= 0
        where.append((inside, pos[inside]))

    image = np.zeros((len(MODALITIES), math.prod(size_t)), dtype=np.float32)
    full_idx = np.ravel_multi_index(tuple(v + s.start for v, s in zip(vox, box)), size_t)
    for m in range(len(MODALITIES)):
        tissue_values = np.array([values["gm"][m], values["wm"][m], values["csf"][m]], dtype=np.float32)
        signal = tissue_values @ fractions
        for les, (inside, pos) in zip(lesions, where):
            target = values["edema"][m] * (1.0 + 0.05 * les.texture[1][inside])
            signal[pos] += les.edema_w[inside] * (target - signal[pos])
        for les, (inside, pos) in zip(lesions, where):
            outer_name = "solid" if les.kind == "non_enhancing" else "enhancing"
            outer = values[outer_name][m] * (1.0 + 0.12 * les.texture[0][inside])
            inner_v = values["necrosis" if les.kind != "non_enhancing" else "solid"][m]
            inner = inner_v * (1.0 + 0.10 * les.texture[1][inside])
            inner_w = les.inner_w[inside]
            comp = inner_w * inner + (1.0 - inner_w) * outer
            signal[pos] += les.core_w[inside] * (comp - signal[pos])
        level = rng.uniform(250.0, 1100.0)
        sigma = np.float32(rng.uniform(0.015, 0.04) * level)
        signal *= _bias_field(rng, coords, strength=0.12) * np.float32(level)
        noise = rng.standard_normal((2, flat_idx.size), dtype=np.float32)
        signal = np.sqrt((signal + sigma * noise[0]) ** 2 + (sigma * noise[1]) ** 2)  # Rician magnitude
        image[m, full_idx] = np.clip(np.rint(signal), 1.0, _INT16_MAX)
    image = image.reshape(len(MODALITIES), *size_t)

    full_label = np.zeros(size_t, dtype=np.uint8)
    full_label[box] = label
    classes = np.array([2, 3, 1], dtype=np.uint8)[np.argmax(fractions, axis=0)]  # GM, WM, CSF -> 2, 3, 1
    full_tissue = np.zeros(math.prod(size_t), dtype=np.uint8)
    full_tissue[full_idx] = classes
    full_tissue = full_tissue.reshape(size_t)
    return SyntheticCase(image=image, label=full_label, affine=affine, tissue=full_tissue)


def make_case(
    seed: int,
    *,
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make one synthetic BraTS-like case.

    Args:
        seed: non-negative integer; the same seed gives the same case.
        size: grid shape ``(X, Y, Z)`` (default the BraTS 240 x 240 x 155).
        spacing: voxel size in mm (default 1 mm isotropic); the grid covers ``size * spacing`` mm.

    Returns:
        ``image`` ``(4, X, Y, Z)`` float32 (flair, t1, t1ce, t2; whole numbers, 0 outside the brain),
        ``label`` ``(X, Y, Z)`` uint8 with values {0, 1, 2, 4}, and the 4x4 ``affine``.
    """
    case = synthesize(seed, size=size, spacing=spacing)
    return case.image, case.label, case.affine


# --------------------------------------------------------------------------------------------------------
# Files


def _write_brats_case(root: Path, name: str, image: np.ndarray, label: np.ndarray, geometry: Geometry) -> Path:
    """Write one case folder aside, then rename it into place (replacing an older case of the same name)."""
    final = root / name
    tmp = root / f".{name}.{uuid.uuid4().hex}.partial"
    tmp.mkdir()
    try:
        for m, modality in enumerate(MODALITIES):
            save_image(image[m], geometry, tmp / f"{name}_{modality}.nii.gz", dtype=np.int16)
        save_mask(label, geometry, tmp / f"{name}_seg.nii.gz")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_msd_case(root: Path, name: str, image: np.ndarray, label: np.ndarray, geometry: Geometry) -> Path:
    """Write the 4D image and the MSD label aside, then move them in, label first (cases are found by image)."""
    images, labels = root / "imagesTr", root / "labelsTr"
    tmp = root / f".{name}.{uuid.uuid4().hex}.partial"
    tmp.mkdir()
    try:
        save_image(image, geometry, tmp / "image.nii.gz")  # (4, X, Y, Z) stored as (X, Y, Z, 4) float32
        save_mask(brats_to_msd(label), geometry, tmp / "label.nii.gz")
        os.replace(tmp / "label.nii.gz", labels / f"{name}.nii.gz")
        os.replace(tmp / "image.nii.gz", images / f"{name}.nii.gz")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return images / f"{name}.nii.gz"


def _write_msd_dataset_json(root: Path) -> None:
    names = sorted(
        p.name
        for p in (root / "imagesTr").iterdir()
        if p.name.endswith(".nii.gz") and not p.name.startswith(".") and (root / "labelsTr" / p.name).exists()
    )
    meta = {
        "name": "BRATS",
        "description": "SYNTHETIC brain tumour cases (MNI152 anatomy, simulated gliomas), MSD Task01 layout",
        "reference": "synthetic: training/data/synthetic.py (no patient data)",
        "licence": "CC-BY-SA 4.0",
        "release": "synthetic",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(names),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
        "test": [],
    }
    atomic_write(root / "dataset.json", json.dumps(meta, indent=4) + "\n")


def generate_dataset(
    out_dir: Path | str,
    n_cases: int,
    *,
    seed: int = 0,
    layout: str = "brats2020",
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    start_index: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Write ``n_cases`` synthetic cases numbered from ``start_index`` in a BraTS 2020 or MSD layout.

    ``brats2020``: ``out_dir/MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN/BraTS20_Training_NNN_{flair,
    t1,t1ce,t2,seg}.nii.gz`` (images int16, seg uint8). ``msd``: ``out_dir/Task01_BrainTumour/imagesTr/
    BRATS_NNN.nii.gz`` (4D float32, FLAIR, T1w, T1gd, T2w), ``labelsTr/BRATS_NNN.nii.gz`` (MSD labels: 1 edema,
    2 non-enhancing/necrotic, 3 enhancing) and ``dataset.json`` listing every complete case in the folder.

    Before any case, ``out_dir/SYNTHETIC.json`` is written (:func:`training.data.provenance.mark_synthetic`,
    with ``seed``, ``n_cases``, ``start_index``, ``size``, ``spacing`` and ``layout`` of this call), so even an
    interrupted run leaves data that says it is synthetic; ``preprocess`` carries the marker into the cache and
    the model card of a model trained on it says so.

    Case number ``i`` is made by :func:`make_case` with :func:`case_seed` ``(seed, i)``, so it does not depend on
    ``n_cases`` or ``start_index``. Each case appears atomically (written aside, then renamed), so an
    interrupted run leaves only whole cases; an existing case of the same name is replaced.

    Returns:
        The case folders (``brats2020``) or the 4D image files (``msd``), in order.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)) or n_cases < 0:
        raise ValueError(f"n_cases must be a non-negative integer, got {n_cases!r}")
    if isinstance(start_index, bool) or not isinstance(start_index, (int, np.integer)) or start_index < 0:
        raise ValueError(f"start_index must be a non-negative integer, got {start_index!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    size_t, spacing_a = _check_grid(size, spacing)

    out = Path(out_dir)
    mark_synthetic(
        out,
        seed=int(seed),
        n_cases=int(n_cases),
        start_index=int(start_index),
        size=list(size_t),
        spacing=[float(s) for s in spacing_a],
        layout=layout,
    )
    if layout == "brats2020":
        root = out / BRATS_DIR
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = out / MSD_DIR
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    written: list[Path] = []
    try:
        for index in tqdm(
            range(start_index, start_index + n_cases), disable=not progress, desc="synthetic cases", unit="case"
        ):
            image, label, affine = make_case(case_seed(seed, index), size=size_t, spacing=tuple(spacing_a))
            geometry = Geometry.from_affine(size_t, affine)
            if layout == "brats2020":
                written.append(_write_brats_case(root, f"BraTS20_Training_{index:03d}", image, label, geometry))
            else:
                written.append(_write_msd_case(root, f"BRATS_{index:03d}", image, label, geometry))
    finally:
        if layout == "msd":
            _write_msd_dataset_json(root)
    logger.info("wrote %d synthetic cases (%s) under %s", len(written), layout, root)
    return written
