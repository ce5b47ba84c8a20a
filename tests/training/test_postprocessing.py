"""Learning postprocessing on validation cases (training.postprocessing) and ``learn-postprocessing`` end to end.

The learning cases are boxes on a (32, 32, 32) grid of 2 mm voxels (0.008 ml each), so every volume can be
counted by hand: e.g. a 2x2x2 blob is 0.064 ml, a 6x6x5 box 1.44 ml.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.core.labels import REGIONS
from service.core.scoring import dice
from service.core.postprocess import PostprocessingRules, RegionRule, apply_postprocessing
from service.inference.card import card_path, file_sha256, read_card
from service.inference.backends import BackendOptions
from service.inference.model import OnnxModel
from tests.tiny_models import build_model, pointwise_weights
from training.cli import main
from training.postprocessing import crop_to_tumour, learn_postprocessing, validation_cases

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (32, 32, 32)
SPACING = (2.0, 2.0, 2.0)


def box(labels: np.ndarray, value: int, *ranges: tuple[int, int]) -> None:
    labels[tuple(slice(a, b) for a, b in ranges)] = value


def tumour(*, et: bool = True) -> np.ndarray:
    """Edema [6, 26)^3 (8000 voxels), NCR core [10, 22)^3, and ET [12, 20)^3 (512 voxels, 4.1 ml) if asked."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    box(labels, 2, (6, 26), (6, 26), (6, 26))
    box(labels, 1, (10, 22), (10, 22), (10, 22))
    if et:
        box(labels, 4, (12, 20), (12, 20), (12, 20))
    return labels


def with_far_blob(labels: np.ndarray) -> np.ndarray:
    """A 4x4x3 edema blob (48 voxels, 0.384 ml) in the corner, far from the tumour."""
    labels = labels.copy()
    box(labels, 2, (0, 4), (0, 4), (0, 3))
    return labels


def with_second_lesion(labels: np.ndarray) -> np.ndarray:
    """A 4x4x4 edema lesion (64 voxels, 0.512 ml) in the far corner."""
    labels = labels.copy()
    box(labels, 2, (27, 31), (27, 31), (27, 31))
    return labels


def mean_dice(predictions, truths, region: str) -> float:
    labels = REGIONS[region]
    return float(np.mean([dice(np.isin(p, labels), np.isin(t, labels)) for p, t in zip(predictions, truths)]))


def learn(predictions, truths):
    return learn_postprocessing(predictions, truths, [SPACING] * len(predictions))


class TestComponentRules:
    def test_false_positive_blobs_are_removed_and_wt_dice_rises(self):
        truths = [tumour(), tumour(), with_second_lesion(tumour())]
        predictions = [with_far_blob(tumour()), with_far_blob(tumour()), with_second_lesion(tumour())]
        learned = learn(predictions, truths)
        # the one size that removes the 0.384 ml blobs and keeps the true 0.512 ml lesion; keeping only the
        # largest component would remove that lesion, so it loses
        assert learned.rules.WT == RegionRule("remove_small", 0.5)
        assert learned.rules.TC == RegionRule() and learned.rules.ET == RegionRule()
        assert learned.rules.et_to_ncr_below_ml == 0.0
        assert learned.dice_before["WT"] == pytest.approx(mean_dice(predictions, truths, "WT"))
        assert learned.dice_before["WT"] < 1.0 and learned.dice_after["WT"] == pytest.approx(1.0)
        assert learned.tried["WT"]["largest_component"] < learned.tried["WT"]["remove_small<0.5ml"] == 1.0
        assert learned.cases == 3

    def test_largest_component_when_the_blobs_are_big(self):
        truths = [tumour() for _ in range(3)]
        predictions = []
        for truth in truths:
            prediction = truth.copy()
            box(prediction, 2, (0, 8), (0, 8), (27, 32))  # 320 voxels, 2.56 ml: above every candidate size
            predictions.append(prediction)
        learned = learn(predictions, truths)
        assert learned.rules.WT == RegionRule("largest_component")
        assert learned.dice_before["WT"] < 0.99 and learned.dice_after["WT"] == pytest.approx(1.0)

    def test_a_true_second_lesion_keeps_the_rules_off(self):
        truths = [with_second_lesion(tumour()), with_second_lesion(tumour()), tumour()]
        learned = learn([t.copy() for t in truths], truths)
        assert learned.rules == PostprocessingRules()
        assert learned.dice_after == learned.dice_before == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
        assert learned.tried["WT"]["largest_component"] < 1.0  # it was tried and would have hurt

    def test_a_gain_below_the_margin_is_not_taken(self):
        # one single-voxel false positive in 8000 voxels: WT Dice 0.99994, a gain of 6e-5 < 1e-3
        truths = [tumour()]
        prediction = tumour()
        prediction[0, 0, 0] = 2
        assert learn([prediction], truths).rules.WT == RegionRule()
        assert learn_postprocessing([prediction], truths, [SPACING], margin=0.0).rules.WT.changes_masks

    def test_a_wt_rule_that_would_cost_tc_is_refused(self):
        # the small lesions are mostly core: removing them from WT raises WT Dice (false edema blob in case 2)
        # but removes true TC in case 1
        truth1 = tumour()
        box(truth1, 1, (0, 3), (0, 3), (0, 3))  # 27 voxels of true core, 0.216 ml, its own lesion
        prediction1 = truth1.copy()
        truth2 = tumour()
        prediction2 = truth2.copy()
        box(prediction2, 2, (0, 4), (0, 4), (0, 6))  # 96 voxels of false edema, 0.768 ml
        learned = learn([prediction1, prediction2], [truth1, truth2])
        assert learned.tried["WT"]["remove_small<1ml"] > learned.dice_before["WT"]  # better for WT alone...
        assert learned.rules.WT == RegionRule()  # ...but it costs TC
        assert learned.dice_after["TC"] == pytest.approx(1.0)


class TestEtToNcr:
    def lgg(self) -> tuple[np.ndarray, np.ndarray]:
        """A truth without ET and a prediction with a 6x6x5 ET box (1.44 ml)."""
        truth = tumour(et=False)
        prediction = truth.copy()
        box(prediction, 4, (13, 19), (13, 19), (13, 18))
        return prediction, truth

    def hgg(self) -> tuple[np.ndarray, np.ndarray]:
        """ET of three separate 1.6 ml components (4.8 ml in all), predicted exactly: removing components
        below any size that would remove the LGG case's false ET (1.44 ml) removes all of it, and keeping
        only the largest removes two thirds."""
        truth = tumour(et=False)
        for x, y in (((10, 15), (10, 15)), ((17, 22), (10, 15)), ((10, 15), (17, 22))):
            box(truth, 4, x, y, (10, 18))  # 5 x 5 x 8 = 200 voxels of 8 mm^3
        return truth.copy(), truth

    def test_little_et_in_cases_without_any_becomes_ncr(self):
        pairs = [self.lgg(), self.lgg(), self.hgg(), self.hgg()]
        predictions, truths = zip(*pairs)
        learned = learn(predictions, truths)
        assert learned.rules.ET == RegionRule()  # no component rule can fix it
        assert learned.rules.et_to_ncr_below_ml == 1.5  # the smallest threshold above 1.44 ml
        assert learned.dice_before["ET"] == pytest.approx(0.5)
        assert learned.dice_after["ET"] == pytest.approx(1.0)
        assert learned.tried["ET->NCR"]["below<1ml"] == pytest.approx(0.5)

    def test_real_small_et_keeps_the_threshold_off(self):
        # two cases whose true ET is small (1.44 ml, predicted exactly) against one case with false ET
        small_truth = tumour(et=False)
        box(small_truth, 4, (13, 19), (13, 19), (13, 18))
        pairs = [(small_truth.copy(), small_truth), (small_truth.copy(), small_truth), self.lgg()]
        predictions, truths = zip(*pairs)
        learned = learn(predictions, truths)
        assert learned.rules.et_to_ncr_below_ml == 0.0
        assert learned.dice_after["ET"] == learned.dice_before["ET"] == pytest.approx(2 / 3)

    def test_the_learned_rules_give_what_was_measured(self):
        pairs = [self.lgg(), self.hgg(), (with_far_blob(tumour()), tumour())]
        predictions, truths = zip(*pairs)
        learned = learn(predictions, truths)
        assert learned.rules.changes_masks
        after = [apply_postprocessing(p, SPACING, learned.rules) for p in predictions]
        for region in ("WT", "TC", "ET"):
            assert learned.dice_after[region] == pytest.approx(mean_dice(after, truths, region))


class TestInput:
    def test_lengths_must_agree(self):
        with pytest.raises(ValueError, match="expected one truth and one spacing per prediction, got 2 predictions"):
            learn_postprocessing([tumour(), tumour()], [tumour()], [SPACING])

    def test_no_cases(self):
        with pytest.raises(ValueError, match="no validation cases"):
            learn_postprocessing([], [], [])

    def test_shapes_must_agree(self):
        with pytest.raises(ValueError, match=r"case 0: prediction shape \(32, 32, 32\) differs"):
            learn_postprocessing([tumour()], [tumour()[:-1]], [SPACING])

    def test_bad_spacing(self):
        with pytest.raises(ValueError, match="expected three finite voxel sizes > 0"):
            learn_postprocessing([tumour()], [tumour()], [(2.0, 2.0, 0.0)])

    def test_crop_to_tumour_keeps_both_tumours(self):
        prediction, truth = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
        prediction[3, 4, 5], truth[10, 2, 7] = 2, 4
        p, t = crop_to_tumour(prediction, truth)
        assert p.shape == t.shape == (8, 3, 3) and p.sum() == 2 and t.sum() == 4
        empty = crop_to_tumour(np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8))
        assert [a.shape for a in empty] == [(1, 1, 1), (1, 1, 1)]


# ----------------------------------------------------------------------------------- the CLI command
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A pointwise Conv (tests.tiny_models) with a 3D patch of 16: WT where FLAIR is bright, and so on."""
    folder = tmp_path_factory.mktemp("models")
    return build_model(folder, "tiny", *pointwise_weights(gain=4.0, bias=-2.0), patch_size=(16, 16, 16))


def _case_ids(data: Path) -> list[str]:
    return [case.case_id for case in validation_cases(data)]


class TestCommand:
    def test_learns_on_the_split_and_writes_the_card(self, tiny_model, tiny_dataset, tmp_path, capsys):
        model = tmp_path / "tiny.onnx"
        model.write_bytes(tiny_model.read_bytes())
        card_path(model).write_text(card_path(tiny_model).read_text())
        sha = file_sha256(model)
        ids = _case_ids(tiny_dataset)
        split = tmp_path / "split.json"
        split.write_text(json.dumps({"train": ids[:3], "validation": ids[3:]}))

        assert main(["learn-postprocessing", "--model", str(model), "--data", str(tiny_dataset),
                     "--split", str(split), "--threads", "1"]) == 0
        out = capsys.readouterr().out
        assert f"learned on {len(ids) - 3} cases: WT " in out and "mean Dice before: WT" in out

        card = read_card(card_path(model))
        spec = card.postprocessing
        assert spec is not None and spec.learned_on["cases"] == len(ids) - 3
        assert spec.learned_on["data"] == tiny_dataset.name and spec.learned_on["split"] == "split.json"
        assert set(spec.learned_on["dice_before"]) == set(spec.learned_on["dice_after"]) == {"WT", "TC", "ET"}
        for region in ("WT", "TC", "ET"):
            assert spec.learned_on["dice_after"][region] >= spec.learned_on["dice_before"][region]
        assert card.sha256 == sha == file_sha256(model)  # the ONNX file is untouched
        assert card.model_copy(update={"postprocessing": None}) == read_card(card_path(tiny_model))
        assert OnnxModel(model, BackendOptions(threads=1)).card.postprocessing == spec  # it loads

        # evaluate records whether it applied the rules
        for flags, expected in (([], True), (["--no-postprocess"], False)):
            out_dir = tmp_path / f"eval{len(flags)}"
            assert main(["evaluate", "--model", str(model), "--data", str(tiny_dataset), "--out", str(out_dir),
                         "--max-cases", "1", "--threads", "1", *flags]) == 0
            assert json.loads((out_dir / "summary.json").read_text())["postprocess"] is expected

    def test_without_a_split_every_labelled_case(self, tiny_model, tiny_dataset, tmp_path):
        model = tmp_path / "tiny.onnx"
        model.write_bytes(tiny_model.read_bytes())
        card_path(model).write_text(card_path(tiny_model).read_text())
        assert main(["learn-postprocessing", "--model", str(model), "--data", str(tiny_dataset),
                     "--threads", "1"]) == 0
        assert read_card(card_path(model)).postprocessing.learned_on["cases"] == len(_case_ids(tiny_dataset))

    def test_a_split_naming_unknown_cases_is_one_line(self, tiny_model, tiny_dataset, tmp_path):
        split = tmp_path / "split.json"
        split.write_text(json.dumps({"train": [], "validation": [_case_ids(tiny_dataset)[0], "BraTS20_Training_999"]}))
        before = card_path(tiny_model).read_text()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        result = subprocess.run(
            [sys.executable, "-m", "training", "learn-postprocessing", "--model", str(tiny_model), "--data",
             str(tiny_dataset), "--split", str(split)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
        assert "1 of 2 validation cases are not labelled cases in" in lines[-1]
        assert "BraTS20_Training_999" in lines[-1]
        assert card_path(tiny_model).read_text() == before
