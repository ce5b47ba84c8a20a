"""The client with DICOM studies: the library's ``dicom=`` and the command line on a folder or a zip."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest

from service.client import SegmentationClient
from service.core.labels import MODALITIES
from tests.service.support import PROJECT_ROOT, affine_for
from tests.tiny_models import expected_labels, scan as tumour_scan
from training.data.synthetic.dicom_study import write_dicom_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    image = tumour_scan()
    volumes = {m: (image[i].astype(np.int16), affine_for()) for i, m in enumerate(MODALITIES)}
    folder = tmp_path_factory.mktemp("study")
    write_dicom_study(volumes, folder, case_id="CLIENT1")
    (folder / "CLIENT1" / "notes.txt").write_text("not DICOM: the command line leaves it out")
    return folder / "CLIENT1"


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.client", *map(str, args), "--no-progress"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


def test_library_sends_dicom_files_and_gets_a_seg(server, study):
    files = sorted(study.rglob("*.dcm"))
    with SegmentationClient(server.url) as client:
        nifti = client.segment(dicom=files, model="unet")
        seg = client.segment(dicom=files, model="unet", format="dicom-seg")
    mask = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(nifti.mask))
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected_labels())
    assert nifti.summary["series"]["t1ce"] == "AX T1 POST GD"
    assert pydicom.dcmread(io.BytesIO(seg.mask)).Modality == "SEG"
    with pytest.raises(ValueError, match="dicom-seg"):
        SegmentationClient(server.url).segment({"flair": files[0]}, format="dicom-seg")


def test_command_line_on_a_folder_and_a_zip(server, study, tmp_path):
    result = cli(study, "--url", server.url, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "series    flair 'AX FLAIR'" in result.stdout
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "CLIENT1_pred.nii.gz").dataobj), expected_labels())
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in study.rglob("*.dcm"):
            z.write(path, path.relative_to(study))
    result = cli(archive, "--url", server.url, "--dicom-seg")
    assert result.returncode == 0, result.stderr
    assert pydicom.dcmread(tmp_path / "study_seg.dcm").Modality == "SEG"


def test_command_line_refusals(server, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli(tmp_path / "empty", "--url", server.url)
    assert result.returncode == 2 and "nor does it hold DICOM files" in result.stderr
    result = cli(tmp_path / "empty", "--url", server.url, "--dicom-seg")
    assert result.returncode == 2 and "--dicom-seg needs DICOM input" in result.stderr
