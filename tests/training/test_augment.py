"""Augmentation: flips keep image and label aligned, affine is rigid+zoom, intensity stays in the brain."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from training.data.augment import Augmenter

ONLY_FLIPS = dict(prob_flip=1.0, prob_intensity=0.0, prob_affine=0.0)
ONLY_INTENSITY = dict(prob_flip=0.0, prob_intensity=1.0, prob_affine=0.0)
ONLY_AFFINE = dict(prob_flip=0.0, prob_intensity=0.0, prob_affine=1.0)


def pair(shape=(9, 8, 7), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Random labels in {0,1,2,4}; image channel 0 equals the label, the others are smooth noise."""
    rng = np.random.default_rng(seed)
    label = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=shape)
    noise = ndi.gaussian_filter(rng.normal(size=(3, *shape)), sigma=(0,) + (1,) * len(shape))
    image = np.concatenate([label[None].astype(np.float32), noise.astype(np.float32)])
    return image, label


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


class TestFlips:
    def test_marker_voxel_moves_to_the_mirrored_place_in_both(self):
        image = np.zeros((2, 9, 8, 7), np.float32)
        label = np.zeros((9, 8, 7), np.uint8)
        image[1, 1, 2, 3] = 5.0
        label[1, 2, 3] = 4
        out_image, out_label = Augmenter(spatial_dims=3, **ONLY_FLIPS, seed=0)(image, label)
        assert out_label[9 - 1 - 1, 8 - 1 - 2, 7 - 1 - 3] == 4 and np.count_nonzero(out_label) == 1
        assert out_image[1, 7, 5, 3] == 5.0 and np.count_nonzero(out_image) == 1

    @pytest.mark.parametrize("spatial_dims", [2, 3])
    def test_random_flips_keep_alignment(self, spatial_dims):
        image, label = pair(shape=(9, 8, 7)[:spatial_dims])
        augment = Augmenter(spatial_dims=spatial_dims, prob_flip=0.5, prob_intensity=0.0, prob_affine=0.0, seed=1)
        seen = set()
        for _ in range(12):
            out_image, out_label = augment(image, label)
            np.testing.assert_array_equal(out_image[0], out_label)
            seen.add(out_label.tobytes())
        assert len(seen) > 1  # some calls flipped, some not


class TestIntensity:
    def test_scale_and_shift_per_channel_inside_the_brain_only(self):
        image = np.zeros((4, 6, 6, 6), np.float32)
        image[:, 1:5, 1:5, 1:5] = np.arange(1, 5, dtype=np.float32)[:, None, None, None]
        image[:, 2, 2, 2] = 10.0
        label = np.zeros((6, 6, 6), np.uint8)
        out, out_label = Augmenter(spatial_dims=3, **ONLY_INTENSITY, seed=2)(image, label)
        assert np.all(out[:, 0] == 0) and np.all(out[:, 5] == 0)  # background stays exactly 0
        for c in range(4):
            low, high = float(out[c, 1, 1, 1]), float(out[c, 2, 2, 2])
            scale = (high - low) / (10.0 - (c + 1))
            shift = low - scale * (c + 1)
            assert 0.9 <= scale <= 1.1 and -0.1 <= shift <= 0.1
            assert not np.isclose(scale, 1.0) or not np.isclose(shift, 0.0)
        np.testing.assert_array_equal(out_label, label)


class TestAffine:
    def test_no_rotation_no_zoom_is_identity(self):
        image, label = pair()
        augment = Augmenter(spatial_dims=3, **ONLY_AFFINE, max_rotation_deg=0.0, scale_range=(1.0, 1.0), seed=0)
        out_image, out_label = augment(image, label)
        np.testing.assert_allclose(out_image, image, atol=1e-5)
        np.testing.assert_array_equal(out_label, label)

    @pytest.mark.parametrize("spatial_dims", [2, 3])
    def test_label_stays_in_brats_values_and_follows_the_image(self, spatial_dims):
        shape = (24, 20, 16)[:spatial_dims]
        label = np.zeros(shape, np.uint8)
        label[tuple(slice(4, n - 4) for n in shape)] = 2
        label[tuple(slice(7, n - 7) for n in shape)] = 4
        image = np.stack([label.astype(np.float32), np.ones(shape, np.float32)])
        augment = Augmenter(spatial_dims=spatial_dims, **ONLY_AFFINE, seed=3)
        unmoved = []
        for _ in range(4):
            out_image, out_label = augment(image, label)
            assert set(np.unique(out_label).tolist()) <= {0, 1, 2, 4}
            # Bilinear image (thresholded half-way) and nearest label moved together.
            assert dice(out_label == 4, out_image[0] > 3) > 0.95
            assert dice(out_label > 0, out_image[0] > 1) > 0.95
            unmoved.append(dice(label == 4, out_image[0] > 3))
        assert min(unmoved) < 0.95  # the transforms did move the image

    def test_rotation_is_rigid_on_a_non_cubic_patch(self):
        """The patch centre stays put and a ring of radius 9 voxels keeps its radius (within sampling)."""
        shape, centre = (41, 23), (20, 11)
        yy, xx = np.meshgrid(np.arange(shape[0]) - centre[0], np.arange(shape[1]) - centre[1], indexing="ij")
        radius = np.hypot(yy, xx)
        label = np.where(np.abs(radius - 9) < 0.75, 4, 0).astype(np.uint8)
        label[centre] = 1
        augment = Augmenter(spatial_dims=2, **ONLY_AFFINE, scale_range=(1.0, 1.0), seed=4)
        for _ in range(4):
            _, out = augment(np.ones((1, *shape), np.float32), label)
            assert out[centre] == 1
            ring = radius[out == 4]
            assert ring.size > 50 and np.all(np.abs(ring - 9) < 1.2)  # a shear would stretch it by 1.4-3.2


class TestContract:
    @pytest.mark.parametrize("spatial_dims", [2, 3])
    def test_new_arrays_shapes_and_dtypes(self, spatial_dims):
        image, label = pair(shape=(9, 8, 7)[:spatial_dims])
        image_before, label_before = image.copy(), label.copy()
        nothing = dict(prob_flip=0.0, prob_intensity=0.0, prob_affine=0.0)
        everything = dict(prob_flip=1.0, prob_intensity=1.0, prob_affine=1.0)
        flip_and_intensity = dict(prob_flip=1.0, prob_intensity=1.0, prob_affine=0.0)
        for probs in (nothing, ONLY_FLIPS, ONLY_INTENSITY, ONLY_AFFINE, flip_and_intensity, everything):
            out_image, out_label = Augmenter(spatial_dims=spatial_dims, **probs, seed=0)(image, label)
            assert out_image.shape == image.shape and out_image.dtype == np.float32
            assert out_label.shape == label.shape and out_label.dtype == np.uint8
            assert not np.shares_memory(out_image, image) and not np.shares_memory(out_label, label)
            assert out_image.flags.c_contiguous and out_image.flags.writeable
        np.testing.assert_array_equal(image, image_before)
        np.testing.assert_array_equal(label, label_before)

    def test_deterministic_with_seed(self):
        image, label = pair()
        runs = []
        for seed in (5, 5, 6):
            augment = Augmenter(spatial_dims=3, prob_flip=0.5, prob_intensity=0.5, prob_affine=0.5, seed=seed)
            runs.append([augment(image, label) for _ in range(4)])
        for (a_img, a_lab), (b_img, b_lab) in zip(runs[0], runs[1]):
            np.testing.assert_array_equal(a_img, b_img)
            np.testing.assert_array_equal(a_lab, b_lab)
        assert any(not np.array_equal(a[0], c[0]) for a, c in zip(runs[0], runs[2]))

    def test_bad_inputs(self):
        with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
            Augmenter(spatial_dims=1)
        with pytest.raises(ValueError, match=r"prob_affine must be a probability in \[0, 1\]"):
            Augmenter(spatial_dims=3, prob_affine=2.0)
        augment = Augmenter(spatial_dims=3, seed=0)
        with pytest.raises(ValueError, match=r"expected an image of shape \(C, X, Y, Z\)"):
            augment(np.zeros((4, 8, 8), np.float32), np.zeros((8, 8), np.uint8))
        with pytest.raises(ValueError, match=r"label shape \(8, 8, 7\) does not match"):
            augment(np.zeros((4, 8, 8, 8), np.float32), np.zeros((8, 8, 7), np.uint8))
