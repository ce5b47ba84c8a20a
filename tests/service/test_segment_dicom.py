"""DICOM input on ``POST /segment`` against a real service: the same mask as the NIfTI path for the same case,
whatever the acquisition plane, slice order or object type, the DICOM Segmentation on the source series, and a
clear problem for every bad study."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import highdicom as hd
import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest

from service.core.labels import MODALITIES
from tests.service.support import affine_for, write_case
from tests.tiny_models import expected_labels, scan as tumour_scan
from training.data.synthetic.dicom_study import SERIES_DESCRIPTIONS, write_dicom_study

SPACING = (1.0, 1.5, 2.0)


def oblique_affine() -> np.ndarray:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(SPACING)
    affine[:3, 3] = (-10.0, 20.0, 5.0)
    return affine


def study(tmp: Path, *, affine=None, case_id="CASE1", descriptions=None, **kwargs) -> dict[str, list[Path]]:
    affine = affine_for() if affine is None else affine
    image = tumour_scan()
    volumes = {m: (image[i].astype(np.int16), affine) for i, m in enumerate(MODALITIES)}
    return write_dicom_study(volumes, tmp, case_id=case_id, series_descriptions=descriptions, **kwargs)


def dicom_parts(series: dict[str, list[Path]]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("dicom", (f"{n}.dcm", p.read_bytes())) for files in series.values() for n, p in enumerate(files)]


def zipped(series: dict[str, list[Path]], extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for modality, files in series.items():
            for path in files:
                archive.write(path, f"study/{modality}/{path.name}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(img)
    return np.asarray(img.dataobj), img.affine


def mask_of(response: httpx.Response) -> nib.Nifti1Image:
    assert response.status_code == 200, response.text
    return nib.Nifti1Image.from_bytes(gzip.decompress(response.content))


@pytest.fixture(scope="module")
def spool(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dicom-spool")


@pytest.fixture(scope="module")
def server(server_factory, models_dir, spool):
    return server_factory(models_dir, settings={"max_dicom_instances": 200, "max_dicom_bytes": 20 << 20,
                                                "log_level": "DEBUG", "tmp_dir": spool})


@pytest.fixture(autouse=True)
def nothing_left_behind(spool):
    """After every request, good or bad, the upload folder is gone."""
    yield
    assert list(spool.iterdir()) == []


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def nifti_mask(client, tmp_path_factory) -> nib.Nifti1Image:
    parts = write_case(tmp_path_factory.mktemp("nifti"), affine=affine_for())
    files = [(name, (path.name, path.read_bytes())) for name, path in parts.items()]
    return mask_of(client.post("/segment", params={"format": "nifti"}, files=files))


class TestSameMaskAsNifti:
    @pytest.mark.parametrize("slice_axis, reverse, enhanced", [
        (2, False, False), (2, True, False), (0, False, False), (1, True, False), (2, False, True), (0, True, True),
    ])
    def test_acquisition_planes_and_orders(self, client, nifti_mask, tmp_path, slice_axis, reverse, enhanced):
        series = study(tmp_path, slice_axis=slice_axis, reverse=reverse, enhanced=enhanced)
        response = client.post("/segment", params={"format": "nifti"}, files=dicom_parts(series))
        got, got_affine = canonical(mask_of(response))
        want, want_affine = canonical(nifti_mask)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got_affine, want_affine, atol=1e-4)
        summary = response.headers["X-Segment-Summary"]
        assert '"series":{"flair":"AX FLAIR"' in summary and "t1ce" in summary

    def test_oblique_study_in_a_zip_with_other_files(self, client, tmp_path):
        series = study(tmp_path, affine=oblique_affine())
        body = zipped(series, {"README.txt": b"not dicom", "DICOMDIR": b"\x00" * 200})
        response = client.post("/segment", params={"format": "json"}, files=[("dicom", ("s.zip", body))])
        assert response.status_code == 200, response.text
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(__import__("base64").b64decode(response.json()["mask"])))
        np.testing.assert_array_equal(np.asarray(mask.dataobj), expected_labels())  # axial: the native grid
        np.testing.assert_allclose(mask.affine, oblique_affine(), atol=1e-4)
        assert response.json()["volumes_ml"]["WT"] > 0

    def test_series_on_another_grid_is_resampled_onto_the_t1ce_grid(self, client, tmp_path):
        image = tumour_scan()
        fine = np.repeat(image[0], 2, axis=2).astype(np.int16)  # FLAIR at half the slice spacing
        fine_affine = affine_for()
        fine_affine[2, 2] = SPACING[2] / 2
        fine_affine[2, 3] -= SPACING[2] / 4  # slice centres around those of the coarse grid
        volumes = {m: (image[i].astype(np.int16), affine_for()) for i, m in enumerate(MODALITIES)}
        volumes["flair"] = (fine, fine_affine)
        series = write_dicom_study(volumes, tmp_path, case_id="GRIDS")
        mask = mask_of(client.post("/segment", params={"format": "nifti"}, files=dicom_parts(series)))
        assert mask.shape == image.shape[1:]
        np.testing.assert_allclose(mask.affine, affine_for(), atol=1e-4)
        np.testing.assert_array_equal(np.asarray(mask.dataobj), expected_labels())


class TestDicomSeg:
    def test_seg_lies_on_the_t1ce_series(self, client, tmp_path):
        series = study(tmp_path, reverse=True)
        response = client.post("/segment", params={"format": "dicom-seg"}, files=dicom_parts(series))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/dicom"
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(response.content)))
        t1ce = [pydicom.dcmread(p) for p in series["t1ce"]]
        assert {s.ReferencedSeriesSequence[0].SeriesInstanceUID for s in [seg]} == {t1ce[0].SeriesInstanceUID}
        assert seg.StudyInstanceUID == t1ce[0].StudyInstanceUID and seg.FrameOfReferenceUID == t1ce[0].FrameOfReferenceUID
        order = sorted(t1ce, key=lambda ds: float(ds.ImagePositionPatient[2]))  # axial, affine_for(): along +z
        numbers = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in order], combine_segments=True,
                                                    ignore_spatial_locations=True)
        labels = np.zeros(numbers.shape, np.uint8)
        for number, label in ((1, 1), (2, 2), (3, 4)):
            labels[numbers == number] = label
        np.testing.assert_array_equal(np.transpose(labels, (2, 1, 0)), expected_labels())
        names = [s.SegmentLabel for s in seg.SegmentSequence]
        assert names == ["Necrosis and non-enhancing tumour", "Edema", "Enhancing tumour"]
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "resunet" and len(algorithm.AlgorithmVersion) >= 12

    def test_seg_carries_patient_and_study_and_nothing_else_of_the_source(self, client, tmp_path):
        series = study(tmp_path)
        response = client.post("/segment", params={"format": "dicom-seg", "model": "unet"}, files=dicom_parts(series))
        seg = pydicom.dcmread(io.BytesIO(response.content))
        source = pydicom.dcmread(series["t1ce"][0])
        assert (seg.PatientName, seg.PatientID) == (source.PatientName, source.PatientID)
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        for keyword in ("ContrastBolusAgent", "ProtocolName", "RepetitionTime", "EchoTime", "ScanningSequence"):
            assert keyword not in seg, keyword
        assert seg.Modality == "SEG" and seg.SeriesDescription == "Brain tumour segmentation"

    def test_seg_of_an_enhanced_source(self, client, tmp_path):
        series = study(tmp_path, enhanced=True, reverse=True)
        response = client.post("/segment", params={"format": "dicom-seg"}, files=dicom_parts(series))
        assert response.status_code == 200, response.text
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(response.content)))
        volume = seg.get_volume(combine_segments=True)
        assert int(np.count_nonzero(volume.array)) == int(np.count_nonzero(expected_labels()))

    def test_format_dicom_seg_needs_dicom_input(self, client, tmp_path):
        parts = write_case(tmp_path)
        files = [(name, (path.name, path.read_bytes())) for name, path in parts.items()]
        response = client.post("/segment", params={"format": "dicom-seg"}, files=files)
        assert response.status_code == 400 and "needs DICOM input" in response.json()["detail"]


def problem(response: httpx.Response, status: int, *says: str) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for text in says:
        assert text in detail, detail
    assert "SYNTHETIC" not in detail and "1.2." not in detail  # no patient data, no UIDs
    return detail


class TestBadStudies:
    def test_missing_modality_names_the_series_found(self, client, tmp_path):
        series = study(tmp_path)
        del series["t2"]
        problem(client.post("/segment", files=dicom_parts(series)), 422, "no series for t2", "'AX FLAIR'",
                "BRATS_SERIES_RULES")

    def test_two_t2_series_are_ambiguous(self, client, tmp_path):
        series = study(tmp_path / "a")
        other = study(tmp_path / "b", case_id="CASE1", descriptions={**SERIES_DESCRIPTIONS, "t2": "T2 AXIAL 2"})
        uid = pydicom.uid.generate_uid()
        for path in other["t2"]:  # a second T2 series of the same study
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            ds.save_as(path)
        parts = dicom_parts(series) + dicom_parts({"t2": other["t2"]})
        problem(client.post("/segment", files=parts), 422, "2 series for t2")

    def test_two_studies(self, client, tmp_path):
        first, second = study(tmp_path / "a", case_id="A"), study(tmp_path / "b", case_id="B")
        mixed = {"flair": first["flair"], "t1": first["t1"], "t1ce": second["t1ce"], "t2": second["t2"]}
        problem(client.post("/segment", files=dicom_parts(mixed)), 400, "different studies")

    def test_not_dicom_and_mixed_parts(self, client, tmp_path):
        problem(client.post("/segment", files=[("dicom", ("x.dcm", b"hello"))]), 400, "neither a DICOM file nor a zip")
        series = study(tmp_path)
        flair = write_case(tmp_path / "nifti")["flair"]
        parts = dicom_parts(series) + [("flair", ("f.nii.gz", flair.read_bytes()))]
        problem(client.post("/segment", files=parts), 400, "together with dicom parts")

    def test_uneven_spacing(self, client, tmp_path):
        series = study(tmp_path)
        moved = pydicom.dcmread(series["t1"][3])
        moved.ImagePositionPatient = [float(v) for v in moved.ImagePositionPatient[:2]] + [
            float(moved.ImagePositionPatient[2]) + 0.7]
        moved.save_as(series["t1"][3])
        problem(client.post("/segment", files=dicom_parts(series)), 400, "unevenly spaced")

    def test_limits(self, client, tmp_path):
        series = study(tmp_path)
        parts = dicom_parts(series) * 6  # 216 parts, over the 200 configured
        problem(client.post("/segment", files=parts), 413, "more than 200")
        bomb = io.BytesIO()
        with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("a.dcm", b"\x00" * (30 << 20))
        problem(client.post("/segment", files=[("dicom", ("b.zip", bomb.getvalue()))]), 413)

    def test_zip_names_are_never_paths(self, client, tmp_path):
        series = study(tmp_path)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for n, path in enumerate(p for files in series.values() for p in files):
                archive.write(path, f"../../../../tmp/escape-{n}.dcm" if n % 2 else f"/etc/abs-{n}.dcm")
        response = client.post("/segment", files=[("dicom", ("s.zip", buffer.getvalue()))])
        assert response.status_code == 200, response.text
        assert not list(Path("/tmp").glob("escape-*.dcm")) and not list(Path("/etc").glob("abs-*.dcm"))

    def test_zip_with_thousands_of_entries(self, client):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for n in range(3000):
                archive.writestr(f"e/{n}", b"")
        problem(client.post("/segment", files=[("dicom", ("many.zip", buffer.getvalue()))]), 413, "3000 files")

    def test_no_patient_data_or_uids_in_the_logs(self, server, client, tmp_path):
        series = study(tmp_path, case_id="PRIVATE7")
        assert client.post("/segment", files=dicom_parts(series)).status_code == 200
        source = pydicom.dcmread(series["t1ce"][0])
        logs = server.logs()
        for secret in ("SYNTHETIC", "PRIVATE7", str(source.StudyInstanceUID), str(source.SeriesInstanceUID)):
            assert secret not in logs, secret

    def test_service_keeps_serving(self, client, tmp_path):
        series = study(tmp_path)
        assert client.post("/segment", files=dicom_parts(series)).status_code == 200
        assert client.get("/readyz").status_code == 200
