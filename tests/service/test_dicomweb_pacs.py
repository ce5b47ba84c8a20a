"""service.dicomweb.Pacs against a real Orthanc PACS (tests/orthanc.py): STOW, QIDO and WADO round trips and
the errors the service answers with (404 unknown study, 502 unreachable or refusing)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from service.dicomweb import Pacs, PacsError, uid_ref
from service.launcher import free_port
from tests.orthanc import MISSING_REASON, OrthancServer, orthanc_available

pytestmark = pytest.mark.skipif(not orthanc_available(), reason=MISSING_REASON)

SLICES, ROWS, COLS = 3, 8, 8


def mr_slice(study_uid: str, series_uid: str, *, series_number: int, description: str, index: int,
             pixels: np.ndarray) -> pydicom.Dataset:
    """One MR Image Storage instance (explicit VR little endian, with its file meta) of a small series."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "PHANTOM-1"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
    ds.Modality = "MR"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def mr_series(study_uid: str, series_number: int, description: str, seed: int) -> list[pydicom.Dataset]:
    rng = np.random.default_rng(seed)
    series_uid = generate_uid()
    volume = rng.integers(-1000, 3000, size=(SLICES, ROWS, COLS), dtype=np.int16)
    return [
        mr_slice(study_uid, series_uid, series_number=series_number, description=description, index=i,
                 pixels=volume[i])
        for i in range(SLICES)
    ]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def study(orthanc):
    """Two MR series of one study, stored in the PACS with :meth:`Pacs.store`: ``(study_uid, {desc: series})``."""
    study_uid = generate_uid()
    series = {"T1": mr_series(study_uid, 1, "T1", seed=1), "FLAIR": mr_series(study_uid, 2, "FLAIR", seed=2)}
    with Pacs(orthanc.dicomweb_url) as pacs:
        for datasets in series.values():
            pacs.store(datasets)
    return study_uid, series


def test_series_of_study_lists_both_series_with_their_descriptions(orthanc, study):
    study_uid, series = study
    with Pacs(orthanc.dicomweb_url) as pacs:
        found = pacs.series_of_study(study_uid)
    assert [s["SeriesDescription"] for s in found] == ["T1", "FLAIR"]  # by SeriesNumber
    for entry in found:
        stored = series[entry["SeriesDescription"]]
        assert entry["SeriesInstanceUID"] == stored[0].SeriesInstanceUID
        assert entry["Modality"] == "MR"
        assert entry["SeriesNumber"] == stored[0].SeriesNumber
        if "NumberOfSeriesRelatedInstances" in entry:
            assert entry["NumberOfSeriesRelatedInstances"] == SLICES
        assert set(entry) <= {"SeriesInstanceUID", "SeriesDescription", "Modality", "SeriesNumber",
                              "NumberOfSeriesRelatedInstances"}


def test_fetch_series_returns_the_stored_instances_and_pixels(orthanc, study):
    study_uid, series = study
    with Pacs(orthanc.dicomweb_url) as pacs:
        for stored in series.values():
            fetched = pacs.fetch_series(study_uid, stored[0].SeriesInstanceUID)
            assert len(fetched) == SLICES
            by_sop = {ds.SOPInstanceUID: ds for ds in fetched}
            assert set(by_sop) == {ds.SOPInstanceUID for ds in stored}
            for original in stored:
                ds = by_sop[original.SOPInstanceUID]
                assert ds.StudyInstanceUID == study_uid
                assert ds.SeriesInstanceUID == original.SeriesInstanceUID
                assert ds.SOPClassUID == MRImageStorage
                assert ds.SeriesDescription == original.SeriesDescription
                np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)


def test_store_leaves_the_callers_datasets_alone_and_needs_file_meta(orthanc):
    datasets = mr_series(generate_uid(), 1, "T1", seed=6)
    assert all(getattr(ds, "preamble", None) is None for ds in datasets)
    with Pacs(orthanc.dicomweb_url) as pacs:
        pacs.store(datasets)
        assert all(getattr(ds, "preamble", None) is None for ds in datasets)
        del datasets[0].file_meta
        with pytest.raises(ValueError, match="file meta"):
            pacs.store(datasets)


def test_fetches_instances_another_client_stored_without_a_preamble(orthanc):
    """dicomweb_client with pydicom 3 sends a dataset without preamble and "DICM" unless it has a preamble, and
    Orthanc keeps and returns the bytes as sent: Pacs still reads them."""
    from dicomweb_client.api import DICOMwebClient

    study_uid = generate_uid()
    stored = mr_series(study_uid, 4, "T1ce", seed=7)
    DICOMwebClient(orthanc.dicomweb_url).store_instances(stored)
    with Pacs(orthanc.dicomweb_url) as pacs:
        fetched = pacs.fetch_series(study_uid, stored[0].SeriesInstanceUID)
    assert sorted(ds.SOPInstanceUID for ds in fetched) == sorted(ds.SOPInstanceUID for ds in stored)
    by_sop = {ds.SOPInstanceUID: ds for ds in fetched}
    for original in stored:
        np.testing.assert_array_equal(by_sop[original.SOPInstanceUID].pixel_array, original.pixel_array)


def test_unknown_study_is_404_without_the_uid(orthanc, study):
    unknown = generate_uid()
    with Pacs(orthanc.dicomweb_url) as pacs, pytest.raises(PacsError) as caught:
        pacs.series_of_study(unknown)
    assert caught.value.status == 404
    assert unknown not in caught.value.detail and unknown not in str(caught.value)
    assert uid_ref(unknown) in caught.value.detail


def test_unknown_series_is_404(orthanc, study):
    study_uid, _ = study
    unknown = generate_uid()
    with Pacs(orthanc.dicomweb_url) as pacs, pytest.raises(PacsError) as caught:
        pacs.fetch_series(study_uid, unknown)
    assert caught.value.status == 404
    assert unknown not in caught.value.detail and study_uid not in caught.value.detail


def test_closed_port_is_502_without_the_uid():
    port = free_port()  # free now: nothing listens there
    study_uid = generate_uid()
    with Pacs(f"http://127.0.0.1:{port}/dicom-web", timeout_s=5) as pacs:
        for call in (lambda: pacs.series_of_study(study_uid),
                     lambda: pacs.fetch_series(study_uid, generate_uid()),
                     lambda: pacs.store(mr_series(study_uid, 1, "T1", seed=3))):
            with pytest.raises(PacsError) as caught:
                call()
            assert caught.value.status == 502
            assert f"127.0.0.1:{port}" in caught.value.detail
            assert study_uid not in caught.value.detail


def test_patient_data_stays_out_of_errors(orthanc, study):
    study_uid, series = study
    with Pacs(orthanc.dicomweb_url, username="nobody", password="x") as pacs:  # auth is off: still works
        assert len(pacs.series_of_study(study_uid)) == 2
    with Pacs(orthanc.dicomweb_url + "/no-such-root") as pacs, pytest.raises(PacsError) as caught:
        pacs.series_of_study(study_uid)
    assert caught.value.status == 502 and caught.value.pacs_status == 404
    for text in (study_uid, "Test^Phantom", "PHANTOM-1"):
        assert text not in caught.value.detail


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """An Orthanc that asks for the user ``brats`` with the password ``s3cret``."""
    with OrthancServer(tmp_path_factory.mktemp("orthanc-auth"), username="brats", password="s3cret") as server:
        yield server


class TestCredentials:
    def test_refuses_a_client_without_credentials(self, guarded):
        with Pacs(guarded.dicomweb_url) as pacs, pytest.raises(PacsError) as caught:
            pacs.series_of_study(generate_uid())
        assert caught.value.status == 502 and caught.value.pacs_status == 401
        assert "401" in caught.value.detail

    def test_refuses_wrong_credentials(self, guarded):
        with Pacs(guarded.dicomweb_url, username="brats", password="wrong") as pacs, \
                pytest.raises(PacsError) as caught:
            pacs.store(mr_series(generate_uid(), 1, "T1", seed=4))
        assert caught.value.status == 502 and "401" in caught.value.detail
        assert "wrong" not in caught.value.detail

    def test_accepts_the_right_credentials(self, guarded):
        study_uid = generate_uid()
        stored = mr_series(study_uid, 7, "T2", seed=5)
        with Pacs(guarded.dicomweb_url, username="brats", password="s3cret") as pacs:
            pacs.store(stored)
            [entry] = pacs.series_of_study(study_uid)
            assert entry["SeriesDescription"] == "T2" and entry["SeriesNumber"] == 7
            fetched = pacs.fetch_series(study_uid, entry["SeriesInstanceUID"])
        assert sorted(ds.SOPInstanceUID for ds in fetched) == sorted(ds.SOPInstanceUID for ds in stored)


def test_harness_stops_orthanc_and_keeps_its_files_in_tmp_dir(tmp_path):
    server = OrthancServer(tmp_path / "pacs").start()
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.dicomweb_url == server.url + "/dicom-web"
    finally:
        status = server.stop()
    assert status is not None and server.process.poll() is not None and not server.killed
    assert (tmp_path / "pacs" / "orthanc.json").is_file() and (tmp_path / "pacs" / "storage").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["pacs"]


def non_loopback_address() -> str | None:
    """This machine's address on its outgoing interface (no packet is sent), or None when it has none."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_orthanc_refuses_clients_that_are_not_on_loopback(orthanc):
    """Orthanc 1.10 listens on every interface (it has no bind address option); RemoteAccessAllowed=false makes
    it refuse any client whose address is not loopback."""
    import httpx

    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    answer = httpx.get(f"http://{address}:{orthanc.port}/dicom-web/studies", timeout=10)
    assert answer.status_code in (401, 403)
    assert httpx.get(f"{orthanc.dicomweb_url}/studies", timeout=10).status_code == 200
