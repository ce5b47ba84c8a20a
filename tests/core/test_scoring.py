"""Tests for service.core.scoring: hand-computed cases, SPEC empty-mask rules, and MONAI as reference.

The hand-computed tests always run; only :class:`TestAgainstMonai` needs torch and MONAI (skipped without).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from service.core.scoring import BRATS_HD95_SUBSTITUTE_MM, dice, hd95, region_metrics, volumes_ml

SPACINGS = [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0), (0.8, 1.3, 2.5)]


def monai_hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    import torch
    from monai import metrics as monai_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = monai_metrics.compute_hausdorff_distance(
            torch.from_numpy(pred[None, None]),
            torch.from_numpy(gt[None, None]),
            include_background=True,
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return float(value.item())


def monai_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    import torch
    from monai import metrics as monai_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = monai_metrics.compute_dice(
            torch.from_numpy(pred[None, None]), torch.from_numpy(gt[None, None]), include_background=True
        )
    return float(value.item())


def blob(shape, seed: int, sigma: float = 2.0, fraction: float = 0.25) -> np.ndarray:
    """A random smooth mask covering about ``fraction`` of the volume (may touch the border)."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma)
    return noise > np.quantile(noise, 1 - fraction)


def single(shape, *points) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for point in points:
        mask[point] = True
    return mask


class TestDice:
    def test_hand_cases(self):
        a = single((4, 4, 4), (0, 0, 0), (1, 0, 0))
        b = single((4, 4, 4), (1, 0, 0), (2, 0, 0))
        assert dice(a, b) == 0.5
        assert dice(a, a) == 1.0
        assert dice(a, single((4, 4, 4), (3, 3, 3))) == 0.0
        c = single((4, 4, 4), (1, 0, 0), (2, 0, 0), (3, 0, 0))
        assert dice(a, c) == pytest.approx(2 * 1 / 5)

    def test_empty_rules(self):
        empty = np.zeros((3, 3, 3), bool)
        assert dice(empty, empty) == 1.0  # BraTS convention
        assert dice(single((3, 3, 3), (1, 1, 1)), empty) == 0.0
        assert dice(empty, single((3, 3, 3), (1, 1, 1))) == 0.0

    def test_nonbool_masks(self):
        assert dice(np.array([0, 2, 4]), np.array([0, 1, 0])) == pytest.approx(2 / 3)  # nonzero = inside

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"same shape, got \(2, 2\) and \(2, 3\)"):
            dice(np.zeros((2, 2)), np.zeros((2, 3)))


class TestHd95Hand:
    def test_single_voxels_one_slice_apart_anisotropic(self):
        shape = (5, 5, 5)
        pred, gt = single(shape, (2, 2, 2)), single(shape, (2, 2, 3))
        assert hd95(pred, gt, (1.0, 1.0, 3.0)) == pytest.approx(3.0)
        assert hd95(pred, gt, (1.0, 1.0, 1.0)) == pytest.approx(1.0)

    def test_single_voxels_along_x_anisotropic(self):
        shape = (6, 5, 5)
        pred, gt = single(shape, (0, 2, 2)), single(shape, (3, 2, 2))
        assert hd95(pred, gt, (1.0, 1.0, 3.0)) == pytest.approx(3.0)
        assert hd95(pred, gt, (2.0, 1.0, 3.0)) == pytest.approx(6.0)

    def test_diagonal_uses_spacing_per_axis(self):
        shape = (5, 5, 5)
        pred, gt = single(shape, (0, 0, 0)), single(shape, (1, 2, 1))
        assert hd95(pred, gt, (3.0, 2.0, 1.0)) == pytest.approx(np.sqrt(9 + 16 + 1))

    def test_percentile_interpolates(self):
        # 20 isolated pred voxels at x = 0, 2, ..., 38 (each its own surface), gt one voxel at x = 0.
        # pred -> gt distances 0, 2, ..., 38: the 95th percentile sits at rank 0.95 * 19 = 18.05, between
        # 36 and 38 -> 36 + 0.05 * 2 = 36.1 (linear interpolation, as torch.quantile). gt -> pred: 0.
        shape = (39, 1, 1)
        pred = single(shape, *[(x, 0, 0) for x in range(0, 39, 2)])
        gt = single(shape, (0, 0, 0))
        assert hd95(pred, gt, (1.0, 1.0, 1.0)) == pytest.approx(36.1)
        assert hd95(gt, pred, (1.0, 1.0, 1.0)) == pytest.approx(36.1)  # symmetric: the max of both directions
        assert hd95(pred, gt, (0.5, 1.0, 1.0)) == pytest.approx(18.05)

    def test_surface_only_counts(self):
        # a solid 5x5x5 cube vs itself shifted by one voxel along z: every surface voxel is at most 1 away
        pred = np.zeros((9, 9, 9), bool)
        pred[2:7, 2:7, 2:7] = True
        gt = np.roll(pred, 1, axis=2)
        assert hd95(pred, gt, (1.0, 1.0, 2.0)) == pytest.approx(2.0)

    def test_array_border_counts_as_background(self):
        # pred fills the whole 3x3x3 array: its surface is the 26 outer voxels (outside the array is
        # background), at 1 (6 faces), sqrt 2 (12 edges) and sqrt 3 (8 corners) from the centre. The 95th
        # percentile of the 26 sorted distances sits at rank 23.75, among the corners: sqrt 3. gt -> pred: 1.
        pred = np.ones((3, 3, 3), bool)
        gt = single((3, 3, 3), (1, 1, 1))
        assert hd95(pred, gt, (1.0, 1.0, 1.0)) == pytest.approx(np.sqrt(3))

    def test_identical(self):
        mask = blob((10, 10, 10), 3)
        assert hd95(mask, mask, (1.0, 2.0, 3.0)) == 0.0

    def test_empty_rules(self):
        empty = np.zeros((4, 4, 4), bool)
        one = single((4, 4, 4), (1, 1, 1))
        assert hd95(empty, empty, (1.0, 1.0, 1.0)) == 0.0
        assert hd95(one, empty, (1.0, 1.0, 1.0)) is None
        assert hd95(empty, one, (1.0, 1.0, 1.0)) is None

    def test_inputs_unchanged_and_silent(self, capsys):
        pred, gt = blob((10, 10, 10), 1), blob((10, 10, 10), 2)
        before = pred.copy(), gt.copy()
        hd95(pred, gt, (1.0, 1.0, 1.0))
        np.testing.assert_array_equal(pred, before[0])
        np.testing.assert_array_equal(gt, before[1])
        assert capsys.readouterr() == ("", "")

    @pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -1.0, 1.0), (1.0, float("nan"), 1.0)])
    def test_bad_spacing(self, spacing):
        with pytest.raises(ValueError, match="expected 3 finite positive voxel sizes"):
            hd95(single((3, 3, 3), (0, 0, 0)), single((3, 3, 3), (1, 1, 1)), spacing)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="same shape"):
            hd95(np.ones((2, 2, 2)), np.ones((2, 2, 3)), (1.0, 1.0, 1.0))


class TestAgainstMonai:
    """MONAI's ``compute_dice`` and ``compute_hausdorff_distance(percentile=95)`` as the reference."""

    @pytest.fixture(autouse=True)
    def _needs_monai(self):
        pytest.importorskip("torch")
        pytest.importorskip("monai.metrics")

    @pytest.mark.parametrize("seed", range(4))
    def test_dice_matches(self, seed):
        pred, gt = blob((16, 14, 12), seed), blob((16, 14, 12), seed + 100)
        assert dice(pred, gt) == pytest.approx(monai_dice(pred, gt), abs=1e-6)

    def test_dice_differs_only_on_empty(self):
        """MONAI gives NaN for two empty masks; SPEC (BraTS) says 1.0."""
        empty = np.zeros((4, 4, 4), bool)
        assert np.isnan(monai_dice(empty, empty))
        assert dice(empty, empty) == 1.0

    def test_hd95_differs_only_on_empty(self):
        """MONAI gives NaN (both empty) or inf (one empty); SPEC says 0.0 and None (never a made-up number)."""
        empty = np.zeros((4, 4, 4), bool)
        one = single((4, 4, 4), (1, 1, 1))
        assert not np.isfinite(monai_hd95(empty, empty, (1.0, 1.0, 1.0)))
        assert not np.isfinite(monai_hd95(one, empty, (1.0, 1.0, 1.0)))
        assert hd95(empty, empty, (1.0, 1.0, 1.0)) == 0.0 and hd95(one, empty, (1.0, 1.0, 1.0)) is None

    @pytest.mark.parametrize("spacing", SPACINGS)
    @pytest.mark.parametrize("seed", range(3))
    def test_hd95_random_blobs(self, seed, spacing):
        pred, gt = blob((20, 18, 14), seed), blob((20, 18, 14), seed + 50)
        assert hd95(pred, gt, spacing) == pytest.approx(monai_hd95(pred, gt, spacing), rel=1e-5, abs=1e-5)

    @pytest.mark.parametrize("spacing", SPACINGS)
    def test_hd95_overlapping_shifted_blobs(self, spacing):
        gt = blob((20, 18, 14), 7, sigma=3.0, fraction=0.15)
        pred = np.roll(gt, (1, -2, 1), axis=(0, 1, 2)) | blob((20, 18, 14), 8, sigma=1.0, fraction=0.02)
        assert hd95(pred, gt, spacing) == pytest.approx(monai_hd95(pred, gt, spacing), rel=1e-5, abs=1e-5)

    @pytest.mark.parametrize("seed", range(2))
    def test_hd95_speckle_touching_border(self, seed):
        rng = np.random.default_rng(seed)
        pred, gt = rng.random((12, 10, 8)) < 0.1, rng.random((12, 10, 8)) < 0.3
        gt[0, :, :] = True  # a whole face on the array border
        spacing = (1.0, 1.0, 3.0)
        assert hd95(pred, gt, spacing) == pytest.approx(monai_hd95(pred, gt, spacing), rel=1e-5, abs=1e-5)

    def test_hd95_small_masks_far_apart(self):
        pred = single((30, 30, 20), (2, 3, 4), (2, 4, 4))
        gt = np.zeros((30, 30, 20), bool)
        gt[20:25, 22:27, 12:16] = True
        spacing = (0.8, 1.3, 2.5)
        assert hd95(pred, gt, spacing) == pytest.approx(monai_hd95(pred, gt, spacing), rel=1e-5)

    def test_hd95_2d(self):
        pred, gt = blob((24, 20), 1), blob((24, 20), 2)
        assert hd95(pred, gt, (0.5, 2.0)) == pytest.approx(monai_hd95(pred, gt, (0.5, 2.0)), rel=1e-5, abs=1e-5)

    def test_brats_sized_volume_with_a_far_false_positive(self):
        x, y, z = np.ogrid[:240, :240, :155]
        gt = (x - 120) ** 2 + (y - 110) ** 2 + ((z - 70) * 1.2) ** 2 < 30**2
        pred = (x - 123) ** 2 + (y - 108) ** 2 + ((z - 72) * 1.1) ** 2 < 28**2
        pred[5:8, 5:8, 5:8] = True  # a far false positive, so the union box is almost the whole volume
        spacing = (1.0, 1.0, 1.0)
        assert hd95(pred, gt, spacing) == pytest.approx(monai_hd95(pred, gt, spacing), rel=1e-5)


class TestRegionMetrics:
    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        gt = np.zeros((6, 6, 6), np.uint8)
        gt[1:5, 1:5, 1:5] = 2  # 64 voxels of tumour
        gt[2:4, 2:4, 2:4] = 1  # core: 8 voxels
        pred = gt.copy()
        pred[1, 1, 1] = 0  # one WT voxel missed
        pred[2, 2, 2] = 4  # one core voxel called enhancing
        return pred, gt

    def test_hand_computed(self):
        pred, gt = self.labels()
        result = region_metrics(pred, gt, (1.0, 1.0, 1.0))
        assert set(result) == {"dice", "hd95_mm"}
        assert list(result["dice"]) == ["WT", "TC", "ET"] and list(result["hd95_mm"]) == ["WT", "TC", "ET"]
        assert result["dice"]["WT"] == pytest.approx(2 * 63 / (63 + 64))
        assert result["dice"]["TC"] == 1.0
        assert result["dice"]["ET"] == 0.0  # predicted ET, none in the ground truth
        assert result["hd95_mm"]["TC"] == 0.0
        assert result["hd95_mm"]["ET"] is None
        assert result["hd95_mm"]["WT"] == pytest.approx(hd95(pred > 0, gt > 0, (1.0, 1.0, 1.0)))

    def test_both_empty_region(self):
        gt = np.zeros((4, 4, 4), np.uint8)
        gt[1:3, 1:3, 1:3] = 2
        result = region_metrics(gt, gt, (1.0, 1.0, 1.0))
        assert result["dice"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
        assert result["hd95_mm"] == {"WT": 0.0, "TC": 0.0, "ET": 0.0}

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="same shape"):
            region_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), (1.0, 1.0, 1.0))


class TestVolumes:
    def test_hand_computed_anisotropic(self):
        labels = np.zeros((4, 4, 4), np.uint8)
        labels[0, 0, :2] = 1  # 2 NCR
        labels[1, 0, :3] = 2  # 3 ED
        labels[2, 0, 0] = 4  # 1 ET
        volumes = volumes_ml(labels, (1.0, 1.0, 2.0))  # 2 mm^3 = 0.002 ml per voxel
        assert volumes == pytest.approx({"WT": 0.012, "TC": 0.006, "ET": 0.002, "NCR": 0.004, "ED": 0.006})
        assert list(volumes) == ["WT", "TC", "ET", "NCR", "ED"]

    def test_empty(self):
        assert volumes_ml(np.zeros((2, 2, 2), np.uint8), (1.0, 1.0, 1.0)) == {
            "WT": 0.0, "TC": 0.0, "ET": 0.0, "NCR": 0.0, "ED": 0.0}

    def test_brats_volume(self):
        labels = np.full((240, 240, 155), 2, np.uint8)
        assert volumes_ml(labels, (1.0, 1.0, 1.0))["ED"] == pytest.approx(240 * 240 * 155 / 1000)

    def test_bad_spacing(self):
        with pytest.raises(ValueError, match="finite positive"):
            volumes_ml(np.zeros((2, 2, 2)), (1.0, 0.0, 1.0))


def test_substitute_constant():
    assert BRATS_HD95_SUBSTITUTE_MM == 373.13
