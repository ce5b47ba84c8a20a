"""Tests for service.core.labels: label maps both ways, label checks, regions both ways."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.labels import (
    BRATS2023_TO_BRATS,
    BRATS_TO_BRATS2023,
    LABELS,
    MODALITIES,
    REGION_NAMES,
    REGIONS,
    TUMOUR_LABELS,
    VALID_LABELS,
    LabelError,
    brats2023_to_brats,
    brats_to_brats2023,
    brats_to_msd,
    check_labels,
    labels_to_regions,
    msd_to_brats,
    regions_to_labels,
    to_label_convention,
)


class TestConstants:
    def test_spec_values(self):
        assert MODALITIES == ("flair", "t1", "t1ce", "t2")
        assert VALID_LABELS == (0, 1, 2, 4)
        assert TUMOUR_LABELS == (1, 2, 4) == tuple(v for v in LABELS if v != 0)
        assert LABELS == {0: "background", 1: "NCR/NET", 2: "ED", 4: "ET"}
        assert REGIONS == {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
        assert REGION_NAMES == ("WT", "TC", "ET")


class TestMsdMapping:
    def test_msd_to_brats_each_value(self):
        # MSD: 1 edema, 2 non-enhancing, 3 enhancing -> BraTS: 2 ED, 1 NCR/NET, 4 ET
        out = msd_to_brats(np.array([0, 1, 2, 3]))
        np.testing.assert_array_equal(out, [0, 2, 1, 4])
        assert out.dtype == np.uint8

    def test_brats_to_msd_each_value(self):
        out = brats_to_msd(np.array([0, 1, 2, 4], dtype=np.uint8))
        np.testing.assert_array_equal(out, [0, 2, 1, 3])
        assert out.dtype == np.uint8

    def test_round_trip_both_ways(self):
        rng = np.random.default_rng(0)
        msd = rng.integers(0, 4, size=(5, 6, 7)).astype(np.uint8)
        np.testing.assert_array_equal(brats_to_msd(msd_to_brats(msd)), msd)
        brats = np.array(VALID_LABELS, dtype=np.uint8)[rng.integers(0, 4, size=(5, 6, 7))]
        np.testing.assert_array_equal(msd_to_brats(brats_to_msd(brats)), brats)

    def test_input_not_modified_and_new_array(self):
        msd = np.array([[0, 1], [2, 3]], dtype=np.uint8)
        before = msd.copy()
        out = msd_to_brats(msd)
        np.testing.assert_array_equal(msd, before)
        assert not np.shares_memory(out, msd)

    def test_whole_float_values_accepted(self):
        np.testing.assert_array_equal(msd_to_brats(np.array([0.0, 1.0, 2.0, 3.0])), [0, 2, 1, 4])

    def test_msd_rejects_label_4(self):
        with pytest.raises(LabelError, match=r"\{4\}.*expected only \{0, 1, 2, 3\}"):
            msd_to_brats(np.array([0, 1, 4]))

    def test_brats_to_msd_rejects_label_3(self):
        with pytest.raises(LabelError, match="no label 3"):
            brats_to_msd(np.array([0, 3]))


class TestBrats2023Mapping:
    def test_tables(self):
        # BraTS 2023 glioma: 1 NCR, 2 edema, 3 enhancing tumour -> BraTS 2020: 1, 2, 4
        assert BRATS2023_TO_BRATS == {0: 0, 1: 1, 2: 2, 3: 4}
        assert BRATS_TO_BRATS2023 == {0: 0, 1: 1, 2: 2, 4: 3}

    def test_both_ways_each_value(self):
        out = brats2023_to_brats(np.array([0, 1, 2, 3]))
        np.testing.assert_array_equal(out, [0, 1, 2, 4])
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(brats_to_brats2023(np.array([0, 1, 2, 4], np.uint8)), [0, 1, 2, 3])

    def test_label_4_is_not_a_2023_value(self):
        with pytest.raises(LabelError, match=r"\{4\}.*expected only \{0, 1, 2, 3\}") as err:
            brats2023_to_brats(np.array([0, 3, 4]))
        assert err.value.values == (4,)


class TestToLabelConvention:
    def test_brats2023_writes_et_as_3(self):
        labels = np.array([[0, 1], [2, 4]], dtype=np.uint8)
        out = to_label_convention(labels, "brats2023")
        np.testing.assert_array_equal(out, [[0, 1], [2, 3]])
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(labels, [[0, 1], [2, 4]])  # input untouched

    def test_brats2020_is_a_checked_copy(self):
        labels = np.array([0, 1, 2, 4], dtype=np.uint8)
        out = to_label_convention(labels, "brats2020")
        np.testing.assert_array_equal(out, labels)
        assert out.dtype == np.uint8 and not np.shares_memory(out, labels)
        with pytest.raises(LabelError, match=r"\{3\}"):
            to_label_convention(np.array([3]), "brats2020")

    def test_round_trip(self):
        rng = np.random.default_rng(2)
        labels = np.array(VALID_LABELS, dtype=np.uint8)[rng.integers(0, 4, size=(4, 5, 6))]
        np.testing.assert_array_equal(brats2023_to_brats(to_label_convention(labels, "brats2023")), labels)

    def test_unknown_convention(self):
        with pytest.raises(ValueError, match="unknown label convention 'msd'; expected one of brats2020, brats2023"):
            to_label_convention(np.zeros(2, np.uint8), "msd")


class TestCheckLabels:
    def test_valid_passes(self):
        check_labels(np.array([[0, 1], [2, 4]], dtype=np.uint8))
        check_labels(np.zeros((2, 2, 2), dtype=np.int16))

    def test_label_3_named_with_hint(self):
        with pytest.raises(LabelError, match=r"\{3\}.*BraTS 2020 has no label 3"):
            check_labels(np.array([0, 1, 3, 4]))

    def test_lists_all_bad_values(self):
        with pytest.raises(LabelError, match=r"\{5, 7\} are not allowed; expected only \{0, 1, 2, 4\}") as err:
            check_labels(np.array([0, 7, 5, 5]))
        assert "label 3" not in str(err.value)

    def test_negative_and_fractional(self):
        with pytest.raises(LabelError, match=r"\{-1\}"):
            check_labels(np.array([-1, 0], dtype=np.int8))
        with pytest.raises(LabelError, match=r"\{1\.5\}"):
            check_labels(np.array([0.0, 1.5]))

    def test_nan_rejected(self):
        with pytest.raises(LabelError, match="nan"):
            check_labels(np.array([0.0, np.nan]))

    def test_custom_valid_set(self):
        check_labels(np.array([0, 3]), valid=(0, 1, 2, 3))
        with pytest.raises(LabelError, match=r"\{4\}"):
            check_labels(np.array([4]), valid=(0, 1, 2, 3))

    def test_is_value_error(self):
        assert issubclass(LabelError, ValueError)


class TestRegions:
    def test_labels_to_regions_hand_case(self):
        regions = labels_to_regions(np.array([0, 1, 2, 4], dtype=np.uint8))
        assert regions.shape == (3, 4) and regions.dtype == bool
        np.testing.assert_array_equal(regions[0], [False, True, True, True])  # WT = 1, 2, 4
        np.testing.assert_array_equal(regions[1], [False, True, False, True])  # TC = 1, 4
        np.testing.assert_array_equal(regions[2], [False, False, False, True])  # ET = 4

    def test_round_trip_labels_regions_labels(self):
        rng = np.random.default_rng(1)
        labels = np.array(VALID_LABELS, dtype=np.uint8)[rng.integers(0, 4, size=(4, 5, 6))]
        out = regions_to_labels(labels_to_regions(labels))
        np.testing.assert_array_equal(out, labels)
        assert out.dtype == np.uint8

    def test_probabilities_hand_case(self):
        # columns: background, edema, core, enhancing, ET without WT, TC without WT, ET without TC
        probs = np.array(
            [
                [0.1, 0.9, 0.9, 0.9, 0.2, 0.4, 0.8],  # WT
                [0.1, 0.2, 0.7, 0.7, 0.2, 0.9, 0.3],  # TC
                [0.1, 0.1, 0.3, 0.6, 0.9, 0.1, 0.9],  # ET
            ]
        )
        np.testing.assert_array_equal(regions_to_labels(probs), [0, 2, 1, 4, 0, 0, 2])

    def test_threshold_is_strict(self):
        probs = np.full((3, 2), 0.5)
        probs[:, 1] = 0.5001
        np.testing.assert_array_equal(regions_to_labels(probs), [0, 4])
        np.testing.assert_array_equal(regions_to_labels(probs, threshold=0.4), [4, 4])

    def test_wrong_channel_count(self):
        with pytest.raises(ValueError, match=r"expected region channels of shape \(3, \*spatial\), got \(2, 4\)"):
            regions_to_labels(np.zeros((2, 4)))
        with pytest.raises(ValueError, match="expected region channels"):
            regions_to_labels(np.zeros(3))
