"""Evaluation's per-case scores and report: lesion-wise, per kind, false positives on tumour-free brains."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.manifest import read_case_kinds
from training.evaluate import score_case, summarize


def _tumour(shape=(20, 20, 20)) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[4:12, 4:12, 4:12] = 2
    label[6:10, 6:10, 6:10] = 4
    return label


class TestReport:
    def test_tumour_free_false_positives_and_kinds(self):
        spacing = (2.0, 2.0, 2.0)
        free_truth = np.zeros((20, 20, 20), dtype=np.uint8)
        fp = free_truth.copy()
        fp[0:2, 0:2, 0:2] = 2  # 8 voxels of 8 mm3: 0.064 ml
        rows = [
            score_case("a", "hgg", _tumour(), _tumour(), spacing, 1.0),
            score_case("b", "tumour_free", fp, free_truth, spacing, 1.0),
            score_case("c", "tumour_free", free_truth, free_truth, spacing, 1.0),
        ]
        assert rows[0]["dice_WT"] == 1.0 and rows[0]["lesion_dice_ET"] == 1.0
        assert rows[1]["dice_WT"] == 0.0 and rows[1]["pred_ml_WT"] == pytest.approx(0.064)
        assert rows[1]["lesion_dice_WT"] == 0.0 and rows[1]["lesion_hd95_WT"] == 374.0  # a false-positive lesion
        assert rows[2]["dice_WT"] == 1.0 and rows[2]["lesion_hd95_WT"] == 0.0
        summary = summarize(rows)
        assert summary["tumour_free"] == {
            "cases": 2, "false_positive_ml": {"median": 0.032, "mean": 0.032, "max": 0.064}}
        assert summary["by_kind"]["tumour_free"]["cases"] == 2
        assert summary["by_kind"]["tumour_free"]["dice"]["WT"] == 0.5
        assert summary["by_kind"]["hgg"]["dice"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
        assert summary["lesionwise"]["dice"]["WT"] == pytest.approx(round(2 / 3, 4))
        assert summary["lesionwise"]["hd95_mm"]["WT"] == pytest.approx(round(374 / 3, 2))

    def test_no_tumour_free_case(self):
        summary = summarize([score_case("a", "", _tumour(), _tumour(), (1, 1, 1), 0.5)])
        assert summary["tumour_free"] == {"cases": 0, "false_positive_ml": None}
        assert summary["by_kind"] == {}


class TestManifest:
    def test_kind_column_wins_over_grade(self, tmp_path):
        top = tmp_path / "MICCAI_BraTS2020_TrainingData"
        top.mkdir()
        (top / "name_mapping.csv").write_text(
            "BraTS_2020_subject_ID,Grade,Kind\nBraTS20_Training_001,HGG,large\nBraTS20_Training_002,LGG,lgg\n")
        assert read_case_kinds(tmp_path) == {"BraTS20_Training_001": "large", "BraTS20_Training_002": "lgg"}

    def test_real_brats_2020_file_gives_grades(self, tmp_path):
        (tmp_path / "name_mapping.csv").write_text(
            "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_class,BraTS_2019_subject_ID,BraTS_2020_subject_ID\n"
            "HGG,Brats17_CBICA_AAB_1,Brats18_CBICA_AAB_1,NA,BraTS19_CBICA_AAB_1,BraTS20_Training_001\n"
            "LGG,Brats17_2013_0_1,Brats18_2013_0_1,NA,BraTS19_2013_0_1,BraTS20_Training_260\n")
        assert read_case_kinds(tmp_path) == {"BraTS20_Training_001": "HGG", "BraTS20_Training_260": "LGG"}

    def test_no_manifest_or_no_id_column(self, tmp_path):
        assert read_case_kinds(tmp_path) == {}
        (tmp_path / "name_mapping.csv").write_text("ID,Grade\nx,HGG\n")
        assert read_case_kinds(tmp_path) == {}
