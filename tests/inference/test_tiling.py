"""Sliding-window parts, each pinned with a hand-checkable case or an exact oracle, then the whole against MONAI."""

from __future__ import annotations

import dataclasses
from itertools import product

import numpy as np
import pytest

from service.inference.tiling import (
    Aggregator,
    Tile,
    compute_steps,
    gaussian_weight,
    iter_tiles,
    sliding_window,
)

PATCH = (16, 16, 16)


def plus_one(batch: np.ndarray) -> np.ndarray:
    """Oracle: a tile's prediction does not depend on where the tile lies, so any blend must give x + 1."""
    return batch + 1


def identity_to_k(k: int):
    """Oracle with K != C output channels: channel j is input channel j % C plus 10 * j."""

    def predict(batch: np.ndarray) -> np.ndarray:
        c = batch.shape[1]
        return np.stack([batch[:, j % c] + 10 * j for j in range(k)], axis=1)

    return predict


def int_image(shape, seed=0) -> np.ndarray:
    """Small whole numbers as float32, so that sums of a few copies and their mean are exact."""
    return np.random.default_rng(seed).integers(-8, 9, size=shape).astype(np.float32)


class TestComputeSteps:
    def test_hand_checked_half_overlap(self):
        # x: 4 tiles, step 21/3 = 7; y: 6 tiles, step 34/5 = 6.8 rounded; z: 3 tiles, step 6.5 rounded half to even
        assert compute_steps((37, 50, 29), PATCH, 0.5) == [[0, 7, 14, 21], [0, 7, 14, 20, 27, 34], [0, 6, 13]]

    def test_hand_checked_no_overlap(self):
        assert compute_steps((48, 50), (16, 16), 0.0) == [[0, 16, 32], [0, 11, 23, 34]]

    def test_patch_equal_to_image_is_one_tile(self):
        assert compute_steps((16, 7, 1), (16, 7, 1), 0.5) == [[0], [0], [0]]

    def test_patch_of_one_voxel_gives_each_index_once(self):
        assert compute_steps((5,), (1,), 0.5) == [[0, 1, 2, 3, 4]]

    @pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
    @pytest.mark.parametrize("size", [16, 17, 23, 31, 32, 33, 50, 64, 155])
    def test_steps_cover_and_last_ends_at_border(self, size, overlap):
        (steps,) = compute_steps((size,), (16,), overlap)
        assert steps[0] == 0
        assert steps[-1] + 16 == size
        assert steps == sorted(set(steps))
        covered = np.zeros(size, dtype=bool)
        for s in steps:
            covered[s : s + 16] = True
        assert covered.all()
        # evenly spread: consecutive steps differ by at most one voxel and never exceed the target step
        gaps = np.diff(steps)
        if len(gaps):
            assert gaps.max() - gaps.min() <= 1
            assert gaps.max() <= max(16 * (1 - overlap), 1)

    def test_image_smaller_than_patch_is_refused(self):
        with pytest.raises(ValueError, match="smaller than patch"):
            compute_steps((15, 20), (16, 16))

    @pytest.mark.parametrize("overlap", [-0.1, 1.0])
    def test_overlap_outside_range_is_refused(self, overlap):
        with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
            compute_steps((20,), (16,), overlap)

    def test_dimension_mismatch_is_refused(self):
        with pytest.raises(ValueError, match="differ in dimensions"):
            compute_steps((20, 20), (16,))


class TestGaussianWeight:
    def test_hand_checked_three_voxels(self):
        # sigma = 3/8; the outer voxels lie 1 voxel from the centre: exp(-1 / (2 * 0.375**2))
        np.testing.assert_allclose(gaussian_weight((3,)), [np.exp(-1 / 0.28125), 1.0, np.exp(-1 / 0.28125)], rtol=1e-6)

    def test_properties(self):
        w = gaussian_weight((16, 12, 9))
        assert w.dtype == np.float32 and w.shape == (16, 12, 9)
        assert w.max() == 1.0 and w.min() > 0
        for axes in [(0,), (1,), (2,), (0, 1, 2)]:
            np.testing.assert_array_equal(w, np.flip(w, axes))  # mirror-symmetric, as TTA by flips needs

    def test_cached_and_read_only(self):
        w = gaussian_weight(PATCH)
        assert gaussian_weight([16, 16, 16]) is w
        with pytest.raises(ValueError, match="read-only"):
            w[0, 0, 0] = 5

    def test_zeros_replaced_by_smallest_nonzero(self):
        w = gaussian_weight((200,), sigma_scale=0.01)  # exp underflows float32 far from the centre
        analytic = np.exp(-((np.arange(200) - 99.5) ** 2) / (2 * 2.0**2))
        assert (analytic.astype(np.float32) == 0).any()
        assert w.min() > 0
        assert w.min() == analytic[analytic.astype(np.float32) > 0].min().astype(np.float32)

    def test_matches_monai_importance_map_up_to_its_clamp(self):
        from monai.data.utils import compute_importance_map

        monai = compute_importance_map(PATCH, mode="gaussian", sigma_scale=0.125).numpy()
        unclamped = monai > 1e-3  # MONAI clamps its map at 1e-3; nnU-Net (and we) only replace zeros
        np.testing.assert_allclose(gaussian_weight(PATCH)[unclamped], (monai / monai.max())[unclamped], rtol=1e-5)

    def test_bad_arguments_are_refused(self):
        with pytest.raises(ValueError, match="patch size must be positive"):
            gaussian_weight((0, 4))
        with pytest.raises(ValueError, match="sigma_scale must be positive"):
            gaussian_weight((4,), sigma_scale=0)


class TestTiles:
    def test_tiles_are_frozen_and_of_patch_size(self):
        tiles = iter_tiles((37, 50, 29), PATCH, 0.5)
        assert len(tiles) == 4 * 6 * 3
        assert all(tuple(s.stop - s.start for s in t.slices) == PATCH for t in tiles)
        assert tiles[-1].start == (21, 34, 13)
        with pytest.raises(dataclasses.FrozenInstanceError):
            tiles[0].slices = ()

    def test_tiles_cover_every_voxel(self):
        count = np.zeros((37, 50, 29), dtype=int)
        for tile in iter_tiles(count.shape, PATCH, 0.0):
            count[tile.slices] += 1
        assert count.min() >= 1


class TestAggregator:
    def test_hand_checked_plain_average(self):
        agg = Aggregator(num_channels=1, spatial_shape=(4,), patch_size=(3,), gaussian=False)
        agg.add(Tile((slice(0, 3),)), np.full((1, 3), 1.0, dtype=np.float32))
        agg.add(Tile((slice(1, 4),)), np.full((1, 3), 3.0, dtype=np.float32))
        np.testing.assert_array_equal(agg.get(), [[1.0, 2.0, 2.0, 3.0]])

    def test_hand_checked_gaussian_average(self):
        agg = Aggregator(num_channels=1, spatial_shape=(4,), patch_size=(3,), gaussian=True)
        agg.add(Tile((slice(0, 3),)), np.full((1, 3), 1.0, dtype=np.float32))
        agg.add(Tile((slice(1, 4),)), np.full((1, 3), 3.0, dtype=np.float32))
        e = np.exp(-1 / 0.28125)  # edge weight, centre weight 1
        expected = [1.0, (1 * 1 + 3 * e) / (1 + e), (1 * e + 3 * 1) / (e + 1), 3.0]
        out = agg.get()
        assert out.dtype == np.float32
        np.testing.assert_allclose(out[0], expected, rtol=1e-6)

    def test_uncovered_voxels_are_reported(self):
        agg = Aggregator(num_channels=2, spatial_shape=(5,), patch_size=(3,), gaussian=False)
        agg.add(Tile((slice(0, 3),)), np.zeros((2, 3), dtype=np.float32))
        with pytest.raises(ValueError, match="2 voxels are not covered"):
            agg.get()

    def test_wrong_prediction_or_tile_is_refused(self):
        agg = Aggregator(num_channels=2, spatial_shape=(5,), patch_size=(3,), gaussian=False)
        with pytest.raises(ValueError, match=r"expected a prediction of shape \(2, 3\)"):
            agg.add(Tile((slice(0, 3),)), np.zeros((1, 3), dtype=np.float32))
        with pytest.raises(ValueError, match="is not a"):
            agg.add(Tile((slice(3, 6),)), np.zeros((2, 3), dtype=np.float32))

    def test_get_returns_a_new_array(self):
        agg = Aggregator(num_channels=1, spatial_shape=(3,), patch_size=(3,), gaussian=False)
        agg.add(Tile((slice(0, 3),)), np.ones((1, 3), dtype=np.float32))
        first = agg.get()
        first[:] = 7
        np.testing.assert_array_equal(agg.get(), [[1.0, 1.0, 1.0]])


class TestSlidingWindow:
    @pytest.mark.parametrize("gaussian", [False, True])
    @pytest.mark.parametrize("overlap", [0.0, 0.5])
    @pytest.mark.parametrize("shape", [(37, 50, 29), (16, 16, 16), (5, 40, 3)])
    def test_plus_one_oracle_reassembles_exactly(self, shape, overlap, gaussian):
        image = int_image((2, *shape))
        before = image.copy()
        out = sliding_window(image, plus_one, patch_size=PATCH, overlap=overlap, gaussian=gaussian)
        assert out.shape == image.shape and out.dtype == np.float32
        if gaussian:  # a weighted mean of equal values, up to float32 rounding of the weights
            np.testing.assert_allclose(out, image + 1, rtol=1e-6, atol=1e-6)
        else:  # means of a few equal whole numbers are exact
            np.testing.assert_array_equal(out, image + 1)
        np.testing.assert_array_equal(image, before)  # the caller's array is untouched

    @pytest.mark.parametrize("shape", [(37, 50, 29), (5, 40, 3)])
    def test_identity_oracle_maps_to_k_channels(self, shape):
        image = int_image((2, *shape), seed=1)
        out = sliding_window(image, identity_to_k(3), patch_size=PATCH, overlap=0.5, gaussian=False)
        expected = np.stack([image[0], image[1] + 10, image[0] + 20])
        np.testing.assert_array_equal(out, expected)

    def test_small_image_is_padded_with_zeros_and_cropped_back(self):
        seen = []

        def record(batch):
            seen.append(batch.copy())
            return batch[:, :1]

        image = np.ones((1, 5, 40, 3), dtype=np.float32)
        out = sliding_window(image, record, patch_size=PATCH, overlap=0.5, gaussian=False)
        np.testing.assert_array_equal(out, image)
        tiles = np.concatenate(seen)
        assert tiles.shape[2:] == PATCH
        assert tiles.sum() == len(tiles) * 5 * 16 * 3  # each tile: 5 x 16 x 3 ones, the rest zero padding

    @pytest.mark.parametrize("gaussian", [False, True])
    @pytest.mark.parametrize("batch_size", [3, 5])
    def test_batch_size_does_not_change_the_result(self, gaussian, batch_size):
        image = np.random.default_rng(2).normal(size=(2, 37, 50, 29)).astype(np.float32)
        calls = []

        def predictor(batch):
            calls.append(len(batch))
            return np.tanh(batch * 2) + batch.mean(axis=(2, 3, 4), keepdims=True)  # depends on the tile

        one = sliding_window(image, predictor, patch_size=PATCH, overlap=0.5, batch_size=1, gaussian=gaussian)
        n_tiles = len(calls)
        calls.clear()
        many = sliding_window(
            image, predictor, patch_size=PATCH, overlap=0.5, batch_size=batch_size, gaussian=gaussian
        )
        np.testing.assert_array_equal(one, many)
        b = batch_size
        assert calls == [b] * (n_tiles // b) + ([n_tiles % b] if n_tiles % b else [])

    def test_two_spatial_axes(self):
        image = int_image((3, 21, 9))
        out = sliding_window(image, plus_one, patch_size=(8, 8), overlap=0.5, gaussian=False)
        np.testing.assert_array_equal(out, image + 1)

    def test_predictor_with_wrong_output_shape_is_refused(self):
        with pytest.raises(ValueError, match="predictor must map a batch"):
            sliding_window(np.zeros((1, 20, 20, 20), np.float32), lambda b: b[:, :, :8], patch_size=PATCH)

    def test_bad_arguments_are_refused(self):
        image = np.zeros((1, 20, 20, 20), np.float32)
        with pytest.raises(ValueError, match="3 spatial axes"):
            sliding_window(image[0], plus_one, patch_size=PATCH)
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            sliding_window(image, plus_one, patch_size=PATCH, batch_size=0)
        with pytest.raises(ValueError, match="overlap"):
            sliding_window(image, plus_one, patch_size=PATCH, overlap=1.0)


class TestAgainstMonai:
    """``monai.inferers.sliding_window_inference`` as the PyTorch reference.

    MONAI steps by ``int(patch * (1 - overlap))`` and shifts only the last tile back to the border, whereas
    nnU-Net (and we) spread the tiles evenly. Both give the same number of tiles, and the same tiles
    wherever ``image - patch`` is a multiple of that step. With a 3x3x3 convolution ("same" zero padding,
    so tile borders matter) the two must agree on such sizes. On other sizes the tiles differ, so there we
    compare with a pointwise predictor for which tile placement cannot matter.

    Blending: MONAI's ``mode="gaussian"`` map is ours clamped at 1e-3 (see TestGaussianWeight), and in 3D
    with sigma = patch / 8 that clamp flattens much of each tile's corners, so its blend differs from
    nnU-Net's (which we follow) by about 1e-2 of the logits even inside the volume. The blending itself is
    therefore compared by handing MONAI our map as ``roi_weight_map``, and with the constant blend.
    """

    torch = pytest.importorskip("torch")

    @pytest.fixture
    def conv(self):
        """A fixed random 3x3x3 convolution, 2 -> 3 channels."""
        g = self.torch.Generator().manual_seed(0)
        weight = self.torch.randn(3, 2, 3, 3, 3, generator=g) * 0.3
        bias = self.torch.randn(3, generator=g)
        return weight, bias

    def monai(self, image, predictor, **kwargs):
        from monai.inferers import sliding_window_inference

        torch = self.torch
        with torch.no_grad():
            out = sliding_window_inference(
                torch.from_numpy(image[None]), PATCH, kwargs.pop("sw_batch_size", 2), predictor, **kwargs
            )
        return out[0].numpy()

    def torch_conv(self, conv, kernel=3):
        weight, bias = conv
        weight = weight if kernel == 3 else weight[..., 1:2, 1:2, 1:2].contiguous()
        return lambda x: self.torch.nn.functional.conv3d(x, weight, bias, padding=kernel // 2)

    def numpy_conv(self, conv, kernel=3):
        torch_fn = self.torch_conv(conv, kernel)

        def predict(batch: np.ndarray) -> np.ndarray:
            with self.torch.no_grad():
                return torch_fn(self.torch.from_numpy(batch)).numpy()

        return predict

    @pytest.mark.parametrize("shape", [(48, 40, 32), (16, 24, 16)])
    def test_same_tiles_as_monai_where_image_minus_patch_is_a_multiple_of_the_step(self, shape):
        from monai.data.utils import dense_patch_slices

        monai_tiles = dense_patch_slices(shape, PATCH, (8, 8, 8))
        assert [t.slices for t in iter_tiles(shape, PATCH, 0.5)] == [tuple(s) for s in monai_tiles]

    def test_tiles_differ_from_monai_on_other_sizes(self):
        from monai.data.utils import dense_patch_slices

        monai_starts = sorted({s[0].start for s in dense_patch_slices((37, 16, 16), PATCH, (8, 8, 8))})
        assert monai_starts == [0, 8, 16, 21]
        assert compute_steps((37, 16, 16), PATCH, 0.5)[0] == [0, 7, 14, 21]

    def test_conv_with_our_weight_map_matches_monai(self, conv):
        image = np.random.default_rng(3).normal(size=(2, 48, 40, 32)).astype(np.float32)
        ours = sliding_window(image, self.numpy_conv(conv), patch_size=PATCH, overlap=0.5, batch_size=2)
        weight_map = self.torch.from_numpy(np.array(gaussian_weight(PATCH)))
        ref = self.monai(image, self.torch_conv(conv), overlap=0.5, roi_weight_map=weight_map)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

    def test_conv_with_constant_blend_matches_monai(self, conv):
        image = np.random.default_rng(4).normal(size=(2, 48, 40, 32)).astype(np.float32)
        ours = sliding_window(image, self.numpy_conv(conv), patch_size=PATCH, overlap=0.5, batch_size=3, gaussian=False)
        ref = self.monai(image, self.torch_conv(conv), overlap=0.5, mode="constant")
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

    def test_small_image_padding_matches_monai(self, conv):
        # both pad (patch - size) // 2 zeros before and the rest after
        image = np.random.default_rng(5).normal(size=(2, 5, 40, 3)).astype(np.float32)
        ours = sliding_window(image, self.numpy_conv(conv), patch_size=PATCH, overlap=0.5)
        weight_map = self.torch.from_numpy(np.array(gaussian_weight(PATCH)))
        ref = self.monai(image, self.torch_conv(conv), overlap=0.5, roi_weight_map=weight_map)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("mode", ["constant", "gaussian"])
    def test_pointwise_conv_on_odd_size_matches_monai(self, conv, mode):
        image = np.random.default_rng(6).normal(size=(2, 37, 51, 29)).astype(np.float32)  # every axis odd
        ours = sliding_window(
            image, self.numpy_conv(conv, kernel=1), patch_size=PATCH, overlap=0.5, gaussian=mode == "gaussian"
        )
        ref = self.monai(image, self.torch_conv(conv, kernel=1), overlap=0.5, mode=mode, sigma_scale=0.125)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
