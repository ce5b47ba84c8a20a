"""Tests for service.core.preprocess on small hand-checkable arrays."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.preprocess import Preprocessed, brain_bbox, mask_bbox, pad_to, preprocess, uncrop, zscore_nonzero


def two_channel_image() -> np.ndarray:
    """(2, 5, 6, 7): channel 0 nonzero at (1, 2, 3) and (2, 2, 3); channel 1 nonzero at (3, 4, 5)."""
    image = np.zeros((2, 5, 6, 7), dtype=np.float32)
    image[0, 1, 2, 3] = 1.0
    image[0, 2, 2, 3] = 3.0
    image[1, 3, 4, 5] = -2.0  # negative intensities count as foreground too
    return image


class TestBrainBbox:
    def test_union_over_channels(self):
        assert brain_bbox(two_channel_image()) == (slice(1, 4), slice(2, 5), slice(3, 6))

    def test_single_voxel(self):
        image = np.zeros((1, 4, 4, 4))
        image[0, 3, 0, 2] = 5
        assert brain_bbox(image) == (slice(3, 4), slice(0, 1), slice(2, 3))

    def test_empty_gives_whole_volume(self):
        assert brain_bbox(np.zeros((4, 3, 5, 2))) == (slice(0, 3), slice(0, 5), slice(0, 2))

    def test_2d(self):
        image = np.zeros((1, 5, 5))
        image[0, 1:3, 4] = 1
        assert brain_bbox(image) == (slice(1, 3), slice(4, 5))

    def test_needs_channel_axis(self):
        with pytest.raises(ValueError, match=r"expected a channel-first image \(C, \*spatial\), got shape \(5,\)"):
            brain_bbox(np.zeros(5))


class TestMaskBbox:
    def test_margin_is_clipped_to_the_array(self):
        mask = np.zeros((6, 5, 4), bool)
        mask[0, 2, 2:4] = True
        assert mask_bbox(mask) == (slice(0, 1), slice(2, 3), slice(2, 4))
        assert mask_bbox(mask, margin=1) == (slice(0, 2), slice(1, 4), slice(1, 4))
        assert mask_bbox(mask, margin=10) == (slice(0, 6), slice(0, 5), slice(0, 4))

    def test_empty_gives_whole_array(self):
        assert mask_bbox(np.zeros((3, 2), bool), margin=1) == (slice(0, 3), slice(0, 2))

    def test_negative_margin_is_refused(self):
        with pytest.raises(ValueError, match="margin must be at least 0, got -1"):
            mask_bbox(np.ones((2, 2), bool), margin=-1)


class TestZscore:
    def test_hand_computed(self):
        # foreground: the 4 voxels where either channel is nonzero
        image = np.zeros((2, 3, 1, 2), dtype=np.float32)
        image[0, :, 0, 0] = [1, 2, 3]
        image[0, 0, 0, 1] = 4
        image[1, 0, 0, 1] = 8  # channel 1 is 0 at the other three foreground voxels
        out = zscore_nonzero(image)
        std0 = np.sqrt(1.25)  # values 1, 2, 3, 4: mean 2.5, population variance 1.25
        np.testing.assert_allclose(out[0, :, 0, 0], [-1.5 / std0, -0.5 / std0, 0.5 / std0], rtol=1e-6)
        np.testing.assert_allclose(out[0, 0, 0, 1], 1.5 / std0, rtol=1e-6)
        # channel 1 values over the foreground: 0, 0, 0, 8 -> mean 2, std sqrt(12)
        np.testing.assert_allclose(out[1, :, 0, 0], [-2 / np.sqrt(12)] * 3, rtol=1e-6)
        np.testing.assert_allclose(out[1, 0, 0, 1], 6 / np.sqrt(12), rtol=1e-6)
        # background stays exactly 0
        assert (out[:, 1:, 0, 1] == 0).all()
        assert out.dtype == np.float32

    def test_constant_channel_gives_zeros_not_nan(self):
        image = np.zeros((2, 4, 4, 4), dtype=np.float32)
        image[:, 1:3, 1:3, 1:3] = 7.0
        out = zscore_nonzero(image)
        assert np.isfinite(out).all() and (out == 0).all()

    def test_foreground_statistics_are_standard(self):
        rng = np.random.default_rng(0)
        image = np.zeros((3, 8, 8, 8), dtype=np.float32)
        image[:, 2:6, 1:7, 3:8] = rng.normal(50, 10, size=(3, 4, 6, 5))
        out = zscore_nonzero(image)
        fg = out[:, 2:6, 1:7, 3:8]
        np.testing.assert_allclose(fg.mean(axis=(1, 2, 3)), 0, atol=1e-5)
        np.testing.assert_allclose(fg.std(axis=(1, 2, 3)), 1, atol=1e-5)

    def test_all_zero(self):
        out = zscore_nonzero(np.zeros((2, 3, 3, 3), dtype=np.int16))
        assert out.dtype == np.float32 and (out == 0).all()

    def test_input_not_modified(self):
        image = two_channel_image()
        before = image.copy()
        out = zscore_nonzero(image)
        np.testing.assert_array_equal(image, before)
        assert not np.shares_memory(out, image)

    def test_integer_input(self):
        image = np.zeros((1, 2, 1, 1), dtype=np.int16)
        image[0, :, 0, 0] = [2, 4]
        np.testing.assert_allclose(zscore_nonzero(image)[0, :, 0, 0], [-1, 1])


class TestPreprocess:
    def test_crop_then_zscore(self):
        image = two_channel_image()
        before = image.copy()
        result = preprocess(image)
        assert isinstance(result, Preprocessed)
        assert result.bbox == (slice(1, 4), slice(2, 5), slice(3, 6))
        assert result.full_shape == (5, 6, 7)
        assert result.data.shape == (2, 3, 3, 3) and result.data.dtype == np.float32
        np.testing.assert_array_equal(result.data, zscore_nonzero(image[:, 1:4, 2:5, 3:6]))
        np.testing.assert_array_equal(image, before)

    def test_uncrop_restores_grid(self):
        image = two_channel_image()
        result = preprocess(image)
        full = uncrop(result.data, result.bbox, result.full_shape)
        assert full.shape == image.shape and full.dtype == np.float32
        np.testing.assert_array_equal(full[:, 1:4, 2:5, 3:6], result.data)
        outside = np.ones(image.shape, bool)
        outside[:, 1:4, 2:5, 3:6] = False
        assert (full[outside] == 0).all()
        # foreground voxels land where they came from (z-scored values are nonzero there)
        assert full[0, 1, 2, 3] != 0 and full[1, 3, 4, 5] != 0

    def test_uncrop_labels_without_channel_axis(self):
        result = preprocess(two_channel_image())
        labels = np.full((3, 3, 3), 2, dtype=np.uint8)
        full = uncrop(labels, result.bbox, result.full_shape)
        assert full.shape == (5, 6, 7) and full.dtype == np.uint8
        assert full.sum() == 2 * 27 and (full[1:4, 2:5, 3:6] == 2).all()

    def test_uncrop_several_leading_axes_and_fill(self):
        array = np.ones((2, 3, 1, 2))
        full = uncrop(array, (slice(1, 2), slice(0, 2)), (4, 2), fill=-1)
        assert full.shape == (2, 3, 4, 2)
        assert (full[..., 1, :] == 1).all() and (full[..., [0, 2, 3], :] == -1).all()


class TestUncropErrors:
    def test_extent_mismatch(self):
        with pytest.raises(ValueError, match=r"spatial shape \(2, 2\) does not match the bbox extents \(3, 2\)"):
            uncrop(np.zeros((2, 2)), (slice(0, 3), slice(1, 3)), (5, 5))

    def test_bbox_outside(self):
        with pytest.raises(ValueError, match="does not lie inside full shape"):
            uncrop(np.zeros((2, 2)), (slice(4, 6), slice(0, 2)), (5, 5))

    def test_bbox_length(self):
        with pytest.raises(ValueError, match="one slice per axis"):
            uncrop(np.zeros((2, 2)), (slice(0, 2),), (5, 5))


class TestPadTo:
    def test_symmetric_padding_and_exact_crop_back(self):
        array = np.arange(1 * 3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5) + 1
        padded, crop = pad_to(array, (6, 4, 8))
        assert padded.shape == (1, 6, 4, 8)
        assert crop == (slice(None), slice(1, 4), slice(0, 4), slice(1, 6))  # odd padding: smaller half first
        np.testing.assert_array_equal(padded[crop], array)
        assert padded.sum() == array.sum()  # the padding is zeros
        assert (padded[:, 0] == 0).all() and (padded[:, 4:] == 0).all() and (padded[..., 6:] == 0).all()

    def test_crop_applies_to_other_channel_counts(self):
        padded, crop = pad_to(np.ones((4, 2, 3, 3)), (5, 5, 5))
        output = np.zeros((3,) + padded.shape[1:])
        output[crop] = 1
        assert output[crop].shape == (3, 2, 3, 3)
        assert output.sum() == 3 * 2 * 3 * 3
        assert output[(..., *crop[1:])].shape == (3, 2, 3, 3)

    def test_large_enough_is_unchanged_copy(self):
        array = np.random.default_rng(0).normal(size=(2, 5, 5, 5))
        padded, crop = pad_to(array, (3, 5, 4))
        np.testing.assert_array_equal(padded, array)
        assert crop == (slice(None), slice(0, 5), slice(0, 5), slice(0, 5))
        assert not np.shares_memory(padded, array)

    def test_input_not_modified(self):
        array = np.ones((1, 2, 2, 2), dtype=np.float32)
        pad_to(array, (4, 4, 4))
        assert array.shape == (1, 2, 2, 2) and (array == 1).all()

    def test_2d(self):
        padded, crop = pad_to(np.ones((1, 1, 3)), (4, 3))
        assert padded.shape == (1, 4, 3) and crop == (slice(None), slice(1, 2), slice(0, 3))

    def test_wrong_length(self):
        with pytest.raises(ValueError, match=r"expected 3 minimum sizes for spatial shape \(2, 2, 2\), got \(4, 4\)"):
            pad_to(np.ones((1, 2, 2, 2)), (4, 4))
