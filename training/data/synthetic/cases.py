"""One synthetic case: anatomy, findings and tumour blended into four MRI contrasts as a scanner might give them.

A case (:func:`synthesize`):

1. warps the template tissue fractions onto the BraTS grid (240 x 240 x 155 at 1 mm by default, axes L-P-S,
   brain centred) with a small random affine (:mod:`.anatomy`);
2. draws its kind and tumour foci (:mod:`.tumours`) and its non-tumour findings (:mod:`.findings`);
3. synthesises FLAIR, T1, T1ce and T2 from the tissue, finding and tumour fractions (partial volumes at the
   edges). Each case is a different scanner: tissue contrasts jittered per case, FLAIR's CSF suppression,
   a gamma per modality, a smooth multiplicative bias field of random strength, sometimes a blur (thicker
   slices), Rician noise of random level and an arbitrary intensity scale per modality. Everything outside
   the brain is exactly 0 (skull-stripped).

Relative intensities (white matter = 1; :data:`INTENSITIES`): T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR CSF
dark, GM > WM; edema bright on FLAIR and T2, a little dark on T1; necrosis dark on T1/T1ce and bright on T2;
enhancing tumour bright on T1ce, as are vessels, choroid plexus and sinuses; a low-grade core bright on FLAIR
and T2 and not enhancing. Everything is deterministic given the seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from service.core.labels import MODALITIES
from training.data.synthetic.anatomy import check_grid, grid_affine, warp_anatomy
from training.data.synthetic.findings import FINDING_INTENSITIES, draw_findings
from training.data.synthetic.tumours import KIND_DECK, KINDS, draw_foci, grade_of, grow_lesion

# Relative intensities, white matter = 1, in MODALITIES order (flair, t1, t1ce, t2). Each case jitters them.
INTENSITIES: dict[str, tuple[float, float, float, float]] = {
    "csf": (0.30, 0.30, 0.35, 2.60),
    "gm": (1.25, 0.72, 0.78, 1.35),
    "wm": (1.00, 1.00, 1.00, 1.00),
    "edema": (2.10, 0.76, 0.80, 1.95),
    "necrosis": (1.00, 0.36, 0.40, 2.30),  # FLAIR of necrosis varies a lot between cases (0.6-1.5)
    "enhancing": (1.50, 0.80, 2.10, 1.50),
    "solid": (1.70, 0.66, 0.72, 1.80),  # non-enhancing solid tumour
    **FINDING_INTENSITIES,
}
TISSUE_CLASSES: dict[int, str] = {0: "background", 1: "csf", 2: "gm", 3: "wm"}
"""Values of :attr:`SyntheticCase.tissue` (dominant tissue per voxel)."""

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
        kind: the case's kind (:data:`training.data.synthetic.tumours.KINDS`).
        grade: ``HGG``, ``LGG`` or ``none`` (tumour-free).
        findings: ``(X, Y, Z)`` uint8, for each voxel the bit ``1 << i`` set where the ``i``-th finding of
            :data:`FINDING_NAMES` has weight above 0.5 (unlabelled: these are not tumour).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray
    kind: str = "hgg_necrotic"
    grade: str = "HGG"
    findings: np.ndarray | None = None


FINDING_NAMES: tuple[str, ...] = tuple(FINDING_INTENSITIES)



def _case_intensities(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """This case's relative intensities: :data:`INTENSITIES` jittered (white matter stays 1), the tissue order
    of every modality kept."""
    values = {}
    for name, base in INTENSITIES.items():
        spread = 0.07 if name in ("csf", "gm") else 0.12
        values[name] = np.asarray(base, dtype=np.float64) * np.exp(rng.normal(0.0, spread, size=4))
    values["wm"] = np.ones(4)
    flair, t1, t1ce, t2 = range(4)
    values["csf"][flair] = rng.uniform(0.15, 0.5)  # how well FLAIR suppresses fluid
    values["gm"][flair] = max(values["gm"][flair], 1.08)
    values["gm"][t1] = min(values["gm"][t1], 0.9)
    values["gm"][t1ce] = min(values["gm"][t1ce], 0.92)
    values["gm"][t2] = max(values["gm"][t2], 1.1)
    values["csf"][t1] = min(values["csf"][t1], 0.6 * values["gm"][t1])
    values["csf"][t2] = max(values["csf"][t2], 1.4 * values["gm"][t2])
    values["edema"][flair] = max(values["edema"][flair], 1.6)
    values["edema"][t2] = max(values["edema"][t2], 1.5)
    values["edema"][t1] = min(values["edema"][t1], 0.9)
    values["edema"][t1ce] = min(values["edema"][t1ce], 0.95)
    values["necrosis"][flair] = rng.uniform(0.6, 1.5)  # from suppressed fluid to proteinaceous
    values["enhancing"][t1ce] = max(values["enhancing"][t1ce], 1.75)
    values["solid"][t1ce] = min(values["solid"][t1ce], 0.95)  # a low-grade core does not enhance
    for name in ("vessels", "choroid", "sinuses"):
        values[name][t1ce] = max(values[name][t1ce], 1.6)
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


def synthesize(
    seed: int,
    *,
    size: Sequence[int] = (240, 240, 155),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    kind: str | None = None,
) -> SyntheticCase:
    """Make one synthetic case, with its healthy tissue map, kind and findings (for checks and tests).

    Args:
        seed: non-negative integer; the same seed (and kind) gives the same case.
        size: grid shape ``(X, Y, Z)``; the grid covers ``size * spacing`` mm around the brain.
        spacing: voxel size in mm.
        kind: one of :data:`~training.data.synthetic.tumours.KINDS`; ``None`` draws one from the seed with the
            shares of :data:`~training.data.synthetic.tumours.KIND_DECK`.

    Returns:
        A :class:`SyntheticCase`.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    size_t, spacing_a = check_grid(size, spacing)
    rng = np.random.default_rng(int(seed))
    if kind is None:
        kind = KIND_DECK[int(rng.integers(len(KIND_DECK)))]
    affine = grid_affine(size_t, spacing_a)

    box, tissue, to_case = warp_anatomy(rng, size_t, spacing_a, affine)
    box_shape = tissue.shape[1:]
    total = tissue.sum(axis=0)
    brain = total > 0.5
    safe_total = np.maximum(total, 1e-6)

    to_box_voxel = np.linalg.inv(affine) @ to_case  # template world (where landmarks are) -> box voxel
    to_box_voxel[:3, 3] -= [s.start for s in box]
    foci = draw_foci(rng, kind, to_box_voxel, box_shape)
    lesions = [grow_lesion(rng, focus, tissue, brain, spacing_a) for focus in foci]
    findings = draw_findings(rng, tissue, brain, spacing_a, to_box_voxel)

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
    tumour_free = (label.ravel()[flat_idx] == 0).astype(np.float32)  # findings never sit inside a tumour label
    finding_w = []
    for finding in findings:
        w = finding.weight.ravel()[flat_idx] * tumour_free
        nz = np.flatnonzero(w)
        finding_w.append((finding.name, nz, w[nz]))

    gammas = rng.uniform(0.8, 1.3, size=len(MODALITIES))
    bias_strength = rng.uniform(0.05, 0.3)
    noise_level = rng.uniform(0.01, 0.06)
    blur = rng.random() < 0.3
    blur_sigma = np.array([rng.uniform(0.0, 0.8), rng.uniform(0.0, 0.8), rng.uniform(0.3, 1.5)])  # mm
    image = np.zeros((len(MODALITIES), math.prod(size_t)), dtype=np.float32)
    full_idx = np.ravel_multi_index(tuple(v + s.start for v, s in zip(vox, box)), size_t)
    for m in range(len(MODALITIES)):
        tissue_values = np.array([values["gm"][m], values["wm"][m], values["csf"][m]], dtype=np.float32)
        signal = tissue_values @ fractions
        for name, nz, w in finding_w:
            signal[nz] += w * (np.float32(values[name][m]) - signal[nz])
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
        signal = np.power(np.maximum(signal, 1e-3), np.float32(gammas[m]))
        level = rng.uniform(250.0, 1100.0)
        sigma = np.float32(noise_level * rng.uniform(0.7, 1.3) * level)
        signal *= _bias_field(rng, coords, strength=bias_strength) * np.float32(level)
        if blur:
            volume = np.zeros(box_shape, dtype=np.float32)
            volume.ravel()[flat_idx] = signal
            signal = ndi.gaussian_filter(volume, blur_sigma / spacing_a).ravel()[flat_idx]
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
    finding_map = np.zeros(size_t, dtype=np.uint8)
    for finding in findings:
        bit = np.uint8(1 << FINDING_NAMES.index(finding.name))
        finding_map[box] |= np.where((finding.weight > 0.5) & (label == 0), bit, np.uint8(0))
    if not full_label.any():  # no focus fell on the grid (small grids only): record what the case is
        kind = "tumour_free"
    return SyntheticCase(image=image, label=full_label, affine=affine, tissue=full_tissue, kind=kind,
                         grade=grade_of(kind, foci), findings=finding_map)


def make_case(
    seed: int,
    *,
    size: Sequence[int] = (240, 240, 155),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    kind: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make one synthetic BraTS-like case.

    Args:
        seed: non-negative integer; the same seed (and kind) gives the same case.
        size: grid shape ``(X, Y, Z)`` (default the BraTS 240 x 240 x 155).
        spacing: voxel size in mm (default 1 mm isotropic); the grid covers ``size * spacing`` mm.
        kind: the case's kind, or ``None`` to draw it from the seed (see :func:`synthesize`).

    Returns:
        ``image`` ``(4, X, Y, Z)`` float32 (flair, t1, t1ce, t2; whole numbers, 0 outside the brain),
        ``label`` ``(X, Y, Z)`` uint8 with values {0, 1, 2, 4}, and the 4x4 ``affine``.
    """
    case = synthesize(seed, size=size, spacing=spacing, kind=kind)
    return case.image, case.label, case.affine
