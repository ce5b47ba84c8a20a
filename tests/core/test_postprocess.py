"""service.core.postprocess on tiny label volumes whose result can be checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.labels import LabelError
from service.core.postprocess import (
    PostprocessingRules,
    RegionRule,
    apply_postprocessing,
    apply_region_rule,
    largest_component,
    remove_small_components,
    voxel_volume_ml,
)

ISO = (1.0, 1.0, 1.0)
LARGEST = RegionRule("largest_component")


def rules(**kwargs) -> PostprocessingRules:
    return PostprocessingRules(**kwargs)


def two_lesions() -> np.ndarray:
    """(8, 8, 8): a 3x3x3 lesion (edema with a 1x1x2 core whose lower voxel is ET) at the corner, and a
    2x2x1 edema blob (4 voxels) far from it."""
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    labels[0:3, 0:3, 0:3] = 2
    labels[1, 1, 1:3] = 1
    labels[1, 1, 1] = 4
    labels[6:8, 6:8, 5] = 2
    return labels


class TestComponents:
    def test_corner_neighbours_are_one_component(self):
        mask = np.zeros((3, 3, 3), dtype=bool)
        mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = mask[0, 2, 0] = True  # each touches (1, 1, 1) by a corner
        np.testing.assert_array_equal(largest_component(mask), mask)

    def test_largest_keeps_the_bigger_one(self):
        mask = np.zeros((5, 5, 5), dtype=bool)
        mask[0:2, 0:2, 0:2] = True
        mask[4, 4, 4] = True
        kept = largest_component(mask)
        assert kept.sum() == 8 and not kept[4, 4, 4]

    def test_equal_sizes_keep_the_first_in_scan_order(self):
        mask = np.zeros((5, 1, 1), dtype=bool)
        mask[0] = mask[4] = True
        np.testing.assert_array_equal(largest_component(mask)[:, 0, 0], [1, 0, 0, 0, 0])

    def test_remove_small_counts_voxels(self):
        mask = np.zeros((6, 6, 6), dtype=bool)
        mask[0:2, 0:2, 0] = True  # 4 voxels
        mask[4, 4, 4] = True  # 1 voxel
        assert remove_small_components(mask, 4).sum() == 4
        assert remove_small_components(mask, 4.5).sum() == 0
        assert remove_small_components(mask, 1).sum() == 5

    def test_empty_masks(self):
        empty = np.zeros((3, 4, 5), dtype=bool)
        assert not largest_component(empty).any() and not remove_small_components(empty, 2).any()


class TestRegionRules:
    def test_largest_wt_component_removes_the_far_blob_to_background(self):
        labels = two_lesions()
        out = apply_postprocessing(labels, ISO, rules(WT=LARGEST))
        expected = labels.copy()
        expected[6:8, 6:8, 5] = 0
        np.testing.assert_array_equal(out, expected)

    def test_min_size_is_in_ml_so_the_spacing_decides(self):
        labels = two_lesions()
        rule = rules(WT=RegionRule("remove_small", 0.01))  # 10 voxels of 1 mm^3
        # isotropic 1 mm: the 4-voxel blob is 0.004 ml and goes; the 27-voxel lesion (0.027 ml) stays
        iso = apply_postprocessing(labels, ISO, rule)
        assert iso[6:8, 6:8, 5].sum() == 0 and np.array_equal(iso[0:3, 0:3, 0:3], labels[0:3, 0:3, 0:3])
        # 1 x 2 x 2 mm: a voxel is 0.004 ml, the blob 0.016 ml, so it stays
        np.testing.assert_array_equal(apply_postprocessing(labels, (1.0, 2.0, 2.0), rule), labels)
        # 0.5 x 0.5 x 1 mm: the lesion is 27 * 0.00025 = 0.00675 ml < 0.01 and goes too
        assert not apply_postprocessing(labels, (0.5, 0.5, 1.0), rule).any()

    def test_removed_from_tc_becomes_edema_with_its_et(self):
        labels = np.full((7, 7, 7), 2, dtype=np.uint8)
        labels[1:4, 1:4, 1:4] = 1  # the big core (27 voxels)
        labels[2, 2, 2] = 4
        labels[6, 0, 6] = 4  # a one-voxel core that is all ET, inside the edema, 3 voxels from the big core
        out = apply_postprocessing(labels, ISO, rules(TC=LARGEST))
        expected = labels.copy()
        expected[6, 0, 6] = 2
        np.testing.assert_array_equal(out, expected)

    def test_removed_from_et_becomes_ncr(self):
        labels = np.zeros((6, 6, 6), dtype=np.uint8)
        labels[0:6, 0:6, 0:3] = 1
        labels[0:2, 0:2, 0:2] = 4  # 8 voxels of ET
        labels[5, 5, 2] = 4  # 1 voxel of ET, touching the border
        out = apply_postprocessing(labels, ISO, rules(ET=RegionRule("remove_small", 0.002)))
        expected = labels.copy()
        expected[5, 5, 2] = 1
        np.testing.assert_array_equal(out, expected)

    def test_rules_apply_in_order_wt_tc_et(self):
        labels = two_lesions()
        labels[7, 7, 0] = 4  # a lone ET voxel: its own WT, TC and ET component
        everything = RegionRule("remove_small", 0.002)  # removes only single voxels at 1 mm
        out = apply_postprocessing(labels, ISO, rules(WT=everything, TC=everything, ET=everything))
        assert out[7, 7, 0] == 0  # WT went first: background, not edema or NCR
        assert out[1, 1, 1] == 1  # the lesion's single ET voxel became NCR (ET rule)
        assert out[1, 1, 2] == 1 and out[6, 6, 5] == 2  # a 2-voxel core and a 4-voxel blob stay

    def test_one_region_rule(self):
        labels = two_lesions()
        np.testing.assert_array_equal(
            apply_region_rule(labels, ISO, "WT", LARGEST), apply_postprocessing(labels, ISO, rules(WT=LARGEST))
        )
        with pytest.raises(ValueError, match=r"expected a region among \['WT', 'TC', 'ET'\], got 'NCR'"):
            apply_region_rule(labels, ISO, "NCR", LARGEST)


class TestEtToNcr:
    def small_et(self) -> np.ndarray:
        labels = np.zeros((5, 5, 5), dtype=np.uint8)
        labels[1:4, 1:4, 1:4] = 1
        labels[2, 2, 1:4] = 4  # 3 voxels of ET: 0.003 ml at 1 mm
        return labels

    def test_all_et_becomes_ncr_below_the_threshold(self):
        out = apply_postprocessing(self.small_et(), ISO, rules(et_to_ncr_below_ml=0.005))
        expected = self.small_et()
        expected[expected == 4] = 1
        np.testing.assert_array_equal(out, expected)

    def test_et_at_or_above_the_threshold_stays(self):
        labels = self.small_et()
        np.testing.assert_array_equal(apply_postprocessing(labels, ISO, rules(et_to_ncr_below_ml=0.003)), labels)
        np.testing.assert_array_equal(apply_postprocessing(labels, (2.0, 1.0, 1.0), rules(et_to_ncr_below_ml=0.005)),
                                      labels)  # 3 voxels of 0.002 ml = 0.006 ml

    def test_zero_is_off(self):
        labels = self.small_et()
        np.testing.assert_array_equal(apply_postprocessing(labels, ISO, rules(et_to_ncr_below_ml=0.0)), labels)

    def test_threshold_applies_after_the_region_rules(self):
        labels = self.small_et()
        labels[0, 0, 0] = 4
        labels[0, 0, 1] = 1  # a 2-voxel core at the corner with 1 voxel of ET: 4 voxels of ET in all
        out = apply_postprocessing(labels, ISO, rules(ET=LARGEST, et_to_ncr_below_ml=0.0035))
        assert not (out == 4).any()  # the largest ET kept 3 voxels (0.003 ml), then below 0.0035 ml: NCR
        assert apply_postprocessing(labels, ISO, rules(et_to_ncr_below_ml=0.0035))[2, 2, 2] == 4  # 4 voxels alone


class TestShapesAndInput:
    def test_empty_volume(self):
        empty = np.zeros((4, 5, 6), dtype=np.uint8)
        out = apply_postprocessing(empty, ISO, rules(WT=LARGEST, TC=LARGEST, ET=LARGEST, et_to_ncr_below_ml=1.0))
        assert out.shape == (4, 5, 6) and not out.any()

    def test_mask_filling_the_volume_to_its_borders(self):
        labels = np.full((3, 4, 5), 2, dtype=np.uint8)
        labels[0, 0, 0] = 0
        out = apply_postprocessing(labels, ISO, rules(WT=LARGEST, TC=LARGEST))
        np.testing.assert_array_equal(out, labels)

    def test_a_2d_model_output_with_one_slice(self):
        labels = np.zeros((6, 6, 1), dtype=np.uint8)
        labels[0:3, 0:3, 0] = 2
        labels[5, 5, 0] = 2
        out = apply_postprocessing(labels, (1.0, 1.0, 5.0), rules(WT=LARGEST))
        assert out.shape == (6, 6, 1) and out[5, 5, 0] == 0 and out[0:3, 0:3, 0].all()

    def test_input_is_not_modified_and_a_new_uint8_array_comes_back(self):
        labels = two_lesions().astype(np.int16)
        before = labels.copy()
        out = apply_postprocessing(labels, ISO, rules(WT=LARGEST, et_to_ncr_below_ml=1.0))
        np.testing.assert_array_equal(labels, before)
        assert out.dtype == np.uint8 and not np.shares_memory(out, labels)
        same = apply_postprocessing(labels, ISO, PostprocessingRules())
        np.testing.assert_array_equal(same, before)
        assert not np.shares_memory(same, labels)

    def test_nesting_holds_after_every_rule(self):
        rng = np.random.default_rng(0)
        labels = rng.choice(np.array([0, 0, 0, 1, 2, 4], dtype=np.uint8), size=(9, 8, 7))
        every = rules(WT=RegionRule("remove_small", 0.003), TC=LARGEST, ET=RegionRule("remove_small", 0.002),
                      et_to_ncr_below_ml=0.004)
        out = apply_postprocessing(labels, ISO, every)
        wt, tc, et = out > 0, np.isin(out, (1, 4)), out == 4
        assert not (et & ~tc).any() and not (tc & ~wt).any()
        assert not (wt & (labels == 0)).any()  # no region grows
        assert not (tc & ~np.isin(labels, (1, 4))).any() and not (et & (labels != 4)).any()
        assert (out != labels).any()  # the rules did something to this noise


class TestValidation:
    @pytest.mark.parametrize(
        "spacing, message",
        [
            ((1.0, 1.0), r"expected three finite voxel sizes > 0 in mm, got \(1.0, 1.0\)"),
            ((1.0, 0.0, 1.0), r"expected three finite voxel sizes > 0 in mm, got \(1.0, 0.0, 1.0\)"),
            ((1.0, float("nan"), 1.0), "expected three finite voxel sizes > 0"),
            ((1.0, -2.0, 1.0), "expected three finite voxel sizes > 0"),
            (("a", 1, 1), "expected three voxel sizes in mm, got"),
            (None, "expected three voxel sizes in mm, got None"),
        ],
    )
    def test_bad_spacing(self, spacing, message):
        with pytest.raises(ValueError, match=message):
            apply_postprocessing(two_lesions(), spacing, rules(WT=LARGEST))

    def test_bad_labels(self):
        labels = two_lesions()
        labels[0, 0, 0] = 3
        with pytest.raises(LabelError, match=r"label values \{3\} are not allowed; expected only \{0, 1, 2, 4\}"):
            apply_postprocessing(labels, ISO, PostprocessingRules())

    @pytest.mark.parametrize("shape", [(4, 4), (2, 3, 4, 5)])
    def test_not_3d(self, shape):
        with pytest.raises(ValueError, match=r"expected a 3D label volume \(X, Y, Z\), got shape"):
            apply_postprocessing(np.zeros(shape, dtype=np.uint8), ISO, PostprocessingRules())

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"action": "remove_small"}, "rule remove_small needs min_size_ml, a finite volume > 0 in ml, got None"),
            ({"action": "remove_small", "min_size_ml": 0.0}, "needs min_size_ml, a finite volume > 0 in ml, got 0.0"),
            ({"action": "remove_small", "min_size_ml": float("inf")}, "needs min_size_ml"),
            ({"action": "largest_component", "min_size_ml": 1.0}, "min_size_ml belongs to the rule remove_small only"),
            ({"action": "biggest"}, r"action must be one of \['none', 'largest_component', 'remove_small'\]"),
        ],
    )
    def test_bad_region_rule(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            RegionRule(**kwargs)

    @pytest.mark.parametrize("value", [-0.1, float("nan"), True])
    def test_bad_threshold(self, value):
        with pytest.raises(ValueError, match="et_to_ncr_below_ml must be a finite volume >= 0 in ml"):
            PostprocessingRules(et_to_ncr_below_ml=value)

    def test_voxel_volume(self):
        assert voxel_volume_ml((1.0, 2.0, 2.5)) == pytest.approx(0.005)

    def test_changes_masks(self):
        assert not PostprocessingRules().changes_masks
        assert PostprocessingRules(TC=LARGEST).changes_masks
        assert PostprocessingRules(et_to_ncr_below_ml=0.5).changes_masks
