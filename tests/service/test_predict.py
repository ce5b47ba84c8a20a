"""``python -m service.predict``: a folder in, masks and results.csv out, as a real process (and against real
services with ``--url``)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from service.core.datasets import Case
from service.core.labels import MODALITIES
from service.predict import shard
from tests.service.support import PROJECT_ROOT, write_image4d, write_nifti
from tests.tiny_models import expected_labels, scan as tumour_scan

ROOT = "MICCAI_BraTS2020_TrainingData"


def brats_tree(root: Path, n: int, *, corrupt: str | None = None, labels: bool = True) -> Path:
    image = tumour_scan()
    for index in range(1, n + 1):
        case = f"BraTS20_Training_{index:03d}"
        folder = root / ROOT / case
        folder.mkdir(parents=True)
        for channel, modality in enumerate(MODALITIES):
            write_nifti(folder / f"{case}_{modality}.nii.gz", image[channel])
        if labels:
            write_nifti(folder / f"{case}_seg.nii.gz", expected_labels(), dtype=np.uint8)
    if corrupt:
        (root / ROOT / corrupt / f"{corrupt}_t2.nii.gz").write_bytes(b"\x1f\x8b broken")
    return root


def predict(*args, check=None, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "service.predict", *map(str, args)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, **kwargs)
    if check is not None:
        assert result.returncode == check, result.stdout + result.stderr
    return result


def rows(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {row["case"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def local(models_dir):
    return ["--models-dir", models_dir, "--model", "unet", "--threads", "1", "--backend", "onnxruntime", "--quiet"]


def test_a_folder_with_one_corrupt_case(tmp_path, local):
    data = brats_tree(tmp_path / "in", 3, corrupt="BraTS20_Training_002")
    out = tmp_path / "out"
    result = predict(data, out, *local, check=1)
    table = rows(out / "results.csv")
    assert [table[c]["status"] for c in sorted(table)] == ["ok", "failed", "ok"]
    assert "gzip" in table["BraTS20_Training_002"]["error"] and "_t2.nii.gz" in table["BraTS20_Training_002"]["error"]
    assert float(table["BraTS20_Training_001"]["dice_WT"]) == 1.0 and float(table["BraTS20_Training_003"]["WT_ml"]) > 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["BraTS20_Training_001.nii.gz", "BraTS20_Training_003.nii.gz"]
    mask = nib.load(out / "BraTS20_Training_001.nii.gz")
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected_labels())
    assert "3 case(s) in this part: 2 segmented, 0 already done, 1 failed" in result.stdout
    assert "mean Dice over 2 labelled case(s): WT 1.000" in result.stdout
    assert "failed: BraTS20_Training_002" in result.stderr
    rerun = predict(data, out, *local, check=1)  # the finished cases are skipped, the failed one tried again
    table = rows(out / "results.csv")
    assert table["BraTS20_Training_001"]["status"] == "skipped (done before)"
    assert float(table["BraTS20_Training_001"]["dice_WT"]) == 1.0
    assert "1 segmented" not in rerun.stdout and "2 already done" in rerun.stdout


def test_resume_after_the_process_is_killed(tmp_path, local):
    data = brats_tree(tmp_path / "in", 12)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "service.predict", str(data), str(out), *map(str, local)]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.nii.gz"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = sorted(out.glob("*.nii.gz"))
    assert 2 <= len(done) < 12, "the run should have been stopped midway"
    for path in done:  # no half-written mask: each one there is whole
        np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), expected_labels())
    result = predict(data, out, *local, check=0)
    assert f"{12 - len(done)} segmented, {len(done)} already done, 0 failed" in result.stdout
    assert len(list(out.glob("*.nii.gz"))) == 12 and len(rows(out / "results.csv")) == 12


def test_parts_cover_every_case_exactly_once(tmp_path, local):
    cases = [Case(case_id=f"c{i:02d}", image4d=Path(f"c{i}.nii")) for i in range(11)]
    parts = [shard(cases, 4, part) for part in range(4)]
    ids = [c.case_id for part in parts for c in part]
    assert sorted(ids) == sorted(c.case_id for c in cases) and len(ids) == len(set(ids))
    data = brats_tree(tmp_path / "in", 3)
    out = tmp_path / "out"
    for part in range(2):
        predict(data, out, *local, "--num-parts", 2, "--part-id", part, check=0)
    first, second = rows(out / "results-part0-of-2.csv"), rows(out / "results-part1-of-2.csv")
    assert sorted([*first, *second]) == [f"BraTS20_Training_00{i}" for i in (1, 2, 3)] and not set(first) & set(second)
    assert predict(data, out, *local, "--num-parts", 2, "--part-id", 2).returncode == 2


def test_folder_of_4d_files_and_the_2023_convention(tmp_path, local):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        write_image4d(folder / f"{name}.nii.gz")
    out = tmp_path / "out"
    predict(folder, out, *local, "--label-convention", "brats2023", check=0)
    mask = np.asarray(nib.load(out / "a.nii.gz").dataobj)
    assert set(np.unique(mask)) == {0, 1, 2, 3}
    assert rows(out / "results.csv")["a"]["dice_WT"] == ""  # no label: no scores
    rerun = predict(folder, out, *local, "--label-convention", "brats2023", check=0)
    assert "2 already done" in rerun.stdout
    assert float(rows(out / "results.csv")["a"]["ET_ml"]) > 0  # read back in the 2023 convention


def test_bad_arguments(tmp_path, local):
    (tmp_path / "empty").mkdir()
    result = predict(tmp_path / "empty", tmp_path / "out", *local, check=2)
    assert "no dataset found" in result.stderr and "4D files" in result.stderr
    result = predict(tmp_path / "empty", tmp_path / "out", "--models-dir", tmp_path, "--model", "vnet", check=2)


def test_url_mode_against_real_services_with_a_busy_one(tmp_path, server_factory, models_dir):
    busy = server_factory(models_dir, settings={"max_concurrent": 1, "max_queue": 0, "threads": 1})
    data = brats_tree(tmp_path / "in", 6)
    out = tmp_path / "out"
    # two workers on one service that takes one request at a time (TTA makes each take longer, so that they
    # overlap): some requests are answered 503 and retried
    result = predict(data, out, "--url", f"{busy.url},{busy.url}", "--model", "unet", "--tta", "--quiet", check=0)
    table = rows(out / "results.csv")
    assert all(row["status"] == "ok" and float(row["dice_WT"]) == 1.0 for row in table.values()), table
    with busy.client() as client:
        metrics = client.get("/metrics").text
    rejected = [line for line in metrics.splitlines() if line.startswith("brats_inference_rejected_total")]
    assert rejected and float(rejected[0].split()[-1]) > 0, "no 503 was answered, so no retry was tested"
    assert "6 segmented" in result.stdout


def test_models_dir_from_the_environment_as_for_the_service(tmp_path, models_dir):
    data = brats_tree(tmp_path / "in", 1)
    env = {**os.environ, "BRATS_MODELS_DIR": str(models_dir)}
    predict(data, tmp_path / "out", "--model", "unet", "--threads", "1", "--quiet", check=0, env=env)
    assert (tmp_path / "out" / "BraTS20_Training_001.nii.gz").is_file()


def dicom_studies(root: Path) -> Path:
    """Two synthetic DICOM studies: one as a folder (with a note that is not DICOM), one as a zip."""
    import zipfile

    from tests.service.support import affine_for
    from training.data.synthetic.dicom_study import write_dicom_study

    image = tumour_scan()
    volumes = {m: (image[i].astype(np.int16), affine_for()) for i, m in enumerate(MODALITIES)}
    root.mkdir(parents=True)
    write_dicom_study(volumes, root, case_id="STUDY_A")
    (root / "STUDY_A" / "README.txt").write_text("not DICOM")
    write_dicom_study(volumes, root / "tmp", case_id="STUDY_B")
    with zipfile.ZipFile(root / "STUDY_B.zip", "w") as archive:
        for path in (root / "tmp" / "STUDY_B").rglob("*.dcm"):
            archive.write(path, path.relative_to(root / "tmp"))
    import shutil

    shutil.rmtree(root / "tmp")
    return root


def test_dicom_studies_to_dicom_seg_and_to_nifti(tmp_path, local, server_factory, models_dir):
    import pydicom

    data = dicom_studies(tmp_path / "in")
    out = tmp_path / "out"
    predict(data, out, *local, "--dicom-seg", check=0)
    assert sorted(p.name for p in out.iterdir()) == ["STUDY_A_seg.dcm", "STUDY_B_seg.dcm", "results.csv"]
    assert pydicom.dcmread(out / "STUDY_A_seg.dcm").Modality == "SEG"
    table = rows(out / "results.csv")
    assert table["STUDY_A"]["status"] == "ok" and float(table["STUDY_B"]["WT_ml"]) > 0
    assert "2 already done" in predict(data, out, *local, "--dicom-seg", check=0).stdout
    server = server_factory(models_dir)
    predict(data, tmp_path / "nifti", "--url", server.url, "--model", "unet", "--quiet", check=0)
    mask = np.asarray(nib.load(tmp_path / "nifti" / "STUDY_B.nii.gz").dataobj)
    np.testing.assert_array_equal(mask, expected_labels())
    nifti_input = brats_tree(tmp_path / "nifti-in", 1)
    assert "--dicom-seg needs DICOM studies" in predict(nifti_input, tmp_path / "x", *local, "--dicom-seg",
                                                        check=2).stderr
