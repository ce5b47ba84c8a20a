"""Case-folder discovery, shared by the client's command line and the training readers."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.case_folder import CaseFolderError, find_case_files, nifti_stem
from service.core.labels import MODALITIES
from tests.service.test_client import make_case


class TestCaseFolder:
    def test_finds_modalities_and_seg(self, tmp_path):
        folder = make_case(tmp_path)
        case, files, seg = find_case_files(folder)
        assert case == folder.name
        assert list(files) == list(MODALITIES)
        assert files["t1ce"].name == f"{case}_t1ce.nii.gz"
        assert seg == folder / f"{case}_seg.nii.gz"

    def test_renamed_folder_uses_the_flair_prefix(self, tmp_path):
        folder = make_case(tmp_path, "case7", gz=False, seg=False)
        renamed = folder.rename(tmp_path / "renamed")
        case, files, seg = find_case_files(renamed)
        assert case == "case7" and seg is None
        assert files["flair"] == renamed / "case7_flair.nii"

    def test_missing_modality(self, tmp_path):
        folder = make_case(tmp_path)
        (folder / f"{folder.name}_t2.nii.gz").unlink()
        with pytest.raises(CaseFolderError, match=r"no BraTS20_Training_901_t2\.nii\[\.gz\]"):
            find_case_files(folder)

    def test_nii_and_nii_gz_both_present(self, tmp_path):
        folder = make_case(tmp_path)
        (folder / f"{folder.name}_t1.nii").write_bytes(b"")
        with pytest.raises(CaseFolderError, match="keep one"):
            find_case_files(folder)

    def test_segm_quirk_is_the_label(self, tmp_path):
        folder = make_case(tmp_path, "BraTS20_Training_355", gz=False, seg=False)
        (folder / "W39_1998.09.19_Segm.nii").write_bytes(b"")
        assert find_case_files(folder).label == folder / "W39_1998.09.19_Segm.nii"

    def test_two_segm_files_are_refused(self, tmp_path):
        folder = make_case(tmp_path, seg=False)
        for name in ("a_Segm.nii", "b_Segm.nii.gz"):
            (folder / name).write_bytes(b"")
        with pytest.raises(CaseFolderError, match="several candidate label files"):
            find_case_files(folder)

    def test_given_case_id(self, tmp_path):
        folder = make_case(tmp_path, "case7", seg=False)
        with pytest.raises(CaseFolderError, match=r"other: missing flair volume: no other_flair\.nii\[\.gz\]"):
            find_case_files(folder, case_id="other")
        assert find_case_files(folder, case_id="case7").case_id == "case7"

    def test_no_flair_file(self, tmp_path):
        (tmp_path / "empty").mkdir()
        with pytest.raises(CaseFolderError, match=r"expected one CASE_flair\.nii\[\.gz\] file .*found none"):
            find_case_files(tmp_path / "empty")


@pytest.mark.parametrize("name, stem", [("a.nii.gz", "a"), ("B.NII", "B"), ("a.nii.gz.txt", None), (".nii", None)])
def test_nifti_stem(name, stem):
    assert nifti_stem(Path(name)) == stem
