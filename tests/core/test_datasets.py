"""Readers of the BraTS 2020, 2021, 2023 and MSD Task01 layouts, on tiny trees written with nibabel."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from service.core.datasets import (
    Case,
    DataError,
    find_brats2020_cases,
    find_brats2021_cases,
    find_brats2023_cases,
    find_cases,
    find_msd_cases,
    load_case,
    read_label,
)
from service.core.labels import MODALITIES, to_label_convention

SHAPE = (6, 5, 4)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
AFFINE[:3, 3] = (-3.0, 2.0, 10.0)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Write ``data`` as .nii or .nii.gz (nibabel picks from the name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def make_label(shape=SHAPE) -> np.ndarray:
    """A label with every BraTS value: 4 inside 1 inside 2, in a corner-free block."""
    seg = np.zeros(shape, dtype=np.uint8)
    seg[1:5, 1:4, 1:3] = 2
    seg[2:4, 2:3, 1:3] = 1
    seg[2, 2, 1] = 4
    return seg


def make_image(shape=SHAPE) -> np.ndarray:
    """``(4, *shape)``: channel c is ``10 * (c + 1)`` plus the voxel's x index inside a brain block."""
    image = np.zeros((4, *shape), dtype=np.float32)
    x = np.arange(shape[0], dtype=np.float32)[:, None, None]
    for c in range(4):
        image[c, 1:-1, 1:, :] = (10.0 * (c + 1) + x + np.zeros(shape, np.float32))[1:-1, 1:, :]
    return image


def make_brats_case(
    parent: Path, case_id: str, *, ext: str = ".nii.gz", seg_name: str | None = "default", image=None, seg=None
) -> Path:
    """One BraTS 2020 case folder ``parent/case_id`` like the real one."""
    folder = parent / case_id
    image = make_image() if image is None else image
    for c, modality in enumerate(MODALITIES):
        write_nifti(folder / f"{case_id}_{modality}{ext}", image[c])
    if seg_name is not None:
        name = f"{case_id}_seg{ext}" if seg_name == "default" else seg_name
        write_nifti(folder / name, make_label() if seg is None else seg)
    return folder


@pytest.fixture()
def brats_root(tmp_path: Path) -> Path:
    """``root/MICCAI_BraTS2020_TrainingData`` (cases 001 .nii.gz and 355 .nii with its quirky label) and
    ``root/MICCAI_BraTS2020_ValidationData`` (case 001 without seg), with the csv files of the release."""
    train = tmp_path / "MICCAI_BraTS2020_TrainingData"
    make_brats_case(train, "BraTS20_Training_001", ext=".nii.gz")
    make_brats_case(train, "BraTS20_Training_355", ext=".nii", seg_name="W39_1998.09.19_Segm.nii")
    (train / "name_mapping.csv").write_text("Grade,BraTS_2017_subject_ID\nHGG,Brats17_x\n")
    (train / "survival_info.csv").write_text("Brats20ID,Age\nBraTS20_Training_001,60\n")
    val = tmp_path / "MICCAI_BraTS2020_ValidationData"
    make_brats_case(val, "BraTS20_Validation_001", ext=".nii.gz", seg_name=None)
    (val / "name_mapping_validation_data.csv").write_text("x\n")
    (val / "survival_evaluation.csv").write_text("x\n")
    return tmp_path


def make_msd_root(tmp_path: Path) -> Path:
    """``tmp_path/Task01_BrainTumour`` with two training cases, one test case and macOS ``._`` files."""
    task = tmp_path / "Task01_BrainTumour"
    image4d = np.moveaxis(make_image(), 0, -1)  # (X, Y, Z, 4) as in the MSD files
    msd_label = np.zeros(SHAPE, dtype=np.uint8)
    msd_label[1, 1, 1] = 1  # edema -> 2
    msd_label[2, 2, 2] = 2  # non-enhancing -> 1
    msd_label[3, 3, 3] = 3  # enhancing -> 4
    for n in ("001", "002"):
        write_nifti(task / "imagesTr" / f"BRATS_{n}.nii.gz", image4d)
        write_nifti(task / "labelsTr" / f"BRATS_{n}.nii.gz", msd_label)
    write_nifti(task / "imagesTs" / f"BRATS_485.nii.gz", image4d)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (task / folder / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    (task / "dataset.json").write_text('{"name": "BRATS"}')
    return task


class TestFindBrats:
    def test_training_folder_itself(self, brats_root: Path):
        cases = find_brats2020_cases(brats_root / "MICCAI_BraTS2020_TrainingData")
        assert [c.case_id for c in cases] == ["BraTS20_Training_001", "BraTS20_Training_355"]
        first, quirk = cases
        assert first.images["t1ce"].name == "BraTS20_Training_001_t1ce.nii.gz"
        assert first.label.name == "BraTS20_Training_001_seg.nii.gz"
        assert quirk.images["flair"].name == "BraTS20_Training_355_flair.nii"
        assert quirk.label.name == "W39_1998.09.19_Segm.nii"
        assert all(c.label_format == "brats" and c.image4d is None for c in cases)

    def test_parent_holds_training_and_validation(self, brats_root: Path):
        cases = {c.case_id: c for c in find_brats2020_cases(brats_root)}
        assert sorted(cases) == ["BraTS20_Training_001", "BraTS20_Training_355", "BraTS20_Validation_001"]
        assert cases["BraTS20_Validation_001"].label is None
        assert cases["BraTS20_Validation_001"].images["t2"].name == "BraTS20_Validation_001_t2.nii.gz"

    def test_grandparent_as_in_the_kaggle_download(self, tmp_path: Path):
        make_brats_case(tmp_path / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData", "BraTS20_Training_007")
        assert [c.case_id for c in find_brats2020_cases(tmp_path)] == ["BraTS20_Training_007"]

    def test_seg_file_wins_over_a_segm_file(self, tmp_path: Path):
        folder = make_brats_case(tmp_path, "BraTS20_Training_002")
        write_nifti(folder / "W39_1998.09.19_Segm.nii", make_label())
        (case,) = find_brats2020_cases(tmp_path)
        assert case.label.name == "BraTS20_Training_002_seg.nii.gz"

    def test_missing_modality_names_case_and_file(self, tmp_path: Path):
        folder = make_brats_case(tmp_path, "BraTS20_Training_003")
        (folder / "BraTS20_Training_003_t1ce.nii.gz").unlink()
        with pytest.raises(DataError, match=r"BraTS20_Training_003: missing t1ce .*BraTS20_Training_003_t1ce\.nii"):
            find_brats2020_cases(tmp_path)

    def test_nii_and_niigz_of_one_modality_is_ambiguous(self, tmp_path: Path):
        folder = make_brats_case(tmp_path, "BraTS20_Training_004", ext=".nii")
        write_nifti(folder / "BraTS20_Training_004_t2.nii.gz", make_image()[3])
        with pytest.raises(DataError, match=r"BraTS20_Training_004: both .*_t2\.nii and .*_t2\.nii\.gz"):
            find_brats2020_cases(tmp_path)

    def test_empty_folder(self, tmp_path: Path):
        with pytest.raises(DataError, match=r"no BraTS 2020 case folders .*expected MICCAI_BraTS2020_TrainingData"):
            find_brats2020_cases(tmp_path)

    def test_missing_folder(self, tmp_path: Path):
        with pytest.raises(DataError, match="does not exist"):
            find_brats2020_cases(tmp_path / "nope")


class TestFindMsd:
    def test_task_folder_and_parent(self, tmp_path: Path):
        task = make_msd_root(tmp_path)
        for root in (task, tmp_path):
            cases = find_msd_cases(root)
            assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_002", "BRATS_485"]
            assert cases[0].image4d == task / "imagesTr" / "BRATS_001.nii.gz"
            assert cases[0].label == task / "labelsTr" / "BRATS_001.nii.gz"
            assert cases[2].label is None and cases[2].image4d.parent.name == "imagesTs"
            assert all(c.label_format == "msd" and c.images is None for c in cases)

    def test_training_image_without_label(self, tmp_path: Path):
        task = make_msd_root(tmp_path)
        (task / "labelsTr" / "BRATS_002.nii.gz").unlink()
        with pytest.raises(DataError, match=r"BRATS_002: no label for BRATS_002\.nii\.gz"):
            find_msd_cases(task)

    def test_empty_folder(self, tmp_path: Path):
        with pytest.raises(DataError, match=r"no MSD cases .*imagesTr/BRATS_NNN\.nii\.gz"):
            find_msd_cases(tmp_path)


class TestFindCases:
    def test_detects_brats(self, brats_root: Path):
        assert len(find_cases(brats_root)) == 3

    def test_detects_msd(self, tmp_path: Path):
        make_msd_root(tmp_path)
        assert [c.case_id for c in find_cases(tmp_path)] == ["BRATS_001", "BRATS_002", "BRATS_485"]

    def test_unknown_folder_says_what_was_expected(self, tmp_path: Path):
        (tmp_path / "something").mkdir()
        (tmp_path / "notes.csv").write_text("a,b\n")
        with pytest.raises(DataError, match=r"no dataset found .*BraTS20_Training_NNN.* or Task01_BrainTumour"):
            find_cases(tmp_path)

    def test_both_layouts_refused(self, brats_root: Path):
        make_msd_root(brats_root)
        with pytest.raises(DataError, match="both a BraTS 2020 and an MSD dataset"):
            find_cases(brats_root)


class TestCase:
    def test_needs_exactly_one_image_source(self, tmp_path: Path):
        with pytest.raises(ValueError, match="either images"):
            Case(case_id="x", images=None, image4d=None)

    def test_needs_all_modalities(self, tmp_path: Path):
        with pytest.raises(ValueError, match="exactly the keys"):
            Case(case_id="x", images={"flair": tmp_path / "a.nii"})


class TestLoadCase:
    def _case(self, root: Path, case_id: str):
        return next(c for c in find_cases(root) if c.case_id == case_id)

    def test_brats_case(self, brats_root: Path):
        image, label, geometry = load_case(self._case(brats_root, "BraTS20_Training_001"))
        assert image.dtype == np.float32 and image.shape == (4, *SHAPE)
        np.testing.assert_array_equal(image, make_image())  # channel order flair, t1, t1ce, t2
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, make_label())
        assert geometry.shape == SHAPE
        np.testing.assert_allclose(geometry.affine, AFFINE)

    def test_case_355_quirk_and_plain_nii(self, brats_root: Path):
        image, label, _ = load_case(self._case(brats_root, "BraTS20_Training_355"))
        np.testing.assert_array_equal(image, make_image())
        np.testing.assert_array_equal(label, make_label())

    def test_validation_case_has_no_label(self, brats_root: Path):
        image, label, _ = load_case(self._case(brats_root, "BraTS20_Validation_001"))
        assert image.shape == (4, *SHAPE) and label is None

    def test_msd_case_is_channel_first_with_brats_labels(self, tmp_path: Path):
        make_msd_root(tmp_path)
        image, label, geometry = load_case(self._case(tmp_path, "BRATS_001"))
        np.testing.assert_array_equal(image, make_image())
        assert label.dtype == np.uint8
        assert (label[1, 1, 1], label[2, 2, 2], label[3, 3, 3]) == (2, 1, 4)
        assert int(np.count_nonzero(label)) == 3
        assert geometry.shape == SHAPE
        image_ts, label_ts, _ = load_case(self._case(tmp_path, "BRATS_485"))
        assert image_ts.shape == (4, *SHAPE) and label_ts is None

    def test_mismatched_shapes(self, tmp_path: Path):
        folder = make_brats_case(tmp_path, "BraTS20_Training_010")
        write_nifti(folder / "BraTS20_Training_010_t2.nii.gz", np.zeros((6, 5, 3), np.float32))
        with pytest.raises(DataError, match=r"BraTS20_Training_010: shape \(6, 5, 3\) differs .*_t2\.nii\.gz\)"):
            load_case(find_cases(tmp_path)[0])

    def test_mismatched_label_shape(self, tmp_path: Path):
        make_brats_case(tmp_path, "BraTS20_Training_011", seg=np.zeros((6, 5, 5), np.uint8))
        with pytest.raises(DataError, match=r"BraTS20_Training_011: shape .*_seg\.nii\.gz\)"):
            load_case(find_cases(tmp_path)[0])

    def test_affine_within_tolerance_is_accepted(self, tmp_path: Path):
        folder = make_brats_case(tmp_path, "BraTS20_Training_012")
        nudged = AFFINE.copy()
        nudged[0, 3] += 5e-4
        write_nifti(folder / "BraTS20_Training_012_t1.nii.gz", make_image()[1], affine=nudged)
        image, _, _ = load_case(find_cases(tmp_path)[0])
        np.testing.assert_array_equal(image, make_image())

    def test_mismatched_affines(self, tmp_path: Path):
        folder = make_brats_case(tmp_path, "BraTS20_Training_013")
        moved = AFFINE.copy()
        moved[1, 3] += 0.01
        write_nifti(folder / "BraTS20_Training_013_t1.nii.gz", make_image()[1], affine=moved)
        with pytest.raises(DataError, match=r"BraTS20_Training_013: affine differs .*0\.01.*_t1\.nii\.gz\)"):
            load_case(find_cases(tmp_path)[0])

    def test_corrupt_gzip(self, tmp_path: Path):
        folder = make_brats_case(tmp_path, "BraTS20_Training_014")
        path = folder / "BraTS20_Training_014_flair.nii.gz"
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        with pytest.raises(DataError, match=r"BraTS20_Training_014: .*truncated.*_flair\.nii\.gz\)"):
            load_case(find_cases(tmp_path)[0])

    def test_not_a_nifti(self, tmp_path: Path):
        folder = make_brats_case(tmp_path, "BraTS20_Training_015", ext=".nii")
        (folder / "BraTS20_Training_015_t2.nii").write_bytes(gzip.compress(b"hello, not an image" * 10))
        with pytest.raises(DataError, match=r"BraTS20_Training_015: not a NIfTI file .*_t2\.nii\)"):
            load_case(find_cases(tmp_path)[0])

    def test_brats_label_3_is_refused(self, tmp_path: Path):
        seg = make_label()
        seg[0, 0, 0] = 3
        make_brats_case(tmp_path, "BraTS20_Training_016", seg=seg)
        with pytest.raises(DataError, match=r"BraTS20_Training_016: label values \{3\}.*_seg\.nii\.gz\)"):
            load_case(find_cases(tmp_path)[0])

    def test_msd_label_outside_0_to_3_is_refused(self, tmp_path: Path):
        task = make_msd_root(tmp_path)
        bad = np.zeros(SHAPE, np.uint8)
        bad[0, 0, 0] = 4
        write_nifti(task / "labelsTr" / "BRATS_002.nii.gz", bad)
        expected = r"BRATS_002: MSD label file: label values \{4\}.*\{0, 1, 2, 3\}.*BRATS_002\.nii\.gz\)"
        with pytest.raises(DataError, match=expected):
            load_case(self._case(tmp_path, "BRATS_002"))

    def test_msd_label_with_fractional_values_is_refused(self, tmp_path: Path):
        task = make_msd_root(tmp_path)
        bad = np.zeros(SHAPE, np.float32)
        bad[0, 0, 0] = 1.5
        write_nifti(task / "labelsTr" / "BRATS_002.nii.gz", bad)
        with pytest.raises(DataError, match=r"BRATS_002: MSD label file: .*whole numbers.*BRATS_002\.nii\.gz\)"):
            load_case(self._case(tmp_path, "BRATS_002"))

    def test_msd_image_with_three_channels(self, tmp_path: Path):
        task = make_msd_root(tmp_path)
        write_nifti(task / "imagesTr" / "BRATS_001.nii.gz", np.zeros((*SHAPE, 3), np.float32))
        with pytest.raises(DataError, match=r"BRATS_001: expected a 4D volume .*got shape \(\d+, \d+, \d+, 3\)"):
            load_case(self._case(tmp_path, "BRATS_001"))

    def test_msd_image_that_is_3d(self, tmp_path: Path):
        task = make_msd_root(tmp_path)
        write_nifti(task / "imagesTr" / "BRATS_001.nii.gz", np.zeros(SHAPE, np.float32))
        with pytest.raises(DataError, match=r"BRATS_001: expected a 4D volume"):
            load_case(self._case(tmp_path, "BRATS_001"))


# BraTS 2021 and 2023 -------------------------------------------------------------------------------------------

BRATS2021_TRAIN = "RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021"
BRATS2021_VAL = "RSNA_ASNR_MICCAI_BraTS2021_ValidationData"
BRATS2023_TRAIN = "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
BRATS2023_VAL = "ASNR-MICCAI-BraTS2023-GLI-Challenge-ValidationData"
SUFFIX_2023 = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}  # as the BraTS 2023 release names them


def make_label_2023() -> np.ndarray:
    """:func:`make_label` in the BraTS 2023 values: enhancing tumour 3 instead of 4."""
    seg = make_label()
    seg[seg == 4] = 3
    return seg


def make_brats2023_case(parent: Path, case_id: str, *, with_seg: bool = True, seg=None) -> Path:
    """One BraTS 2023 case folder ``parent/case_id`` like the real one: ``CASE-{t2f,t1n,t1c,t2w,seg}.nii.gz``."""
    folder = parent / case_id
    image = make_image()
    for c, modality in enumerate(MODALITIES):
        write_nifti(folder / f"{case_id}-{SUFFIX_2023[modality]}.nii.gz", image[c])
    if with_seg:
        write_nifti(folder / f"{case_id}-seg.nii.gz", make_label_2023() if seg is None else seg)
    return folder


@pytest.fixture()
def brats2021_root(tmp_path: Path) -> Path:
    """The training folder (cases 00000, 00002) and a validation folder (case 00001 without seg)."""
    for n in ("00000", "00002"):
        make_brats_case(tmp_path / BRATS2021_TRAIN, f"BraTS2021_{n}")
    make_brats_case(tmp_path / BRATS2021_VAL, "BraTS2021_00001", seg_name=None)
    return tmp_path


@pytest.fixture()
def brats2023_root(tmp_path: Path) -> Path:
    """The training folder (cases 00000-000, 00002-000) and a validation folder (00001-000 without seg)."""
    for case_id in ("BraTS-GLI-00000-000", "BraTS-GLI-00002-000"):
        make_brats2023_case(tmp_path / BRATS2023_TRAIN, case_id)
    make_brats2023_case(tmp_path / BRATS2023_VAL, "BraTS-GLI-00001-000", with_seg=False)
    return tmp_path


class TestFindBrats2021:
    def test_training_folder_itself(self, brats2021_root: Path):
        cases = find_brats2021_cases(brats2021_root / BRATS2021_TRAIN)
        assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00002"]
        assert cases[0].images["t1ce"].name == "BraTS2021_00000_t1ce.nii.gz"
        assert cases[0].label.name == "BraTS2021_00000_seg.nii.gz"
        assert all(c.label_format == "brats" and c.image4d is None for c in cases)

    def test_parent_holds_training_and_validation(self, brats2021_root: Path):
        cases = {c.case_id: c for c in find_brats2021_cases(brats2021_root)}
        assert sorted(cases) == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
        assert cases["BraTS2021_00001"].label is None
        assert cases["BraTS2021_00001"].images["flair"].parent.parent.name == BRATS2021_VAL

    def test_not_taken_for_brats2020_and_back(self, brats2021_root: Path, brats_root: Path):
        with pytest.raises(DataError, match="no BraTS 2020 case folders"):
            find_brats2020_cases(brats2021_root / BRATS2021_TRAIN)
        with pytest.raises(DataError, match=r"no BraTS 2021 case folders .*expected RSNA_ASNR_MICCAI_BraTS2021"):
            find_brats2021_cases(brats_root / "MICCAI_BraTS2020_TrainingData")

    def test_labels_as_in_2020(self, brats2021_root: Path):
        case = find_brats2021_cases(brats2021_root)[0]
        image, label, _ = load_case(case)
        np.testing.assert_array_equal(image, make_image())
        np.testing.assert_array_equal(label, make_label())


class TestFindBrats2023:
    def test_training_folder_itself(self, brats2023_root: Path):
        cases = find_brats2023_cases(brats2023_root / BRATS2023_TRAIN)
        assert [c.case_id for c in cases] == ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]
        first = cases[0]
        assert {m: p.name for m, p in first.images.items()} == {
            "flair": "BraTS-GLI-00000-000-t2f.nii.gz",
            "t1": "BraTS-GLI-00000-000-t1n.nii.gz",
            "t1ce": "BraTS-GLI-00000-000-t1c.nii.gz",
            "t2": "BraTS-GLI-00000-000-t2w.nii.gz",
        }
        assert first.label.name == "BraTS-GLI-00000-000-seg.nii.gz"
        assert all(c.label_format == "brats2023" and c.image4d is None for c in cases)

    def test_parent_holds_training_and_validation(self, brats2023_root: Path):
        cases = {c.case_id: c for c in find_brats2023_cases(brats2023_root)}
        assert sorted(cases) == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
        assert cases["BraTS-GLI-00001-000"].label is None
        assert cases["BraTS-GLI-00001-000"].images["t2"].name == "BraTS-GLI-00001-000-t2w.nii.gz"

    def test_missing_modality_names_case_and_file(self, tmp_path: Path):
        folder = make_brats2023_case(tmp_path, "BraTS-GLI-00003-000")
        (folder / "BraTS-GLI-00003-000-t1c.nii.gz").unlink()
        with pytest.raises(DataError, match=r"BraTS-GLI-00003-000: missing t1ce volume: no BraTS-GLI-00003-000-t1c\.nii"):
            find_brats2023_cases(tmp_path)

    def test_empty_folder(self, tmp_path: Path):
        with pytest.raises(DataError, match=r"no BraTS 2023 case folders .*BraTS-GLI-NNNNN-NNN-\{t2f,t1n,t1c,t2w,seg\}"):
            find_brats2023_cases(tmp_path)

    def test_channels_in_project_order_and_et_mapped_3_to_4(self, brats2023_root: Path):
        case = find_brats2023_cases(brats2023_root)[0]
        image, label, geometry = load_case(case)
        np.testing.assert_array_equal(image, make_image())  # t2f, t1n, t1c, t2w -> flair, t1, t1ce, t2
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, make_label())
        assert geometry.shape == SHAPE

    def test_written_back_in_2023_values_equals_the_file(self, brats2023_root: Path):
        case = find_brats2023_cases(brats2023_root)[0]
        _, label, _ = load_case(case)
        written = to_label_convention(label, "brats2023")
        np.testing.assert_array_equal(written, np.asarray(nib.load(str(case.label)).dataobj))
        np.testing.assert_array_equal(to_label_convention(label, "brats2020"), make_label())

    def test_validation_case_has_no_label(self, brats2023_root: Path):
        case = next(c for c in find_cases(brats2023_root) if c.case_id == "BraTS-GLI-00001-000")
        image, label, _ = load_case(case)
        assert image.shape == (4, *SHAPE) and label is None

    def test_label_read_alone_as_with_the_images(self, brats2023_root: Path):
        cases = {c.case_id: c for c in find_cases(brats2023_root)}
        label, geometry = read_label(cases["BraTS-GLI-00000-000"])
        _, with_images, scan_geometry = load_case(cases["BraTS-GLI-00000-000"])
        np.testing.assert_array_equal(label, with_images)
        assert geometry == scan_geometry
        assert read_label(cases["BraTS-GLI-00001-000"]) is None

    def test_post_treatment_label_4_is_refused(self, tmp_path: Path):
        seg = make_label_2023()
        seg[0, 0, 0] = 4  # resection cavity in the BraTS 2024 post-treatment data
        make_brats2023_case(tmp_path, "BraTS-GLI-00005-001", seg=seg)
        (case,) = find_cases(tmp_path)  # found (names as in 2023), refused when read
        expected = (
            r"BraTS-GLI-00005-001: .*holds label 4 \(resection cavity in BraTS 2024 post-treatment data\); this project "
            r"segments pre-operative gliomas \(labels NCR, edema, enhancing tumour\); use a pre-operative dataset "
            r"\(.*BraTS-GLI-00005-001-seg\.nii\.gz\)"
        )
        with pytest.raises(DataError, match=expected):
            load_case(case)

    def test_other_values_are_refused_as_such(self, tmp_path: Path):
        seg = make_label_2023()
        seg[0, 0, 0] = 5
        make_brats2023_case(tmp_path, "BraTS-GLI-00004-000", seg=seg)
        with pytest.raises(DataError, match=r"BraTS-GLI-00004-000: label values \{5\}.*\{0, 1, 2, 3\}.*-seg\.nii\.gz\)"):
            load_case(find_cases(tmp_path)[0])


class TestFindCasesNewLayouts:
    def test_detects_brats2021(self, brats2021_root: Path):
        cases = find_cases(brats2021_root)
        assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
        assert [c.label is None for c in cases] == [False, True, False]

    def test_detects_brats2023(self, brats2023_root: Path):
        cases = find_cases(brats2023_root)
        assert [c.case_id for c in cases] == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
        assert [c.label is None for c in cases] == [False, True, False]
        assert {c.label_format for c in cases} == {"brats2023"}

    def test_unknown_folder_lists_every_layout(self, tmp_path: Path):
        (tmp_path / "something").mkdir()
        with pytest.raises(DataError, match=r"BraTS20_Training_NNN.* or .*BraTS2021_NNNNN.* or .*BraTS-GLI-NNNNN-NNN.* or "):
            find_cases(tmp_path)

    def test_two_layouts_refused_naming_both(self, tmp_path: Path):
        make_brats_case(tmp_path / BRATS2021_TRAIN, "BraTS2021_00000")
        make_brats2023_case(tmp_path / BRATS2023_TRAIN, "BraTS-GLI-00000-000")
        with pytest.raises(DataError, match="holds both a BraTS 2021 and a BraTS 2023 dataset; point at one"):
            find_cases(tmp_path)

    def test_three_layouts_refused_naming_all(self, brats_root: Path):
        make_brats2023_case(brats_root / BRATS2023_TRAIN, "BraTS-GLI-00000-000")
        make_msd_root(brats_root)
        with pytest.raises(DataError, match="holds a BraTS 2020, a BraTS 2023 and an MSD dataset"):
            find_cases(brats_root)

    def test_case_accepts_the_2023_label_format_only_among_the_known(self, tmp_path: Path):
        images = {m: tmp_path / f"{m}.nii.gz" for m in MODALITIES}
        assert Case(case_id="x", images=images, label_format="brats2023").label_format == "brats2023"
        with pytest.raises(ValueError, match="label_format must be one of"):
            Case(case_id="x", images=images, label_format="brats2024")
