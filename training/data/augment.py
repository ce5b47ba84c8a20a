"""Data augmentation of training patches with nnU-Net v2's transforms, probabilities and ranges.

The transforms and their defaults follow ``nnUNetTrainer.get_training_transforms`` (nnU-Net v2 with
batchgeneratorsv2), in its order; each one is applied to a patch with its own probability:

=====================  =====  ==========================================================================
transform              p      what it does
=====================  =====  ==========================================================================
rotation               0.2    about each axis, uniform in +/- 30 degrees (2D: one in-plane angle)
scaling                0.2    isotropic zoom of the sampling grid, uniform in [0.7, 1.4] (> 1 shrinks)
Gaussian noise         0.1    additive, standard deviation uniform in [0, 0.1], the same for all channels
Gaussian blur          0.2    each channel with p 0.5, sigma uniform in [0.5, 1] per axis and channel
brightness             0.15   each channel times a factor in [0.75, 1.25] (half of the draws below 1)
contrast               0.15   each channel stretched about its mean by such a factor, kept in its range
low resolution         0.25   each channel with p 0.5: nearest down by a zoom in [0.5, 1], linear back up
inverted gamma         0.1    each channel: negate, gamma in [0.7, 1.5], negate back (mean and std kept)
gamma                  0.3    each channel: gamma in [0.7, 1.5] on its min-max range (mean and std kept)
mirroring              0.5    along each spatial axis independently
=====================  =====  ==========================================================================

Rotation and scaling share one sampling grid (``torch.nn.functional.grid_sample``, zeros outside), built
by broadcasting (``F.affine_grid`` is about 8 times slower on one thread); the image is interpolated
linearly, the label with nearest neighbour, and nothing is resampled when neither fires. nnU-Net's
elastic deformation is off by default there and is left out here. Mirroring, nnU-Net's last step,
commutes with the others (in distribution for the noise, up to the sampling phase of the low-resolution
step), so it is folded into that grid, or into the one copy made of the input, at no cost of its own.

Background: voxels that are exactly 0 in every channel after the spatial step (outside the brain, and the
zero padding) are the background, and every intensity transform leaves them exactly 0, as the background
is at inference. The statistics the transforms use (mean, standard deviation, minimum and maximum) are
those of the brain voxels; blur and low resolution mix brain and background values at the brain's rim and
then reset the background to 0.

Everything random is drawn from one seeded ``numpy.random.Generator`` (the noise through a torch
generator seeded from it), so a seeded :class:`Augmenter` gives the same sequence of outputs.

Cost on the shared 2-core development machine with 1 torch thread, both cores busy with other work
(``python -m benchmarks.augment``, four runs: medians of 7 to 9 calls with one transform always on, for a
``4 x 64^3`` / ``4 x 96^3`` patch, in ms): rotation and scaling 19-29 / 62-73, rotation alone 19-33 /
61-100, scaling alone 16-26 / 43-62, noise 5-9 / 16-23, blur (all channels) 7-12 / 21-29, brightness
0.3 / 1.5-3, contrast 1.5 / 5-6, low resolution (all channels) 7-11 / 23-29, gamma and inverted gamma 3-4 /
9-16, mirroring alone 0.4 / 1.3, the input copy when nothing fires 0.1 / 0.8; with the default
probabilities 10-15 / 31-38 ms per patch on average (100 patches), about two thirds of it resampling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

TRANSFORMS = (
    "rotation", "scaling", "noise", "blur", "brightness", "contrast", "low_resolution", "gamma_inverted",
    "gamma", "mirror",
)
"""Names of the transforms, in the order they are applied; each has a probability ``p_NAME``."""


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """Probabilities and ranges of the transforms; the defaults are nnU-Net v2's.

    Each ``p_NAME`` is the probability that transform ``NAME`` is applied to a patch (``p_mirror`` per
    axis). Ranges are ``(low, high)`` and drawn uniformly unless said otherwise.

    Args:
        p_rotation: Probability of a rotation.
        max_rotation_deg: Largest rotation about each axis, in degrees (nnU-Net's for 3D patches; its 2D
            setting allows up to 180).
        p_scaling: Probability of an isotropic zoom.
        scale_range: Zoom of the sampling grid; above 1 the structures get smaller.
        p_noise: Probability of additive Gaussian noise.
        noise_std: Range of its standard deviation (z-score units), one value for all channels.
        p_blur: Probability of a Gaussian blur.
        blur_sigma: Range of the blur's sigma in voxels, drawn per axis and channel.
        p_brightness: Probability of a multiplicative brightness change.
        brightness_range: Range of the per-channel factor; half of the draws fall below 1, half above.
        p_contrast: Probability of a contrast change.
        contrast_range: Range of the per-channel factor, drawn like ``brightness_range``.
        p_low_resolution: Probability of simulating a lower resolution.
        low_resolution_zoom: Range of the per-channel zoom of the downsampling (the same on every axis).
        p_gamma_inverted: Probability of a gamma change on the negated image.
        p_gamma: Probability of a gamma change.
        gamma_range: Range of the per-channel gamma, drawn like ``brightness_range``.
        p_mirror: Probability of mirroring, for each spatial axis independently.
        p_per_channel: Probability that the blur and the low-resolution step touch each channel.
    """

    p_rotation: float = 0.2
    max_rotation_deg: float = 30.0
    p_scaling: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_low_resolution: float = 0.25
    low_resolution_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5
    p_per_channel: float = 0.5

    def __post_init__(self) -> None:
        for name in [f"p_{t}" for t in TRANSFORMS] + ["p_per_channel"]:
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ValueError(f"max_rotation_deg must be in [0, 180], got {self.max_rotation_deg!r}")
        for name in ("scale_range", "blur_sigma", "brightness_range", "contrast_range", "gamma_range",
                     "noise_std", "low_resolution_zoom"):
            value = getattr(self, name)
            if len(value) != 2 or not (0.0 if name == "noise_std" else 1e-6) <= value[0] <= value[1]:
                lowest = ">= 0" if name == "noise_std" else "> 0"
                raise ValueError(f"{name} must be (low, high) with low {lowest} and low <= high, got {value!r}")
        if self.low_resolution_zoom[1] > 1.0:
            raise ValueError(f"low_resolution_zoom must lie in (0, 1], got {self.low_resolution_zoom!r}")

    @classmethod
    def only(cls, *names: str, **changes) -> AugmentOptions:
        """Options with the named transforms always on and every other one off (``changes`` on top)."""
        unknown = sorted(set(names) - set(TRANSFORMS))
        if unknown:
            raise ValueError(f"unknown transform(s) {unknown}; valid names: {', '.join(TRANSFORMS)}")
        probabilities = {f"p_{t}": float(t in names) for t in TRANSFORMS}
        return cls(**{**probabilities, **changes})


class SpatialDraw(NamedTuple):
    """One draw of the spatial transforms: angles (degrees, one per rotation plane), zoom, mirrored axes."""

    angles_deg: tuple[float, ...]
    zoom: float
    mirror: tuple[bool, ...]

    @property
    def resamples(self) -> bool:
        """Whether the draw needs a sampling grid (a rotation or a zoom)."""
        return any(a != 0.0 for a in self.angles_deg) or self.zoom != 1.0


class Augmenter:
    """Random augmentation of an ``(image, label)`` training pair (see the module docstring).

    Args:
        spatial_dims: 2 (image ``(C, X, Y)``, label ``(X, Y)``) or 3 (image ``(C, X, Y, Z)``, label
            ``(X, Y, Z)``).
        seed: Seed of the generator; ``None`` for fresh entropy.
        options: Probabilities and ranges; ``None`` for nnU-Net's (:class:`AugmentOptions`).
    """

    def __init__(self, *, spatial_dims: int, seed: int | None = None, options: AugmentOptions | None = None) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if options is not None and not isinstance(options, AugmentOptions):
            raise ValueError(f"options must be an AugmentOptions or None, got {type(options).__name__}")
        self.spatial_dims = spatial_dims
        self.options = options or AugmentOptions()
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Augment one pair.

        Args:
            image: ``(C, *spatial)`` float array, z-scored, with the background exactly 0 in every channel.
            label: ``(*spatial)`` integer array with BraTS values {0, 1, 2, 4}.

        Returns:
            New C-contiguous arrays ``(image float32 (C, *spatial), label uint8 (*spatial))``; the inputs
            are not modified.
        """
        image, label = np.asarray(image), np.asarray(label)
        if image.ndim != self.spatial_dims + 1:
            raise ValueError(
                f"expected an image of shape (C, {', '.join('XYZ'[: self.spatial_dims])}) for spatial_dims="
                f"{self.spatial_dims}, got shape {image.shape}"
            )
        if label.shape != image.shape[1:]:
            raise ValueError(f"label shape {label.shape} does not match the image's spatial shape {image.shape[1:]}")

        draw = self.sample_spatial()
        if draw.resamples:
            image, label = _resample(image, label, _affine_theta(draw, image.shape[1:]))
        else:  # the one copy of the input, mirrored on the way
            axes = tuple(ax for ax, flip in enumerate(draw.mirror) if flip)
            image = np.array(np.flip(image, tuple(a + 1 for a in axes)), dtype=np.float32, order="C", copy=True)
            label = np.array(np.flip(label, axes), dtype=np.uint8, order="C", copy=True)
        return self._intensity(image), label

    def sample_spatial(self) -> SpatialDraw:
        """Draw the rotation angles, the zoom and the mirrored axes of one call."""
        o, rng = self.options, self.rng
        planes = 1 if self.spatial_dims == 2 else 3
        rotate, scale = rng.random() < o.p_rotation, rng.random() < o.p_scaling
        angles = rng.uniform(-o.max_rotation_deg, o.max_rotation_deg, size=planes) if rotate else np.zeros(planes)
        zoom = rng.uniform(*o.scale_range) if scale else 1.0
        mirror = rng.random(self.spatial_dims) < o.p_mirror
        return SpatialDraw(tuple(float(a) for a in angles), float(zoom), tuple(bool(m) for m in mirror))

    def _intensity(self, image: np.ndarray) -> np.ndarray:
        """The intensity transforms, in order, in place on ``image`` (a float32 array this call owns)."""
        o = self.options
        steps = (
            (o.p_noise, self._noise), (o.p_blur, self._blur), (o.p_brightness, self._brightness),
            (o.p_contrast, self._contrast), (o.p_low_resolution, self._low_resolution),
            (o.p_gamma_inverted, self._gamma_inverted), (o.p_gamma, self._gamma),
        )
        brain: np.ndarray | None = None  # voxels nonzero in some channel; computed on first use
        for probability, step in steps:
            if self.rng.random() < probability:
                if brain is None:
                    brain = np.logical_or.reduce(image != 0, axis=0)
                step(image, brain)
        return image

    def _noise(self, image: np.ndarray, brain: np.ndarray) -> None:
        std = self.rng.uniform(*self.options.noise_std)
        generator = torch.Generator().manual_seed(int(self.rng.integers(2**62)))
        noise = torch.empty(image.shape, dtype=torch.float32).normal_(0.0, std, generator=generator).numpy()
        np.add(image, noise, out=image, where=brain)

    def _blur(self, image: np.ndarray, brain: np.ndarray) -> None:
        for c in self._some_channels(image.shape[0]):
            sigma = self.rng.uniform(*self.options.blur_sigma, size=self.spatial_dims)
            image[c] = _gaussian_blur(image[c], sigma) * brain

    def _brightness(self, image: np.ndarray, brain: np.ndarray) -> None:
        for c in range(image.shape[0]):
            image[c] *= _factor(self.rng, self.options.brightness_range)

    def _contrast(self, image: np.ndarray, brain: np.ndarray) -> None:
        for c in range(image.shape[0]):
            factor = _factor(self.rng, self.options.contrast_range)
            values = image[c][brain]
            if values.size:
                mean = values.mean()
                image[c][brain] = np.clip((values - mean) * factor + mean, values.min(), values.max())

    def _low_resolution(self, image: np.ndarray, brain: np.ndarray) -> None:
        shape = image.shape[1:]
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        for c in self._some_channels(image.shape[0]):
            zoom = self.rng.uniform(*self.options.low_resolution_zoom)
            small = [max(1, round(n * zoom)) for n in shape]
            x = torch.from_numpy(image[c])[None, None]
            x = F.interpolate(F.interpolate(x, small, mode="nearest-exact"), shape, mode=mode, align_corners=False)
            image[c] = x[0, 0].numpy() * brain

    def _gamma_inverted(self, image: np.ndarray, brain: np.ndarray) -> None:
        self._gamma(image, brain, invert=True)

    def _gamma(self, image: np.ndarray, brain: np.ndarray, invert: bool = False) -> None:
        for c in range(image.shape[0]):
            gamma = _factor(self.rng, self.options.gamma_range)
            values = image[c][brain]
            if values.size < 2:
                continue
            if invert:
                np.negative(values, out=values)
            mean, std, low, high = values.mean(), values.std(), values.min(), values.max()
            span = max(high - low, 1e-7)
            values = ((values - low) / span) ** gamma * span + low
            values = (values - values.mean()) * (std / max(values.std(), 1e-7)) + mean
            image[c][brain] = -values if invert else values

    def _some_channels(self, channels: int) -> list[int]:
        return [c for c in range(channels) if self.rng.random() < self.options.p_per_channel]


def _factor(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """A factor in ``bounds``: with probability 1/2 below 1 (if the range reaches below 1), else above."""
    low, high = bounds
    if low < 1.0 and rng.random() < 0.5:
        return float(rng.uniform(low, min(1.0, high)))
    return float(rng.uniform(max(low, 1.0), high) if high >= 1.0 else rng.uniform(low, high))


def _gaussian_blur(x: np.ndarray, sigmas: np.ndarray, truncate: float = 3.0) -> np.ndarray:
    """Separable Gaussian blur of ``x`` with one sigma per axis (voxels), mirrored at the borders.

    Equal to ``scipy.ndimage.gaussian_filter(x, sigmas, mode="mirror", truncate=3)``; the sum of shifted
    slices is about twice as fast for these small kernels, mostly on the first axis.
    """
    for axis, sigma in enumerate(sigmas):
        radius = int(truncate * sigma + 0.5)
        if radius == 0:
            continue
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        taps = (taps / taps.sum()).astype(np.float32)
        padding = [(0, 0)] * x.ndim
        padding[axis] = (radius, radius)
        padded = np.pad(x, padding, mode="reflect")
        n = x.shape[axis]
        shifted = [padded[(slice(None),) * axis + (slice(i, i + n),)] for i in range(2 * radius + 1)]
        x = shifted[0] * taps[0]
        for weight, part in zip(taps[1:], shifted[1:]):
            x += part * weight
    return x


def _affine_theta(draw: SpatialDraw, shape: tuple[int, ...]) -> np.ndarray:
    """The ``theta`` of ``F.affine_grid`` for a draw: mirror, then rotate and zoom about the patch centre.

    The transform is built in voxel units along the array axes, then expressed in grid_sample's normalised
    coordinates (which run over the array axes in reverse order, each in [-1, 1]); doing it in voxel units
    keeps a rotation rigid on non-cubic patches.
    """
    nd = len(shape)
    planes = [(0, 1)] if nd == 2 else [(1, 2), (0, 2), (0, 1)]  # 3D: about the X, Y and Z axes
    rotation = np.eye(nd)
    for angle, (i, j) in zip(draw.angles_deg, planes):
        r = np.eye(nd)
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = r @ rotation
    mirror = np.diag([-1.0 if m else 1.0 for m in draw.mirror])
    voxel = rotation * draw.zoom @ mirror  # output voxel offset -> input voxel offset (from the centre)
    half = np.asarray(shape, dtype=np.float64) / 2.0  # normalised -> voxel offset (align_corners=False)
    normalised = np.diag(1.0 / half) @ voxel @ np.diag(half)
    theta = np.zeros((nd, nd + 1), dtype=np.float32)
    theta[:, :nd] = normalised[::-1, ::-1]  # grid coordinates are (last axis, ..., first axis)
    return theta


def _affine_grid(theta: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """``F.affine_grid(theta[None], (1, 1, *shape), align_corners=False)``, built by broadcasting.

    Each grid coordinate is a sum of one term per axis, so it is filled from 1D vectors; this is about
    8 times faster than ``F.affine_grid`` on one CPU thread for a 96^3 patch.
    """
    nd = len(shape)
    centres = [(torch.arange(n, dtype=torch.float64) * 2 + 1) / n - 1 for n in shape]  # normalised voxel centres
    grid = torch.empty((1, *shape, nd), dtype=torch.float32)
    for k in range(nd):  # grid[..., k] drives input axis nd - 1 - k; theta's column j multiplies axis nd - 1 - j
        total = torch.full((1,) * nd, float(theta[k, nd]), dtype=torch.float32)
        for axis, coords in enumerate(centres):
            view = [1] * nd
            view[axis] = -1
            total = total + (float(theta[k, nd - 1 - axis]) * coords).float().view(view)
        grid[0, ..., k] = total
    return grid


def _resample(image: np.ndarray, label: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image (linear) and label (nearest) through one grid, zeros outside; new arrays."""
    grid = _affine_grid(theta, image.shape[1:])
    img = torch.from_numpy(np.require(image, np.float32, ["C", "W"]))[None]
    lab = torch.from_numpy(label.astype(np.float32))[None, None]
    with torch.no_grad():
        out_img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out_lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out_img[0].numpy(), out_lab[0, 0].numpy().astype(np.uint8)
