"""Tests for service.core.lesions: hand-checked tiny cases and an independent brute-force computation.

Most hand cases use 4x4x4 cubes (64 voxels, 56 of them on the surface: 16 on each of the two faces across an
axis and a ring of 12 on each of the two layers between).
"""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
from scipy import ndimage

from service.core.lesions import (
    DILATION_VOXELS,
    LESION_HD95_PENALTY_MM,
    MIN_GT_LESION_VOXELS,
    LesionScores,
    lesion_scores,
    lesionwise_metrics,
)
from service.core.scoring import hd95

ISO = (1.0, 1.0, 1.0)
PENALTY = LESION_HD95_PENALTY_MM


def cube(shape, corner, size=4) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(c, c + size) for c in corner)] = True
    return mask


def voxels(shape, *points) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for point in points:
        mask[point] = True
    return mask


def counts(scores: LesionScores) -> tuple[int, int, int, int]:
    return scores.n_gt_lesions, scores.n_true_positive, scores.n_false_negative, scores.n_false_positive


class TestConstants:
    def test_values_of_the_challenge(self):
        assert (LESION_HD95_PENALTY_MM, MIN_GT_LESION_VOXELS, DILATION_VOXELS) == (374.0, 50, 3)


class TestHandChecked:
    SHAPE = (24, 12, 12)

    def test_one_perfect_lesion(self):
        gt = cube(self.SHAPE, (4, 4, 4))
        assert lesion_scores(gt, gt, ISO) == LesionScores(1.0, 0.0, 1, 1, 0, 0)

    def test_missed_lesion(self):
        gt = cube(self.SHAPE, (4, 4, 4))
        assert lesion_scores(np.zeros(self.SHAPE, bool), gt, ISO) == LesionScores(0.0, PENALTY, 1, 0, 1, 0)

    def test_false_positive_far_away(self):
        gt = cube(self.SHAPE, (4, 4, 4))
        pred = gt | voxels(self.SHAPE, (20, 10, 10))
        assert lesion_scores(pred, gt, ISO) == LesionScores(0.5, PENALTY / 2, 1, 1, 0, 1)

    def test_lesions_two_voxels_apart_are_merged(self):
        # cubes at x 4..7 and 10..13: one lesion of 128 voxels. The prediction finds only the first cube:
        # Dice 2 * 64 / (64 + 128) = 2/3. HD95: from the prediction 0; from the lesion, 56 surface voxels at 0
        # and the second cube's 16, 12, 12, 16 at 3, 4, 5, 6 mm; rank 0.95 * 111 = 105.45 falls among the 6s.
        first, second = cube(self.SHAPE, (4, 4, 4)), cube(self.SHAPE, (10, 4, 4))
        scores = lesion_scores(first, first | second, ISO)
        assert scores.dice == pytest.approx(2 / 3)
        assert scores.hd95_mm == pytest.approx(6.0)
        assert counts(scores) == (1, 1, 0, 0)

    @pytest.mark.parametrize(("gap", "n_lesions"), [(6, 1), (7, 2)])
    def test_dilations_that_touch_merge(self, gap, n_lesions):
        # Each cube's dilation reaches 3 voxels out: a 6-voxel gap leaves the dilations adjacent (merged),
        # a 7-voxel gap leaves one free voxel between them (two lesions).
        shape = (4 + 4 + gap + 4 + 4, 12, 12)
        gt = cube(shape, (4, 4, 4)) | cube(shape, (8 + gap, 4, 4))
        scores = lesion_scores(np.zeros(shape, bool), gt, ISO)
        assert counts(scores) == (n_lesions, 0, n_lesions, 0)

    def test_small_lesions_merged_count_by_their_merged_size(self):
        # Two 3x3x3 cubes (27 voxels each, under the threshold) two voxels apart: one 54-voxel lesion.
        gt = cube(self.SHAPE, (4, 4, 4), size=3) | cube(self.SHAPE, (9, 4, 4), size=3)
        assert lesion_scores(np.zeros(self.SHAPE, bool), gt, ISO) == LesionScores(0.0, PENALTY, 1, 0, 1, 0)

    def test_small_gt_lesion_ignored_even_when_missed(self):
        big, small = cube(self.SHAPE, (4, 4, 4)), cube(self.SHAPE, (16, 4, 4), size=3)
        assert lesion_scores(big, big | small, ISO) == LesionScores(1.0, 0.0, 1, 1, 0, 0)

    def test_prediction_on_small_gt_lesion_is_not_a_false_positive(self):
        # As the reference script: small lesions are dropped after matching, so what they match is not a
        # false positive. The prediction here only touches the small lesion's dilation.
        big, small = cube(self.SHAPE, (4, 4, 4)), cube(self.SHAPE, (16, 4, 4), size=3)
        near_small = voxels(self.SHAPE, (21, 5, 5))
        assert lesion_scores(big | near_small, big | small, ISO) == LesionScores(1.0, 0.0, 1, 1, 0, 0)
        assert lesion_scores(big | small, big | small, ISO) == LesionScores(1.0, 0.0, 1, 1, 0, 0)

    def test_only_small_gt_lesions_and_nothing_else_counts(self):
        small = cube(self.SHAPE, (4, 4, 4), size=3)
        assert lesion_scores(np.zeros(self.SHAPE, bool), small, ISO) == LesionScores(1.0, 0.0, 0, 0, 0, 0)
        assert lesion_scores(small, small, ISO) == LesionScores(1.0, 0.0, 0, 0, 0, 0)
        far = voxels(self.SHAPE, (20, 10, 10))
        assert lesion_scores(far, small, ISO) == LesionScores(0.0, PENALTY, 0, 0, 0, 1)

    @pytest.mark.parametrize(("n_voxels", "counted"), [(MIN_GT_LESION_VOXELS - 1, False), (MIN_GT_LESION_VOXELS, True)])
    def test_threshold_keeps_exactly_fifty_voxels(self, n_voxels, counted):
        gt = np.zeros(self.SHAPE, bool)
        gt[4:9, 4:9, 4:6] = True  # 5 x 5 x 2 = 50 voxels
        gt.flat[np.flatnonzero(gt)[n_voxels:]] = False
        assert np.count_nonzero(gt) == n_voxels
        scores = lesion_scores(np.zeros(self.SHAPE, bool), gt, ISO)
        expected = LesionScores(0.0, PENALTY, 1, 0, 1, 0) if counted else LesionScores(1.0, 0.0, 0, 0, 0, 0)
        assert scores == expected

    def test_prediction_only_in_the_dilated_margin(self):
        # The prediction is the cube shifted 6 voxels along x (2 free voxels between): inside the dilation, so
        # matched, with no overlap. Each surface sees the other's 16, 12, 12, 16 voxels at 3, 4, 5, 6 mm:
        # rank 0.95 * 55 = 52.25 falls among the 6s.
        gt = cube(self.SHAPE, (4, 4, 4))
        scores = lesion_scores(cube(self.SHAPE, (10, 4, 4)), gt, ISO)
        assert scores == LesionScores(0.0, pytest.approx(6.0), 1, 1, 0, 0)

    def test_prediction_beyond_the_dilation_is_a_miss_and_a_false_positive(self):
        gt = cube(self.SHAPE, (4, 4, 4))
        scores = lesion_scores(cube(self.SHAPE, (12, 4, 4)), gt, ISO)
        assert scores == LesionScores(0.0, PENALTY, 1, 0, 1, 1)

    def test_dilation_uses_the_18_connected_element(self):
        # Three 18-connected steps reach (3, 3, 0) from the cube's corner but not (3, 3, 3).
        gt = cube(self.SHAPE, (4, 4, 4))
        reached = lesion_scores(gt | voxels(self.SHAPE, (10, 10, 7)), gt, ISO)
        assert counts(reached) == (1, 1, 0, 0)
        assert reached.dice == pytest.approx(2 * 64 / (64 + 65))
        not_reached = lesion_scores(gt | voxels(self.SHAPE, (10, 10, 10)), gt, ISO)
        assert not_reached == LesionScores(0.5, PENALTY / 2, 1, 1, 0, 1)

    def test_matched_component_counts_whole(self):
        # A 10-voxel tail leaves the cube far beyond the dilation: it is part of the matched component.
        gt = cube(self.SHAPE, (4, 4, 4))
        pred = gt.copy()
        pred[8:18, 5, 5] = True
        scores = lesion_scores(pred, gt, ISO)
        assert counts(scores) == (1, 1, 0, 0)
        assert scores.dice == pytest.approx(2 * 64 / (64 + 74))
        assert scores.hd95_mm == pytest.approx(hd95(pred, gt, ISO))  # the whole case is this one pair
        assert scores.hd95_mm > 1.0  # the tail's tip is 10 mm from the cube

    def test_one_component_matching_two_lesions_scores_in_both(self):
        shape = (26, 12, 12)
        first, second = cube(shape, (4, 4, 4)), cube(shape, (18, 4, 4))
        pred = first | second
        pred[8:18, 5, 5] = True  # a bridge: one 138-voxel component
        scores = lesion_scores(pred, first | second, ISO)
        assert counts(scores) == (2, 2, 0, 0)
        assert scores.dice == pytest.approx(2 * 64 / (64 + 138))

    def test_both_empty(self):
        empty = np.zeros(self.SHAPE, bool)
        assert lesion_scores(empty, empty, ISO) == LesionScores(1.0, 0.0, 0, 0, 0, 0)

    def test_gt_empty_with_false_positives(self):
        pred = cube(self.SHAPE, (2, 2, 2), size=2) | cube(self.SHAPE, (10, 2, 2), size=2)
        assert lesion_scores(pred, np.zeros(self.SHAPE, bool), ISO) == LesionScores(0.0, PENALTY, 0, 0, 0, 2)

    def test_components_are_26_connected(self):
        corner_touching = voxels(self.SHAPE, (2, 2, 2), (3, 3, 3))
        scores = lesion_scores(corner_touching, np.zeros(self.SHAPE, bool), ISO)
        assert scores.n_false_positive == 1

    @pytest.mark.parametrize(("spacing", "expected_hd95"), [((1.0, 1.0, 3.0), 6.0), ((2.0, 1.0, 1.0), 12.0)])
    def test_anisotropic_spacing_changes_hd95_only(self, spacing, expected_hd95):
        # The merged case above: the distances run along x, so only the x spacing scales them. Matching and
        # merging stay in voxels.
        first, second = cube(self.SHAPE, (4, 4, 4)), cube(self.SHAPE, (10, 4, 4))
        scores = lesion_scores(first, first | second, spacing)
        assert scores.dice == pytest.approx(2 / 3)
        assert scores.hd95_mm == pytest.approx(expected_hd95)
        assert counts(scores) == (1, 1, 0, 0)

    def test_non_bool_masks_and_inputs_unchanged(self):
        gt = cube(self.SHAPE, (4, 4, 4)).astype(np.float32) * 4
        pred = gt.astype(np.int16)
        before = gt.copy(), pred.copy()
        assert lesion_scores(pred, gt, ISO) == LesionScores(1.0, 0.0, 1, 1, 0, 0)
        np.testing.assert_array_equal(gt, before[0])
        np.testing.assert_array_equal(pred, before[1])

    def test_lesions_on_the_array_border(self):
        gt = cube(self.SHAPE, (0, 0, 0))
        pred = cube(self.SHAPE, (20, 8, 8))
        assert lesion_scores(pred, gt, ISO) == LesionScores(0.0, PENALTY, 1, 0, 1, 1)
        assert lesion_scores(gt, gt, ISO) == LesionScores(1.0, 0.0, 1, 1, 0, 0)


class TestTwoDimensional:
    def test_eight_connected_and_dilated_by_three(self):
        shape = (30, 12)
        gt = np.zeros(shape, bool)
        gt[2:10, 2:10] = True  # 64 pixels
        diagonal = voxels(shape, (20, 5), (21, 6))  # one 8-connected component, beyond the dilation
        assert lesion_scores(gt | diagonal, gt, (1.0, 1.0)) == LesionScores(0.5, PENALTY / 2, 1, 1, 0, 1)
        near = voxels(shape, (12, 11))  # (3, 2) from the corner (9, 9): inside the 8-connected dilation
        scores = lesion_scores(gt | near, gt, (1.0, 1.0))
        assert counts(scores) == (1, 1, 0, 0)
        assert scores.dice == pytest.approx(2 * 64 / (64 + 65))


class TestLabelVolumes:
    def test_regions_from_labels(self):
        shape = (24, 24, 24)
        gt = np.zeros(shape, np.uint8)
        gt[2:10, 2:10, 2:10] = 2  # edema, 512 voxels
        gt[3:9, 3:9, 3:9] = 1  # core, 216 voxels
        gt[4:8, 4:8, 4:8] = 4  # enhancing, 64 voxels
        pred = gt.copy()
        pred[pred == 4] = 1  # enhancing missed, the core (TC = {1, 4}) unchanged
        pred[20:22, 20:22, 20:22] = 2  # an edema false positive far away
        result = lesionwise_metrics(pred, gt, ISO)
        assert result["dice"] == {"WT": 0.5, "TC": 1.0, "ET": 0.0}
        assert result["hd95_mm"] == {"WT": PENALTY / 2, "TC": 0.0, "ET": PENALTY}
        assert result["lesions"] == {
            "WT": {"gt": 1, "tp": 1, "fn": 0, "fp": 1},
            "TC": {"gt": 1, "tp": 1, "fn": 0, "fp": 0},
            "ET": {"gt": 1, "tp": 0, "fn": 1, "fp": 0},
        }

    def test_agrees_with_region_masks(self):
        rng = np.random.default_rng(5)
        shape = (20, 18, 16)
        gt, pred = random_labels(shape, rng), random_labels(shape, rng)
        result = lesionwise_metrics(pred, gt, (1.0, 1.2, 2.0))
        for name, labels in {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}.items():
            scores = lesion_scores(np.isin(pred, labels), np.isin(gt, labels), (1.0, 1.2, 2.0))
            assert result["dice"][name] == scores.dice
            assert result["hd95_mm"][name] == scores.hd95_mm

    def test_empty_volumes(self):
        empty = np.zeros((6, 6, 6), np.uint8)
        result = lesionwise_metrics(empty, empty, ISO)
        assert result["dice"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
        assert result["hd95_mm"] == {"WT": 0.0, "TC": 0.0, "ET": 0.0}


class TestErrors:
    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"same shape, got \(4, 4, 4\) and \(4, 4, 5\)"):
            lesion_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), ISO)
        with pytest.raises(ValueError, match=r"same shape, got \(4, 4, 4\) and \(4, 4, 5\)"):
            lesionwise_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), ISO)

    @pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1.0, float("inf"), 1.0)])
    def test_bad_spacing(self, spacing):
        mask = cube((8, 8, 8), (2, 2, 2))
        with pytest.raises(ValueError, match="expected 3 finite positive voxel sizes"):
            lesion_scores(mask, mask, spacing)
        with pytest.raises(ValueError, match="expected 3 finite positive voxel sizes"):
            lesionwise_metrics(mask.astype(np.uint8), mask.astype(np.uint8), spacing)

    def test_bad_spacing_refused_even_when_empty(self):
        empty = np.zeros((4, 4, 4), bool)
        with pytest.raises(ValueError, match="expected 3 finite positive voxel sizes"):
            lesion_scores(empty, empty, (1.0, 0.0, 1.0))

    @pytest.mark.parametrize("shape", [(5,), (3, 3, 3, 3)])
    def test_unsupported_dimensions(self, shape):
        with pytest.raises(ValueError, match=f"expected 2D or 3D masks, got {len(shape)} dimensions"):
            lesion_scores(np.zeros(shape), np.zeros(shape), (1.0,) * len(shape))
        with pytest.raises(ValueError, match=f"expected 2D or 3D masks, got {len(shape)} dimensions"):
            lesionwise_metrics(np.zeros(shape), np.zeros(shape), (1.0,) * len(shape))


# ---------------------------------------------------------------------------------------------------------
# An independent computation: the reference script's steps written out literally on whole (small) volumes,
# with a breadth-first component search, dilation by explicit shifts, and HD95 from all pairwise distances.

OFFSETS_26 = [o for o in itertools.product((-1, 0, 1), repeat=3) if any(o)]
OFFSETS_18 = [o for o in OFFSETS_26 if sum(map(abs, o)) <= 2]
OFFSETS_6 = [o for o in OFFSETS_26 if sum(map(abs, o)) == 1]


def bfs_components(mask: np.ndarray) -> list[np.ndarray]:
    """26-connected components, each as its own boolean mask, in raster order of their first voxel."""
    seen = np.zeros(mask.shape, bool)
    found = []
    for start in map(tuple, np.argwhere(mask)):
        if seen[start]:
            continue
        component = np.zeros(mask.shape, bool)
        queue = deque([start])
        seen[start] = True
        while queue:
            voxel = queue.popleft()
            component[voxel] = True
            for offset in OFFSETS_26:
                nxt = tuple(v + o for v, o in zip(voxel, offset))
                if all(0 <= n < s for n, s in zip(nxt, mask.shape)) and mask[nxt] and not seen[nxt]:
                    seen[nxt] = True
                    queue.append(nxt)
        found.append(component)
    return found


def shifted(mask: np.ndarray, offset) -> np.ndarray:
    """``out[p] = mask[p - offset]``, background outside the array."""
    padded = np.pad(mask, 1)
    return padded[tuple(slice(1 - o, 1 - o + s) for o, s in zip(offset, mask.shape))]


def dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    for _ in range(iterations):
        grown = mask.copy()
        for offset in OFFSETS_18:
            grown |= shifted(mask, offset)
        mask = grown
    return mask


def brute_hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    def surface(mask):
        eroded = mask.copy()
        for offset in OFFSETS_6:
            eroded &= shifted(mask, offset)
        return np.argwhere(mask & ~eroded) * np.asarray(spacing)

    p, g = surface(pred), surface(gt)
    distances = np.sqrt(((p[:, None, :] - g[None, :, :]) ** 2).sum(axis=-1))
    return max(float(np.percentile(distances.min(axis=1), 95)), float(np.percentile(distances.min(axis=0), 95)))


def reference_scores(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[float, float, tuple[int, ...], dict]:
    """The script's ``get_LesionWiseScores`` and its aggregation, threshold as the specification words it."""
    pred_components = bfs_components(pred)
    gt_components = bfs_components(gt)
    # get_GTseg_combinedByDilation: the ground truth inside each component of the dilated ground truth
    merged = [gt & zone for zone in bfs_components(dilate(gt, 3))]
    matched_anywhere: set[int] = set()
    rows = []  # (volume, n matched, dice, hd95)
    for lesion in merged:
        roi = dilate(lesion, 3)
        hits = [i for i, component in enumerate(pred_components) if (component & roi).any()]
        matched_anywhere.update(hits)
        union = np.zeros(pred.shape, bool)
        for i in hits:
            union |= pred_components[i]
        if hits:
            d = 2.0 * (union & lesion).sum() / (union.sum() + lesion.sum())
            h = brute_hd95(union, lesion, spacing)
        else:
            d, h = 0.0, PENALTY
        rows.append((int(lesion.sum()), len(hits), d, h))
    n_fp = len(pred_components) - len(matched_anywhere)
    kept = [row for row in rows if row[0] >= 50]
    total = len(kept) + n_fp
    if total == 0:
        dice_score, hd_score = 1.0, 0.0
    else:
        dice_score = sum(row[2] for row in kept) / total
        hd_score = (sum(row[3] for row in kept) + n_fp * PENALTY) / total
    tp = sum(1 for row in kept if row[1] > 0)
    stats = {"raw_gt": len(gt_components), "merged": len(merged), "small": len(rows) - len(kept)}
    return dice_score, hd_score, (len(kept), tp, len(kept) - tp, n_fp), stats


def ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def random_case(seed: int, shape=(32, 28, 20)) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth: 1-4 ellipsoids of 10 to 200 voxels, often close enough to merge. Prediction: most of
    them shifted and rescaled, plus 0-2 blobs of its own."""
    rng = np.random.default_rng(seed)
    gt, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    for _ in range(rng.integers(1, 5)):
        centre, radii = rng.uniform(2, np.array(shape) - 3), rng.uniform(1.3, 3.6, size=3)
        gt |= ellipsoid(shape, centre, radii)
        if rng.random() < 0.75:
            pred |= ellipsoid(shape, centre + rng.integers(-1, 2, size=3), radii * rng.uniform(0.7, 1.3, size=3))
    for _ in range(rng.integers(0, 3)):
        pred |= ellipsoid(shape, rng.uniform(1, np.array(shape) - 2), rng.uniform(0.6, 2.5, size=3))
    return pred, gt


def random_labels(shape, rng) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    labels = np.zeros(shape, np.uint8)
    labels[field > np.quantile(field, 0.8)] = 2
    labels[field > np.quantile(field, 0.9)] = 1
    labels[field > np.quantile(field, 0.95)] = 4
    return labels


SEEDS = range(36)
SPACING_BY_SEED = [(1.0, 1.0, 1.0), (1.0, 1.0, 2.5), (0.7, 1.3, 1.9)]


class TestAgainstIndependentComputation:
    @pytest.mark.parametrize("seed", SEEDS)
    def test_random_blobs(self, seed):
        pred, gt = random_case(seed)
        spacing = SPACING_BY_SEED[seed % 3]
        expected_dice, expected_hd95, expected_counts, _ = reference_scores(pred, gt, spacing)
        scores = lesion_scores(pred, gt, spacing)
        assert scores.dice == pytest.approx(expected_dice, abs=1e-9)
        assert scores.hd95_mm == pytest.approx(expected_hd95, abs=1e-9)
        assert counts(scores) == expected_counts

    def test_random_cases_cover_every_rule(self):
        """The random cases above exercise merging, small lesions, matches, misses and false positives."""
        seen = {"merged": 0, "small": 0, "tp": 0, "fn": 0, "fp": 0, "several": 0}
        for seed in SEEDS:
            pred, gt = random_case(seed)
            _, _, (n_gt, tp, fn, fp), stats = reference_scores(pred, gt, ISO)
            seen["merged"] += stats["merged"] < stats["raw_gt"]
            seen["small"] += stats["small"] > 0
            seen["tp"] += tp > 0
            seen["fn"] += fn > 0
            seen["fp"] += fp > 0
            seen["several"] += n_gt > 1
        assert all(n >= 3 for n in seen.values()), seen

    @pytest.mark.parametrize("seed", range(4))
    def test_label_volumes(self, seed):
        rng = np.random.default_rng(100 + seed)
        shape = (16, 14, 12)
        gt, pred = random_labels(shape, rng), random_labels(shape, rng)
        result = lesionwise_metrics(pred, gt, (1.0, 1.0, 1.5))
        for name, labels in {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}.items():
            expected_dice, expected_hd95, (n_gt, tp, fn, fp), _ = reference_scores(
                np.isin(pred, labels), np.isin(gt, labels), (1.0, 1.0, 1.5)
            )
            assert result["dice"][name] == pytest.approx(expected_dice, abs=1e-9)
            assert result["hd95_mm"][name] == pytest.approx(expected_hd95, abs=1e-9)
            assert result["lesions"][name] == {"gt": n_gt, "tp": tp, "fn": fn, "fp": fp}
