"""Augmentation: every transform keeps image and label aligned and the background 0, with nnU-Net's ranges."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from training.data.augment import (
    TRANSFORMS,
    AugmentOptions,
    Augmenter,
    SpatialDraw,
    _affine_grid,
    _affine_theta,
    _gaussian_blur,
    _resample,
)

SHAPES = {3: (40, 36, 28), 2: (48, 40)}
SPATIAL = ("rotation", "scaling", "mirror")
INTENSITY = tuple(t for t in TRANSFORMS if t not in SPATIAL)
CUBES = {  # label value: (start, stop) per axis, inside the brain, two voxels apart
    3: {1: ((11, 19), (9, 17), (10, 18)), 2: ((21, 29), (9, 17), (10, 18)), 4: ((16, 24), (19, 27), (10, 18))},
    2: {1: ((12, 22), (8, 18)), 2: ((24, 34), (8, 18)), 4: ((17, 27), (20, 30))},
}


def phantom(spatial_dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A brain ellipsoid (background exactly 0) with three tumour cubes labelled 1, 2 and 4.

    Channel 0 is 1 in the brain plus 2 on the tumour (label > 0), channel 1 is 1 in the brain plus 2 on the
    enhancing cube (label 4); channels 2 and 3 are smooth positive noise in the brain.
    """
    shape = SHAPES[spatial_dims]
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = sum(a**2 for a in axes) < 0.8
    label = np.zeros(shape, np.uint8)
    for value, box in CUBES[spatial_dims].items():
        label[tuple(slice(*b) for b in box)] = value
    assert np.all(brain[label > 0]) and len(np.unique(label)) == 4
    noise = ndi.gaussian_filter(rng.normal(size=(2, *shape)), sigma=(0,) + (2,) * spatial_dims)
    image = np.stack([
        brain + 2.0 * (label > 0),
        brain + 2.0 * (label == 4),
        *(brain * (1.5 + noise / noise.std() * 0.3)),
    ]).astype(np.float32)
    return image, label


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def aligned(channel: np.ndarray, region: np.ndarray, brain: np.ndarray, max_shift: float = 0.5) -> float:
    """Dice of ``region`` with ``channel`` thresholded half-way between its mean on and off the region.

    Also checks that the region is the bright part of the channel and that both have the same centroid
    (within ``max_shift`` voxels): a blur or a lower resolution may round the edges, but nothing may move.
    """
    on, off = channel[region].mean(), channel[brain & ~region].mean()
    assert on > off + 0.5, (on, off)
    bright = channel > (on + off) / 2
    shift = np.subtract(ndi.center_of_mass(bright), ndi.center_of_mass(region))
    assert np.all(np.abs(shift) < max_shift), shift
    return dice(bright, region)


def augment(spatial_dims: int, *names: str, seed: int = 0, **changes) -> Augmenter:
    """An Augmenter with only ``names`` switched on (probability 1, every channel)."""
    options = AugmentOptions.only(*names, **{"p_per_channel": 1.0, **changes})
    return Augmenter(spatial_dims=spatial_dims, seed=seed, options=options)


@pytest.mark.parametrize("spatial_dims", [2, 3])
class TestEachTransformAlone:
    @pytest.mark.parametrize("names", [(t,) for t in TRANSFORMS] + [TRANSFORMS], ids=lambda n: "+".join(n))
    def test_label_stays_on_the_bright_voxels(self, spatial_dims, names):
        image, label = phantom(spatial_dims)
        aug = augment(spatial_dims, *names)
        # Sampling at half the resolution rounds the cubes and places them to within one of its voxels.
        overlap, shift = (0.75, 1.0) if "low_resolution" in names else (0.8, 0.5)
        for _ in range(3):
            out, out_label = aug(image, label)
            assert set(np.unique(out_label).tolist()) <= {0, 1, 2, 4}
            brain = np.any(out != 0, axis=0)
            assert aligned(out[0], out_label > 0, brain, shift) > overlap
            assert aligned(out[1], out_label == 4, brain, shift) > overlap
            if not set(names) & set(SPATIAL):
                np.testing.assert_array_equal(out_label, label)

    @pytest.mark.parametrize("name", INTENSITY)
    def test_intensity_transform_changes_only_the_brain(self, spatial_dims, name):
        image, label = phantom(spatial_dims)
        background = np.all(image == 0, axis=0)
        out, out_label = augment(spatial_dims, name, seed=1)(image, label)
        assert np.all(out[:, background] == 0)  # exactly
        assert not np.allclose(out, image)
        np.testing.assert_array_equal(out_label, label)

    def test_intensity_transforms_keep_the_spatial_background_exactly_zero(self, spatial_dims):
        """Same seed: the spatial draw is the same with and without the intensity transforms."""
        image, label = phantom(spatial_dims)
        for seed in range(3):
            spatial, spatial_label = augment(spatial_dims, *SPATIAL, seed=seed)(image, label)
            everything, everything_label = augment(spatial_dims, *TRANSFORMS, seed=seed)(image, label)
            np.testing.assert_array_equal(everything_label, spatial_label)
            background = np.all(spatial == 0, axis=0)
            assert background.any() and np.all(everything[:, background] == 0)
            assert np.array_equal(np.all(everything == 0, axis=0), background)


class TestSpatial:
    @pytest.mark.parametrize("spatial_dims", [2, 3])
    def test_mirroring_flips_every_axis_exactly(self, spatial_dims):
        image, label = phantom(spatial_dims)
        out, out_label = augment(spatial_dims, "mirror")(image, label)
        axes = tuple(range(spatial_dims))
        np.testing.assert_array_equal(out_label, np.flip(label, axes))
        np.testing.assert_array_equal(out, np.flip(image, tuple(a + 1 for a in axes)))

    @pytest.mark.parametrize("spatial_dims", [2, 3])
    def test_mirroring_folded_into_the_grid_equals_a_flip(self, spatial_dims):
        image, label = phantom(spatial_dims)
        mirror = (True, False, True)[:spatial_dims]
        draw = SpatialDraw((0.0,) * (1 if spatial_dims == 2 else 3), 1.0, mirror)
        out, out_label = _resample(image, label, _affine_theta(draw, image.shape[1:]))
        axes = tuple(a for a, m in enumerate(mirror) if m)
        np.testing.assert_allclose(out, np.flip(image, tuple(a + 1 for a in axes)), atol=1e-5)
        np.testing.assert_array_equal(out_label, np.flip(label, axes))

    def test_no_rotation_no_zoom_is_an_exact_copy(self):
        image, label = phantom(3)
        aug = augment(3, "rotation", "scaling", max_rotation_deg=0.0, scale_range=(1.0, 1.0))
        out, out_label = aug(image, label)
        np.testing.assert_array_equal(out, image)
        np.testing.assert_array_equal(out_label, label)

    @pytest.mark.parametrize("shape", [(9, 8, 7), (24, 40), (5, 12, 6)])
    def test_grid_equals_torch_affine_grid(self, shape):
        theta = np.random.default_rng(0).normal(size=(len(shape), len(shape) + 1)).astype(np.float32)
        expected = F.affine_grid(torch.from_numpy(theta)[None], [1, 1, *shape], align_corners=False)
        torch.testing.assert_close(_affine_grid(theta, shape), expected, atol=1e-6, rtol=0)

    def test_quarter_turn_is_an_exact_rot90(self):
        image, label = phantom(2)
        image, label = image[:, :40, :40], label[:40, :40]
        turned = []
        for angle in (90.0, -90.0):
            theta = _affine_theta(SpatialDraw((angle,), 1.0, (False, False)), (40, 40))
            out, out_label = _resample(image, label, theta)
            k = 1 if np.array_equal(out_label, np.rot90(label, 1)) else -1
            np.testing.assert_array_equal(out_label, np.rot90(label, k))
            np.testing.assert_allclose(out, np.rot90(image, k, axes=(1, 2)), atol=1e-5)
            turned.append(k)
        assert turned[0] == -turned[1]

    def test_rotation_is_rigid_on_a_non_cubic_patch(self):
        """The patch centre stays put and a ring of radius 9 voxels keeps its radius (within sampling)."""
        shape, centre = (41, 23), (20, 11)
        yy, xx = np.meshgrid(np.arange(shape[0]) - centre[0], np.arange(shape[1]) - centre[1], indexing="ij")
        radius = np.hypot(yy, xx)
        label = np.where(np.abs(radius - 9) < 0.75, 4, 0).astype(np.uint8)
        label[centre] = 1
        aug = augment(2, "rotation", seed=4)
        for _ in range(4):
            _, out = aug(np.ones((1, *shape), np.float32), label)
            assert out[centre] == 1
            ring = radius[out == 4]
            assert ring.size > 50 and np.all(np.abs(ring - 9) < 1.2)  # a shear would stretch it by 1.4-3.2

    @pytest.mark.parametrize("zoom", [0.8, 1.25])
    def test_zoom_above_one_shrinks_structures(self, zoom):
        shape = (41, 41)
        yy, xx = np.meshgrid(np.arange(41) - 20, np.arange(41) - 20, indexing="ij")
        disk = (np.hypot(yy, xx) <= 10).astype(np.uint8)
        aug = augment(2, "scaling", scale_range=(zoom, zoom))
        out, out_label = aug(disk[None].astype(np.float32), disk)
        radius = np.sqrt(np.count_nonzero(out_label) / np.pi)
        assert radius == pytest.approx(10.0 / zoom, abs=0.4)
        assert dice(out[0] > 0.5, out_label > 0) > 0.97

    @pytest.mark.parametrize("spatial_dims", [2, 3])
    def test_drawn_angles_and_zooms_are_within_the_ranges(self, spatial_dims):
        aug = augment(spatial_dims, "rotation", "scaling")
        draws = [aug.sample_spatial() for _ in range(400)]
        angles = np.array([d.angles_deg for d in draws])
        zooms = np.array([d.zoom for d in draws])
        assert angles.shape == (400, 1 if spatial_dims == 2 else 3)
        assert np.all(np.abs(angles) <= 30.0) and angles.min() < -27 and angles.max() > 27
        assert np.all((zooms >= 0.7) & (zooms <= 1.4)) and zooms.min() < 0.75 and zooms.max() > 1.35
        assert not any(any(d.mirror) for d in draws)

    def test_default_probabilities_are_nnunets(self):
        aug = Augmenter(spatial_dims=3, seed=0)
        draws = [aug.sample_spatial() for _ in range(4000)]
        rotated = np.mean([any(a != 0 for a in d.angles_deg) for d in draws])
        scaled = np.mean([d.zoom != 1.0 for d in draws])
        mirrored = np.mean([d.mirror for d in draws], axis=0)
        assert 0.17 < rotated < 0.23 and 0.17 < scaled < 0.23
        assert np.all((mirrored > 0.46) & (mirrored < 0.54))
        options = AugmentOptions()
        assert (options.p_noise, options.p_blur, options.p_brightness, options.p_contrast) == (0.1, 0.2, 0.15, 0.15)
        assert (options.p_low_resolution, options.p_gamma_inverted, options.p_gamma) == (0.25, 0.1, 0.3)


class TestIntensity:
    """Each intensity transform on its own, against what it should do to the brain voxels."""

    def setup_method(self):
        self.image, self.label = phantom(3)
        self.brain = np.any(self.image != 0, axis=0)

    def test_brightness_multiplies_each_channel_by_a_factor_in_range(self):
        out, _ = augment(3, "brightness", seed=2)(self.image, self.label)
        factors = [out[c][self.brain] / self.image[c][self.brain] for c in range(4)]
        for f in factors:
            assert np.ptp(f) < 1e-5 and 0.75 <= f[0] <= 1.25
        assert len({round(float(f[0]), 6) for f in factors}) == 4  # drawn per channel

    def test_contrast_stretches_about_the_brain_mean_within_its_range(self):
        for seed in range(4):
            out, _ = augment(3, "contrast", seed=seed)(self.image, self.label)
            for c in range(4):
                before, after = self.image[c][self.brain], out[c][self.brain]
                assert before.min() - 1e-5 <= after.min() and after.max() <= before.max() + 1e-5
                if c < 2:
                    continue  # two levels only: clipped at both ends, or moved inside
                inside = (after > before.min() + 1e-4) & (after < before.max() - 1e-4)  # not clipped
                assert inside.sum() > 100
                slope = np.polyfit(before[inside] - before.mean(), after[inside] - before.mean(), 1)
                assert 0.75 - 1e-4 <= slope[0] <= 1.25 + 1e-4 and abs(slope[1]) < 1e-4

    @pytest.mark.parametrize("name", ["gamma", "gamma_inverted"])
    def test_gamma_keeps_brain_mean_std_and_order(self, name):
        out, _ = augment(3, name, seed=3)(self.image, self.label)
        for c in (2, 3):
            before, after = self.image[c][self.brain], out[c][self.brain]
            assert after.mean() == pytest.approx(before.mean(), abs=1e-4)
            assert after.std() == pytest.approx(before.std(), rel=1e-4)
            assert np.all(np.diff(after[np.argsort(before)]) >= -1e-5)  # monotone
            assert not np.allclose(after, before, atol=1e-3)

    def test_noise_is_gaussian_with_std_at_most_0_1_shared_by_channels(self):
        stds = []
        for seed in range(3):
            out, _ = augment(3, "noise", seed=seed)(self.image, self.label)
            difference = (out - self.image)[:, self.brain]
            assert np.all(out[:, ~self.brain] == 0)
            per_channel = difference.std(axis=1)
            assert np.ptp(per_channel) < 0.1 * per_channel.mean() + 1e-3
            stds.append(per_channel.mean())
        assert all(0 < s <= 0.101 for s in stds) and len(set(np.round(stds, 4))) == 3

    def test_blur_and_low_resolution_keep_a_constant_interior(self):
        flat = np.where(self.brain, 1.0, 0.0).astype(np.float32)[None].repeat(4, axis=0)
        interior = ndi.binary_erosion(self.brain, np.ones((3, 3, 3), bool), iterations=4)  # beyond the kernels
        for name in ("blur", "low_resolution"):
            out, _ = augment(3, name, seed=5)(flat, self.label)
            np.testing.assert_allclose(out[:, interior], 1.0, atol=1e-5)
            assert np.all(out[:, ~self.brain] == 0) and not np.allclose(out, flat)

    @pytest.mark.parametrize("shape", [(9, 8, 7), (24, 40), (3, 10, 12)])
    def test_blur_equals_scipy(self, shape):
        rng = np.random.default_rng(0)
        x = rng.normal(size=shape).astype(np.float32)
        sigmas = rng.uniform(0.5, 1.0, size=len(shape))
        expected = ndi.gaussian_filter(x, sigmas, mode="mirror", truncate=3.0)
        np.testing.assert_allclose(_gaussian_blur(x, sigmas), expected, atol=1e-6)


class TestContract:
    @pytest.mark.parametrize("spatial_dims", [2, 3])
    def test_new_arrays_shapes_dtypes_inputs_untouched(self, spatial_dims):
        image, label = phantom(spatial_dims)
        image_before, label_before = image.copy(), label.copy()
        cases = [AugmentOptions.only()] + [AugmentOptions.only(t) for t in TRANSFORMS]
        cases += [AugmentOptions.only(*TRANSFORMS), AugmentOptions()]
        for options in cases:
            out_image, out_label = Augmenter(spatial_dims=spatial_dims, seed=0, options=options)(image, label)
            assert out_image.shape == image.shape and out_image.dtype == np.float32
            assert out_label.shape == label.shape and out_label.dtype == np.uint8
            assert not np.shares_memory(out_image, image) and not np.shares_memory(out_label, label)
            assert out_image.flags.c_contiguous and out_image.flags.writeable
            assert out_label.flags.c_contiguous and out_label.flags.writeable
        np.testing.assert_array_equal(image, image_before)
        np.testing.assert_array_equal(label, label_before)

    def test_read_only_and_other_dtypes_are_accepted_quietly(self):
        image, label = phantom(3)
        image = image.astype(np.float64)
        image.setflags(write=False)
        label.setflags(write=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, out_label = augment(3, *TRANSFORMS)(image, label.astype(np.int64))
        assert out.dtype == np.float32 and out_label.dtype == np.uint8

    @pytest.mark.parametrize("options", [AugmentOptions(), AugmentOptions.only(*TRANSFORMS)], ids=["defaults", "all"])
    def test_deterministic_with_seed(self, options):
        image, label = phantom(3)
        runs = []
        for seed in (5, 5, 6):
            aug = Augmenter(spatial_dims=3, seed=seed, options=options)
            runs.append([aug(image, label) for _ in range(4)])
        for (a_img, a_lab), (b_img, b_lab) in zip(runs[0], runs[1]):
            np.testing.assert_array_equal(a_img, b_img)
            np.testing.assert_array_equal(a_lab, b_lab)
        assert any(not np.array_equal(a[0], c[0]) for a, c in zip(runs[0], runs[2]))

    def test_training_call_with_only_the_two_arguments(self):
        image, label = phantom(3)
        aug = Augmenter(spatial_dims=3, seed=0)
        assert aug.options == AugmentOptions()
        outputs = [aug(image, label) for _ in range(6)]
        assert len({o[0].tobytes() for o in outputs}) > 1

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
            Augmenter(spatial_dims=1)
        with pytest.raises(ValueError, match="options must be an AugmentOptions"):
            Augmenter(spatial_dims=3, options={"p_noise": 1.0})
        with pytest.raises(ValueError, match=r"p_rotation must be a probability in \[0, 1\]"):
            AugmentOptions(p_rotation=2.0)
        with pytest.raises(ValueError, match=r"scale_range must be \(low, high\) with low > 0"):
            AugmentOptions(scale_range=(1.4, 0.7))
        with pytest.raises(ValueError, match=r"low_resolution_zoom must lie in \(0, 1\]"):
            AugmentOptions(low_resolution_zoom=(0.5, 2.0))
        with pytest.raises(ValueError, match=r"max_rotation_deg must be in \[0, 180\]"):
            AugmentOptions(max_rotation_deg=-1.0)
        with pytest.raises(ValueError, match="unknown transform.*'elastic'.*valid names: rotation"):
            AugmentOptions.only("elastic")
        aug = Augmenter(spatial_dims=3, seed=0)
        with pytest.raises(ValueError, match=r"expected an image of shape \(C, X, Y, Z\)"):
            aug(np.zeros((4, 8, 8), np.float32), np.zeros((8, 8), np.uint8))
        with pytest.raises(ValueError, match=r"label shape \(8, 8, 7\) does not match"):
            aug(np.zeros((4, 8, 8, 8), np.float32), np.zeros((8, 8, 7), np.uint8))

    def test_options_are_frozen(self):
        with pytest.raises(dataclasses.FrozenInstanceError):
            AugmentOptions().p_noise = 1.0  # type: ignore[misc]
