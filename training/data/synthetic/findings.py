"""Non-tumour findings that a model must leave alone, drawn per case on the warped anatomy.

Real brains are not clean: white-matter hyperintensities and periventricular caps are bright on FLAIR and
T2 like edema, and vessels, choroid plexus and dural sinuses are bright on T1ce like enhancing tumour. Each
case gets some of them (each kind with its own probability), never labelled:

- ``caps``: periventricular FLAIR/T2 hyperintensity, a patchy band 2-7 mm wide around the ventricles;
- ``wmh``: scattered white-matter hyperintensities, 0-25 blobs of 1.5-5 mm (some confluent, up to 8 mm);
- ``vessels``: enhancing cortical veins, thin winding tubes (0.6-1.3 mm radius, 15-55 mm long) from the
  surface;
- ``choroid``: enhancing choroid plexus in the atria of the lateral ventricles;
- ``sinuses``: the edge of the superior sagittal and transverse sinuses, enhancing, where skull stripping
  left them inside the brain mask.

Each finding is a soft weight map over the brain box (0 = absent, 1 = fully there); :mod:`.cases` blends
its intensities (:data:`FINDING_INTENSITIES`) over the healthy tissue, then the tumour over both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from training.data.synthetic.anatomy import apply_affine, landmarks, smooth_noise, soft_step, tumour_sites

# Relative intensities (white matter = 1) in MODALITIES order (flair, t1, t1ce, t2); each case jitters them.
FINDING_INTENSITIES: dict[str, tuple[float, float, float, float]] = {
    "caps": (1.65, 0.88, 0.90, 1.50),
    "wmh": (1.80, 0.84, 0.86, 1.65),
    "vessels": (0.85, 0.95, 2.20, 0.55),  # flow void on T2
    "choroid": (1.05, 0.85, 2.05, 1.25),
    "sinuses": (0.90, 0.90, 2.25, 0.65),
}
FINDING_PROBABILITY: dict[str, float] = {"caps": 0.6, "wmh": 0.55, "vessels": 0.85, "choroid": 0.85, "sinuses": 0.7}
"""Share of cases that have each finding."""


@dataclass(frozen=True)
class Finding:
    """One finding of a case: its name (a key of :data:`FINDING_INTENSITIES`) and its weight over the box."""

    name: str
    weight: np.ndarray  # float32, the brain box's shape, values in [0, 1]


def _to_box(points_world: np.ndarray, to_box_voxel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Template world points -> integer voxel positions inside the box ``(N, 3)`` (points outside dropped)."""
    vox = np.rint(apply_affine(to_box_voxel, points_world)).astype(int)
    inside = np.all((vox >= 0) & (vox < np.asarray(shape)), axis=1)
    return vox[inside]


def _distance(seeds: np.ndarray, shape: tuple[int, ...], spacing: np.ndarray, reach_mm: float):
    """Distance in mm to the nearest seed voxel, over the seeds' bounding box grown by ``reach_mm``.

    Returns:
        ``(box, distance)``: the sub-box of ``shape`` (slices) and the distances over it; ``None`` if no seed.
    """
    if len(seeds) == 0:
        return None
    margin = np.ceil(reach_mm / spacing).astype(int) + 1
    lo = np.maximum(seeds.min(axis=0) - margin, 0)
    hi = np.minimum(seeds.max(axis=0) + margin + 1, np.asarray(shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    free = np.ones(tuple(int(b - a) for a, b in zip(lo, hi)), dtype=bool)
    free[tuple((seeds - lo).T)] = False
    return box, ndi.distance_transform_edt(free, sampling=spacing).astype(np.float32)


def _blobs(centres: np.ndarray, radii: np.ndarray, shape, spacing, tau: float) -> np.ndarray:
    """Soft balls of ``radii`` mm around voxel ``centres``, over the whole box."""
    out = np.zeros(shape, dtype=np.float32)
    for centre, radius in zip(centres, radii):
        found = _distance(centre[None], shape, spacing, radius + 2.0)
        if found is not None:
            box, dist = found
            np.maximum(out[box], soft_step((radius - dist) / tau), out=out[box])
    return out


def _caps(rng, vent, parenchyma, shape, spacing, tau) -> np.ndarray | None:
    width = rng.uniform(2.0, 7.0)
    found = _distance(vent, shape, spacing, width + 6.0)
    if found is None:
        return None
    box, dist = found
    band = np.maximum(dist - 1.5, 0.0)  # ventricle points lie on a 2 mm grid: 1.5 mm fills them in
    patchy = soft_step(3.0 * (smooth_noise(rng, band.shape, spacing, 9.0) + 0.4))
    weight = np.zeros(shape, dtype=np.float32)
    weight[box] = soft_step((width - band) / (2.0 * tau)) * (band > 0) * patchy * parenchyma[box]
    return weight


def _vessels(rng, surface, shape, spacing, tau) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float32)
    for _ in range(int(rng.integers(4, 16))):
        pos = surface[rng.integers(len(surface))].astype(np.float64)
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        path = []
        for _ in range(int(rng.uniform(15.0, 55.0))):  # 1 mm steps
            path.append(np.rint(pos).astype(int))
            direction += 0.35 * rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            pos = pos + direction / spacing
        path = np.asarray(path)
        path = path[np.all((path >= 0) & (path < np.asarray(shape)), axis=1)]
        radius = rng.uniform(0.6, 1.3)
        found = _distance(path, shape, spacing, radius + 2.0)
        if found is not None:
            box, dist = found
            np.maximum(out[box], soft_step((radius - dist) / tau), out=out[box])
    return out


def draw_findings(
    rng: np.random.Generator, tissue: np.ndarray, brain: np.ndarray, spacing: np.ndarray, to_box_voxel: np.ndarray
) -> list[Finding]:
    """The non-tumour findings of one case over its brain box.

    Args:
        rng: the case's generator.
        tissue: ``(3, *box)`` GM, WM, CSF fractions.
        brain: ``(*box)`` bool brain mask.
        spacing: voxel size in mm.
        to_box_voxel: 4x4 template world (mm) -> box voxel.

    Returns:
        The findings present in this case (possibly none), each weight zero outside the brain.
    """
    shape = brain.shape
    tau = 0.25 * float(spacing.min())
    total = np.maximum(tissue.sum(axis=0), 1e-6)
    parenchyma = ((tissue[0] + tissue[1]) / total).astype(np.float32)
    csf = (tissue[2] / total).astype(np.float32)
    wm = (tissue[1] / total).astype(np.float32)
    marks = landmarks()
    present = {name: rng.random() < p for name, p in FINDING_PROBABILITY.items()}  # one draw each, fixed order
    weights: dict[str, np.ndarray | None] = {}
    if present["caps"]:
        weights["caps"] = _caps(rng, _to_box(marks.ventricles, to_box_voxel, shape), parenchyma, shape, spacing, tau)
    if present["wmh"]:
        sites, _ = tumour_sites()
        count = int(rng.integers(1, 26))
        centres = _to_box(sites[rng.integers(len(sites), size=count)], to_box_voxel, shape)
        radii = np.where(rng.random(len(centres)) < 0.15, rng.uniform(5.0, 8.0, len(centres)),
                         rng.uniform(1.5, 5.0, len(centres)))
        weights["wmh"] = _blobs(centres, radii, shape, spacing, tau) * np.clip(wm * 1.5, 0.0, 1.0)
    if present["vessels"]:
        weights["vessels"] = _vessels(rng, _to_box(marks.surface, to_box_voxel, shape), shape, spacing, tau)
    if present["choroid"]:
        atria = _to_box(marks.atria, to_box_voxel, shape)
        if len(atria):
            picks = atria[rng.integers(len(atria), size=int(rng.integers(2, 5)))]
            weights["choroid"] = _blobs(picks, rng.uniform(2.0, 4.5, len(picks)), shape, spacing, tau) * csf
    if present["sinuses"]:
        seeds = _to_box(marks.sinuses, to_box_voxel, shape)
        radius = rng.uniform(2.0, 4.0)
        found = _distance(seeds, shape, spacing, radius + 2.0)
        if found is not None:
            box, dist = found
            weight = np.zeros(shape, dtype=np.float32)
            patchy = soft_step(3.0 * (smooth_noise(rng, dist.shape, spacing, 15.0) + 0.6))
            weight[box] = soft_step((radius - dist) / tau) * patchy
            weights["sinuses"] = weight
    findings = []
    for name, weight in weights.items():
        if weight is not None and weight.max() > 0:
            findings.append(Finding(name, (weight * brain).astype(np.float32)))
    return findings
