"""Tumours of a synthetic case: the kinds a cohort holds, where they grow and what they look like.

Each case is of one kind (:data:`KINDS`), drawn with the shares of :data:`KIND_DECK` (a deck of 20 cases):

- ``hgg_necrotic``: a high-grade glioma, an enhancing rim (label 4, 2-5 mm) around necrosis (label 1), with
  edema (label 2) 6-20 mm beyond the core;
- ``solid_enhancing``: a mostly enhancing mass with little or no necrosis;
- ``lgg``: a low-grade glioma without enhancement: a non-enhancing core (label 1 only) and little edema
  (about a fifth of the cases, as in BraTS 2020);
- ``multifocal``: two or three separate enhancing tumours;
- ``small``: one tumour under about 3 ml in all, enhancing or not;
- ``large``: a large necrotic tumour with wide edema;
- ``tumour_free``: no tumour at all (only the non-tumour findings of :mod:`.findings`).

A core is an irregular union of rotated ellipsoids roughened by smooth noise, centred in white matter deep
enough to hold it; edema reaches further along white matter than into cortex, never into CSF or outside the
brain, and stays attached to its core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from training.data.synthetic.anatomy import apply_affine, random_rotation, smooth_noise, soft_step, tumour_sites

KINDS: tuple[str, ...] = ("hgg_necrotic", "solid_enhancing", "lgg", "multifocal", "small", "large", "tumour_free")
"""Case kinds, as recorded in ``name_mapping.csv`` (column ``Kind``)."""

KIND_DECK: tuple[str, ...] = (
    ("hgg_necrotic",) * 6 + ("solid_enhancing",) * 2 + ("lgg",) * 4 + ("multifocal",) * 2 + ("small",) * 2
    + ("large",) * 2 + ("tumour_free",) * 2
)
"""Shares of the kinds: every 20 consecutive cases of a dataset (numbers 0-19, 20-39, ...) hold exactly these."""

GRADES: dict[str, str] = {
    "hgg_necrotic": "HGG", "solid_enhancing": "HGG", "lgg": "LGG", "multifocal": "HGG", "large": "HGG",
    "tumour_free": "none",
}
"""``Grade`` column of ``name_mapping.csv`` per kind (a ``small`` tumour is HGG if it enhances, else LGG)."""


def kind_of_case(seed: int, index: int) -> str:
    """The kind of case ``index`` of a dataset made with ``seed``: its place in a shuffled :data:`KIND_DECK`."""
    deck = len(KIND_DECK)
    order = np.random.default_rng([int(seed), int(index) // deck, 7]).permutation(deck)
    return KIND_DECK[int(order[int(index) % deck])]


@dataclass(frozen=True)
class Focus:
    centre: np.ndarray  # voxel coordinates within the brain box
    radius: float  # mm
    edema: float  # mm beyond the core
    kind: str  # "necrotic", "solid_enhancing" or "non_enhancing"
    rim: float  # mm of enhancing rim (for "solid_enhancing": depth beyond which necrosis starts)


@dataclass
class Lesion:
    box: tuple[slice, ...]  # within the brain box
    core: np.ndarray  # bool
    inner: np.ndarray  # bool, the part of the core deeper than the rim
    edema: np.ndarray  # bool, outside the core
    core_w: np.ndarray  # soft core fraction
    inner_w: np.ndarray  # soft fraction of the core that is inner
    edema_w: np.ndarray  # edema strength
    texture: np.ndarray  # (2, *box) smooth noise for heterogeneity
    kind: str


def _core_shape(
    rng: np.random.Generator, focus: Focus, box: tuple[slice, ...], spacing: np.ndarray
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
        q = random_rotation(rng).T / (r * rng.uniform(0.78, 1.22, size=3))[:, None]
        t = q @ centre
        r2 = sum((q[i, 0] * x + q[i, 1] * y + q[i, 2] * z - t[i]) ** 2 for i in range(3))
        lobe_level = 1.0 - np.sqrt(r2)
        level = lobe_level if level is None else np.maximum(level, lobe_level)
    shape = tuple(s.stop - s.start for s in box)
    level = level + 0.22 * smooth_noise(rng, shape, spacing, max(4.0, focus.radius / 2.5))
    core = level > 0
    centre_vox = tuple(int(round(c - s.start)) for c, s in zip(focus.centre, box))
    if all(0 <= c < n for c, n in zip(centre_vox, shape)):
        core[centre_vox] = True
    return core


def grow_lesion(
    rng: np.random.Generator,
    focus: Focus,
    tissue: np.ndarray,
    brain: np.ndarray,
    spacing: np.ndarray,
) -> Lesion:
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
    core_w = soft_step(signed / tau) * _near_core(core, d_out, 3.0 * tau)

    rim_noise = smooth_noise(rng, shape, spacing, 6.0)
    rim = np.maximum(focus.rim * (1.0 + 0.3 * rim_noise), 1.2)
    inner = core & (depth > rim)
    inner_w = soft_step((depth - rim) / tau) * core

    t = tissue[(slice(None), *box)]
    total = np.maximum(t.sum(axis=0), 1e-6)
    parenchyma = (t[0] + t[1]) / total
    wm_frac = t[1] / total
    reach = focus.edema * (0.3 + 0.7 * wm_frac) * np.exp(0.35 * smooth_noise(rng, shape, spacing, 10.0))
    reach = np.minimum(reach, 1.3 * focus.edema)  # further along white matter than into cortex, but bounded
    edema = (d_out <= reach) & ~core & brain_b & (parenchyma > 0.5)
    # Edema is one with its tumour: drop islands that do not touch the core (across a sulcus, say).
    parts, _ = ndi.label(edema | core)
    attached = np.isin(parts, np.unique(parts[core]))
    edema &= attached
    strength = 0.7 + 0.3 * np.exp(-d_out / np.maximum(0.5 * reach, 1.0))
    edema_w = soft_step((reach - d_out) / max(tau, 0.5)) * strength * parenchyma * brain_b
    edema_w *= ndi.binary_dilation(attached)  # keep soft edges, but no signal on the dropped islands
    texture = np.stack([smooth_noise(rng, shape, spacing, 4.0), smooth_noise(rng, shape, spacing, 7.0)])
    return Lesion(
        box, core, inner, edema, core_w, inner_w.astype(np.float32), edema_w.astype(np.float32), texture, focus.kind
    )


def _near_core(core: np.ndarray, d_out: np.ndarray, width: float) -> np.ndarray:
    """1 inside the core and within ``width`` mm of it, 0 further out (keeps soft edges local)."""
    return (core | (d_out < width)).astype(np.float32)


def _focus_plan(rng: np.random.Generator, kind: str) -> list[tuple[float, float, str, float]]:
    """``(radius mm, edema mm, focus kind, rim mm)`` of each focus of a case of ``kind``."""
    if kind == "tumour_free":
        return []
    if kind == "multifocal":
        plan = []
        for _ in range(int(rng.integers(2, 4))):
            focus = "necrotic" if rng.random() < 0.55 else "solid_enhancing"
            rim = rng.uniform(2.0, 4.0) if focus == "necrotic" else rng.uniform(5.0, 9.0)
            plan.append((rng.uniform(6.0, 15.0), rng.uniform(4.0, 14.0), focus, rim))
        return plan
    if kind == "small":
        focus = "solid_enhancing" if rng.random() < 0.6 else "non_enhancing"
        return [(rng.uniform(3.0, 5.5), rng.uniform(1.0, 3.5), focus, rng.uniform(1.5, 3.0))]
    radius, edema, focus, rim = {
        "hgg_necrotic": ((11.0, 24.0), (6.0, 20.0), "necrotic", (2.0, 5.0)),
        "solid_enhancing": ((8.0, 18.0), (4.0, 15.0), "solid_enhancing", (5.0, 9.0)),
        "lgg": ((10.0, 24.0), (2.0, 10.0), "non_enhancing", (2.0, 5.0)),
        "large": ((20.0, 27.0), (14.0, 24.0), "necrotic", (3.0, 6.0)),
    }[kind]
    return [(rng.uniform(*radius), rng.uniform(*edema), focus, rng.uniform(*rim))]


def draw_foci(
    rng: np.random.Generator, kind: str, to_box_voxel: np.ndarray, box_shape: tuple[int, ...]
) -> list[Focus]:
    """The tumour foci of a case of ``kind``, centred in white matter deep enough to hold them.

    Args:
        to_box_voxel: 4x4 template world (mm) -> voxel of the brain box.
        box_shape: shape of the brain box.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    sites, depth = tumour_sites()
    foci: list[Focus] = []
    placed: list[tuple[np.ndarray, float]] = []  # world centre and extent of the foci drawn so far
    for radius, edema, focus_kind, rim in _focus_plan(rng, kind):
        need = depth >= 0.85 * radius + 4.0
        for other_centre, other_extent in placed:
            need &= np.linalg.norm(sites - other_centre, axis=1) >= other_extent + radius + edema + 10.0
        candidates = np.flatnonzero(need)
        if candidates.size == 0:
            candidates = np.array([int(np.argmax(depth))])
        world = sites[rng.choice(candidates)] + rng.uniform(-1.0, 1.0, size=3)
        placed.append((world, radius + edema))
        centre = apply_affine(to_box_voxel, world)
        if np.any(centre < 0) or np.any(centre > np.asarray(box_shape) - 1):
            continue  # outside the (cropped) grid: no tumour there
        foci.append(Focus(centre, float(radius), float(edema), focus_kind, float(rim)))
    return foci


def grade_of(kind: str, foci: Sequence[Focus]) -> str:
    """``HGG``, ``LGG`` or ``none``: the ``Grade`` recorded for a case of ``kind`` with these foci."""
    if kind == "small":
        return "HGG" if any(f.kind != "non_enhancing" for f in foci) else "LGG"
    return GRADES[kind]
