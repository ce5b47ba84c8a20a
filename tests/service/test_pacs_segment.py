"""The whole loop against a real Orthanc: a synthetic study stored in the PACS, segmented by the service through
DICOMweb, the SEG fetched back from Orthanc lies on the source series and equals the NIfTI path's mask."""

from __future__ import annotations

import gzip

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from service.core.labels import MODALITIES
from service.dicomweb import Pacs
from tests.orthanc import MISSING_REASON, OrthancServer, orthanc_available
from tests.service.support import affine_for, write_case
from tests.tiny_models import expected_labels, scan as tumour_scan
from training.data.synthetic.dicom_study import write_dicom_study

pytestmark = pytest.mark.skipif(not orthanc_available(), reason=MISSING_REASON)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def stored_study(orthanc, tmp_path_factory) -> dict[str, list]:
    image = tumour_scan()
    volumes = {m: (image[i].astype(np.int16), affine_for()) for i, m in enumerate(MODALITIES)}
    series = write_dicom_study(volumes, tmp_path_factory.mktemp("study"), case_id="PACS1", reverse=True)
    datasets = {m: [pydicom.dcmread(p) for p in paths] for m, paths in series.items()}
    with Pacs(orthanc.dicomweb_url) as pacs:
        pacs.store([ds for items in datasets.values() for ds in items])
    return datasets


@pytest.fixture(scope="module")
def server(server_factory, models_dir, orthanc):
    return server_factory(models_dir, settings={"dicomweb_url": orthanc.dicomweb_url, "log_level": "DEBUG"})


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def test_segment_a_study_on_the_pacs(client, orthanc, stored_study, tmp_path):
    study_uid = str(stored_study["t1ce"][0].StudyInstanceUID)
    response = client.post(f"/dicomweb/studies/{study_uid}/segment", params={"model": "unet"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["series"] == {"flair": "AX FLAIR", "t1": "AX T1 SE", "t1ce": "AX T1 POST GD", "t2": "AX T2 FSE"}
    stored = body["stored"]
    with Pacs(orthanc.dicomweb_url) as pacs:
        listed = {s["SeriesInstanceUID"]: s for s in pacs.series_of_study(study_uid)}
        assert listed[stored["series_instance_uid"]]["Modality"] == "SEG"
        fetched = pacs.fetch_series(study_uid, stored["series_instance_uid"])
    assert [str(ds.SOPInstanceUID) for ds in fetched] == [stored["sop_instance_uid"]]
    seg = hd.seg.Segmentation.from_dataset(fetched[0])
    t1ce = sorted(stored_study["t1ce"], key=lambda ds: float(ds.ImagePositionPatient[2]))
    numbers = seg.get_pixels_by_source_instance([str(ds.SOPInstanceUID) for ds in t1ce], combine_segments=True)
    labels = np.select([numbers == 1, numbers == 2, numbers == 3], [1, 2, 4], 0).astype(np.uint8)
    seg_mask = np.transpose(labels, (2, 1, 0))
    np.testing.assert_array_equal(seg_mask, expected_labels())
    parts = write_case(tmp_path, affine=affine_for())
    nifti = client.post("/segment", params={"format": "nifti", "model": "unet"},
                        files=[(n, (p.name, p.read_bytes())) for n, p in parts.items()])
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(nifti.content))
    np.testing.assert_array_equal(seg_mask, np.asarray(mask.dataobj))


def test_no_patient_data_or_uids_in_the_logs(server, client, stored_study):
    source = stored_study["t1ce"][0]
    study_uid = str(source.StudyInstanceUID)
    assert client.post(f"/dicomweb/studies/{study_uid}/segment").status_code == 200
    logs = server.logs()
    assert "POST /dicomweb/studies/{study_uid}/segment model=resunet 200" in logs
    for secret in (study_uid, str(source.SeriesInstanceUID), str(source.PatientID), "SYNTHETIC"):
        assert secret not in logs, secret


def test_unknown_study_is_404(client, orthanc):
    response = client.post("/dicomweb/studies/1.2.3.4.5.6.7/segment")
    assert response.status_code == 404, response.text
    assert "1.2.3.4.5.6.7" not in response.json()["detail"]


def test_unreachable_pacs_is_502(server_factory, models_dir):
    server = server_factory(models_dir, settings={"dicomweb_url": "http://127.0.0.1:9/dicom-web",
                                                  "dicomweb_timeout_s": 5})
    with server.client() as c:
        response = c.post("/dicomweb/studies/1.2.3/segment")
        assert response.status_code == 502, response.text
        assert c.get("/readyz").status_code == 200


def test_not_configured_is_503(client, server_factory, models_dir):
    server = server_factory(models_dir)
    with server.client() as c:
        response = c.post("/dicomweb/studies/1.2.3/segment")
    assert response.status_code == 503 and "BRATS_DICOMWEB_URL" in response.json()["detail"]


def test_a_uid_that_is_not_a_uid_is_422(client):
    assert client.post("/dicomweb/studies/..%2Fetc/segment").status_code in (404, 422)
    assert client.post("/dicomweb/studies/abc/segment").status_code == 422
