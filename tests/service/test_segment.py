"""``POST /segment`` against real ``python -m service`` processes, with real NIfTI files written by nibabel.

The test models are pointwise convolutions (``tests/service/support.py``), so the segmentation of the
synthetic case is known voxel for voxel: WT where FLAIR is bright, TC where T1ce is bright too, ET where T2
is bright too. Every upload carries patient-like free text (file names, ``descrip``, ``aux_file``,
``intent_name``, ``db_name``, a header extension) that must never come back.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import socket
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import nibabel as nib
import numpy as np
import pytest

from service.core.labels import MODALITIES
from service.core.scoring import region_metrics, volumes_ml

SHAPE = (40, 44, 36)
AFFINE = np.array(
    [[0.0, -1.2, 0.0, 30.0], [1.1, 0.0, 0.0, -12.5], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]]
)  # axes swapped, anisotropic voxels, an offset: a mask on the wrong geometry would show
ZOOMS = (1.1, 1.2, 2.5)
SECRET = b"PATIENT Jane Doe MRN-0042"
FILE_NAME = "PATIENT_Jane_Doe_MRN-0042.nii.gz"
MAX_UPLOAD_BYTES = 3_000_000  # the case's parts take about 1.1 MB uncompressed
MAX_VOXELS = 300_000  # the 4D image has 4 * 63,360 voxels
IDLE_TIMEOUT_S = 1.5
PROBLEM_KEYS = {"type", "title", "status", "detail"}
SUMMARY_KEYS = {
    "model", "model_sha256", "provider", "shape", "spacing_mm", "labels", "volumes_ml", "dice", "hd95_mm", "timing_ms",
    "postprocessed",
}


# ------------------------------------------------------------------------------------------------ data
def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def make_scan(shape=SHAPE) -> np.ndarray:
    """``(4, X, Y, Z)``: an ellipsoid brain (1; T1 3) with a bright ball (10) in FLAIR, a smaller one in T1ce,
    a smaller one still in T2."""
    centre = tuple(s / 2 for s in shape)
    grid = np.indices(shape, dtype=np.float64)
    brain = sum(((g - c) / (0.45 * s)) ** 2 for g, c, s in zip(grid, centre, shape)) <= 1.0
    image = np.zeros((4, *shape), dtype=np.float32)
    image[:, brain] = 1.0
    image[1] *= 3.0
    tumour = tuple(c + 2 for c in centre)
    image[0][_ball(shape, tumour, 7)] = 10.0
    image[2][_ball(shape, tumour, 4)] = 10.0
    image[3][_ball(shape, tumour, 2)] = 10.0
    return image


def predicted_labels(image: np.ndarray) -> np.ndarray:
    """What every test model predicts for :func:`make_scan` (3D and 2D, with or without TTA)."""
    wt = image[0] > 5
    tc = wt & (image[2] > 5)
    et = tc & (image[3] > 5)
    labels = np.zeros(image.shape[1:], dtype=np.uint8)
    labels[wt], labels[tc], labels[et] = 2, 1, 4
    return labels


def make_label(shape=SHAPE, *, with_et: bool = True) -> np.ndarray:
    """A ground truth that differs from the prediction (shifted, other radii), so Dice < 1 and HD95 > 0."""
    centre = tuple(s / 2 + 3 for s in shape)
    label = np.zeros(shape, dtype=np.uint8)
    label[_ball(shape, centre, 6)] = 2
    label[_ball(shape, centre, 4)] = 1
    if with_et:
        label[_ball(shape, centre, 3) & ~_ball(shape, centre, 1)] = 4
    return label


def nifti_bytes(data, *, affine=AFFINE, gz: bool = True, dtype=np.float32, plant: bool = True) -> bytes:
    """A NIfTI-1 file in memory, with patient-like free text and a header extension when ``plant``."""
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    if plant:
        img.header["descrip"] = SECRET
        img.header["aux_file"] = b"MRN-0042"
        img.header["intent_name"] = b"Jane"
        img.header["db_name"] = b"Doe"
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", SECRET))
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


def with_pixdim(data, index: int, value: float, *, gz: bool = True) -> bytes:
    """A NIfTI file of ``data`` whose ``pixdim[index]`` is patched to ``value`` in the raw header."""
    raw = bytearray(nifti_bytes(data, gz=False))
    struct.pack_into("<f", raw, 76 + 4 * index, value)
    return gzip.compress(bytes(raw)) if gz else bytes(raw)


def shifted(dx: float) -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, 3] += dx
    return affine


def _case() -> SimpleNamespace:
    """The synthetic case, encoded once: ``image``, ``label``, ``expected`` labels, and the files."""
    image, label = make_scan(), make_label()
    return SimpleNamespace(
        image=image,
        label=label,
        expected=predicted_labels(image),
        parts_gz={m: nifti_bytes(image[i]) for i, m in enumerate(MODALITIES)},
        parts_raw={m: nifti_bytes(image[i], gz=False) for i, m in enumerate(MODALITIES)},
        image4d=nifti_bytes(np.moveaxis(image, 0, -1)),
        label_gz=nifti_bytes(label, dtype=np.uint8),
    )


Case = _case()


def files(parts: dict[str, bytes | None] | None = None, *, label: bool = True, extra=(), image4d: bool = False):
    """The multipart ``files`` of an upload: the case's parts with ``parts`` replacing (``None``: dropping) some."""
    chosen: dict[str, bytes | None] = {"image": Case.image4d} if image4d else dict(Case.parts_gz)
    if label:
        chosen["label"] = Case.label_gz
    chosen.update(parts or {})
    out = [(name, (FILE_NAME, data, "application/octet-stream")) for name, data in chosen.items() if data is not None]
    out += [(name, (FILE_NAME, data, "application/octet-stream")) for name, data in extra]
    return out


def decode_mask(data: bytes) -> nib.Nifti1Image:
    assert data[:2] == b"\x1f\x8b", "the mask is not gzip-compressed"
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def assert_mask_geometry(img: nib.Nifti1Image, shape=SHAPE) -> np.ndarray:
    """The mask lies on the input's grid, is uint8 BraTS labels, and carries no free text or extension."""
    header = img.header
    assert img.shape == shape
    assert header.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(header.get_zooms(), ZOOMS, atol=1e-6)
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        assert header[field].tobytes().strip(b"\x00") == b"", field
    assert len(header.extensions) == 0
    mask = np.asarray(img.dataobj)
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 4}
    return mask


LEAKS = ("PATIENT", "Jane", "MRN", "/tmp", "spool", "segment-")
"""Never in a detail: the client's file name, the files' free text, a temporary path."""


def assert_problem(response: httpx.Response, status: int, *, says: str | None = None, leaks=LEAKS) -> dict:
    """An RFC 9457 problem with ``status``, whose detail echoes none of ``leaks``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert PROBLEM_KEYS <= set(body) and body["status"] == status and body["detail"]
    if says is not None:
        assert says in body["detail"]
    for leak in leaks:
        assert leak not in body["detail"]
    return body


def assert_serves(client: httpx.Client) -> None:
    """A valid request right after is answered correctly."""
    response = client.post("/segment", files=files())
    assert response.status_code == 200, response.text
    mask = np.asarray(decode_mask(base64.b64decode(response.json()["mask"])).dataobj)
    np.testing.assert_array_equal(mask, Case.expected)


def entries(folder: Path, wait_s: float = 3.0) -> list[Path]:
    """What is left in ``folder``, waiting up to ``wait_s`` for it to empty (clean-up of an abandoned upload)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = list(folder.iterdir())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


# --------------------------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def spool(tmp_path_factory) -> Path:
    """``BRATS_TMP_DIR`` of the module's server."""
    return tmp_path_factory.mktemp("spool")


@pytest.fixture(scope="module")
def service(server_factory, models_dir_2d, spool):
    """``unet``, ``resunet`` and the 2D ``unet2d``, small limits so that they can be tested."""
    return server_factory(
        models_dir_2d,
        settings={
            "tmp_dir": spool,
            "max_upload_bytes": MAX_UPLOAD_BYTES,
            "max_voxels": MAX_VOXELS,
            "idle_timeout_s": IDLE_TIMEOUT_S,
        },
    )


@pytest.fixture
def client(service):
    with service.client() as client:
        yield client


@pytest.fixture(autouse=True)
def spool_is_left_empty(request, spool):
    """After every test, successful or not, nothing of any upload is left in ``BRATS_TMP_DIR``."""
    yield
    if "service" in request.fixturenames:
        assert entries(spool) == []


@pytest.fixture(scope="module")
def sha256s(service) -> dict[str, str]:
    with service.client() as client:
        return {m["name"]: m["sha256"] for m in client.get("/models").json()["models"]}


# ------------------------------------------------------------------------------------------ successes
class TestSegment:
    def test_four_modalities_with_label(self, client, sha256s):
        response = client.post("/segment", files=files())
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert set(body) == SUMMARY_KEYS | {"mask"}
        assert body["model"] == "resunet"  # the default
        assert body["model_sha256"] == sha256s["resunet"][:12]
        assert body["provider"] == "CPUExecutionProvider"
        assert body["shape"] == list(SHAPE)
        assert body["spacing_mm"] == pytest.approx(ZOOMS, abs=1e-6)
        assert body["labels"] == {"0": "background", "1": "NCR/NET", "2": "ED", "4": "ET"}
        assert body["postprocessed"] is False  # these cards have no postprocessing rules
        assert set(body["timing_ms"]) == {"decode", "preprocess", "inference", "postprocess", "total"}
        assert all(v >= 0 for v in body["timing_ms"].values())
        assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"]

        img = decode_mask(base64.b64decode(body["mask"]))
        mask = assert_mask_geometry(img)
        np.testing.assert_array_equal(mask, Case.expected)
        assert SECRET not in base64.b64decode(body["mask"]) and b"PATIENT" not in response.content

        # Metrics and volumes: an independent computation on the returned mask and the label that was sent.
        zooms = img.header.get_zooms()
        reference = region_metrics(mask, Case.label, zooms)
        assert 0.2 < reference["dice"]["WT"] < 0.95 and reference["hd95_mm"]["WT"] > 0  # not a trivial case
        for region in ("WT", "TC", "ET"):
            assert body["dice"][region] == pytest.approx(reference["dice"][region], abs=1e-9)
            assert body["hd95_mm"][region] == pytest.approx(reference["hd95_mm"][region], abs=1e-6)
        volumes = volumes_ml(mask, zooms)
        assert body["volumes_ml"] == pytest.approx(volumes, rel=1e-6)
        assert body["volumes_ml"]["WT"] == pytest.approx(np.count_nonzero(Case.expected) * np.prod(ZOOMS) / 1000)

    def test_without_label_dice_and_hd95_are_null(self, client):
        body = client.post("/segment", files=files(label=False)).json()
        assert body["dice"] is None and body["hd95_mm"] is None
        assert body["volumes_ml"]["ET"] > 0

    def test_hd95_is_null_where_exactly_one_region_is_empty(self, client):
        label = make_label(with_et=False)
        body = client.post("/segment", files=files({"label": nifti_bytes(label, dtype=np.uint8)})).json()
        reference = region_metrics(Case.expected, label, ZOOMS)
        assert body["dice"]["ET"] == 0.0 and body["hd95_mm"]["ET"] is None
        assert body["hd95_mm"]["WT"] == pytest.approx(reference["hd95_mm"]["WT"], abs=1e-6)

    def test_one_4d_image_gives_the_same_mask(self, client):
        four = client.post("/segment", files=files())
        one = client.post("/segment", files=files(image4d=True))
        assert one.status_code == 200, one.text
        a, b = four.json(), one.json()
        assert base64.b64decode(a["mask"]) == base64.b64decode(b["mask"])
        assert a["dice"] == b["dice"] and a["hd95_mm"] == b["hd95_mm"] and a["shape"] == b["shape"]

    @pytest.mark.parametrize(
        "encoding", ["nii", "nii.gz", "gzip bytes named .nii", "plain bytes named .nii.gz", "mixed"]
    )
    def test_nii_and_nii_gz_recognised_from_the_bytes(self, client, encoding):
        gz = encoding in ("nii.gz", "gzip bytes named .nii")
        source = Case.parts_gz if gz else Case.parts_raw
        name = {"nii": "x.nii", "nii.gz": "x.nii.gz", "gzip bytes named .nii": "x.nii"}.get(encoding, "x.nii.gz")
        parts = dict(source)
        if encoding == "mixed":
            parts["t1"] = Case.parts_gz["t1"]
        upload = [(m, (name, data, "application/octet-stream")) for m, data in parts.items()]
        response = client.post("/segment", files=upload)
        assert response.status_code == 200, response.text
        mask = assert_mask_geometry(decode_mask(base64.b64decode(response.json()["mask"])))
        np.testing.assert_array_equal(mask, Case.expected)

    @pytest.mark.parametrize("model", ["unet", "resunet", "unet2d", "ensemble"])
    @pytest.mark.parametrize("tta", [False, True])
    def test_every_model_and_the_ensemble(self, client, sha256s, model, tta):
        response = client.post("/segment", params={"model": model, "tta": str(tta).lower()}, files=files())
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == model
        if model == "ensemble":
            assert body["model_sha256"] == "+".join(sha256s[name][:12] for name in sorted(sha256s))
        else:
            assert body["model_sha256"] == sha256s[model][:12]
        mask = assert_mask_geometry(decode_mask(base64.b64decode(body["mask"])))
        np.testing.assert_array_equal(mask, Case.expected)  # pointwise models: mirroring changes nothing

    def test_format_nifti(self, client):
        as_json = client.post("/segment", files=files()).json()
        response = client.post("/segment", params={"format": "nifti"}, files=files())
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/gzip"
        assert response.headers["content-disposition"] == 'attachment; filename="mask.nii.gz"'
        assert response.content == base64.b64decode(as_json["mask"])
        mask = assert_mask_geometry(decode_mask(response.content))
        np.testing.assert_array_equal(mask, Case.expected)
        raw = response.headers["x-segment-summary"]
        assert ": " not in raw and ", " not in raw and "\n" not in raw  # compact JSON
        summary = json.loads(raw)
        assert set(summary) == SUMMARY_KEYS
        for key in SUMMARY_KEYS - {"timing_ms"}:
            assert summary[key] == as_json[key], key

    def test_large_upload_streamed_in_chunks(self, client):
        """A body sent with chunked transfer encoding (no Content-Length) is streamed and counted too."""
        request = client.build_request("POST", "/segment", files=files())
        body = request.read()

        def chunks():
            for start in range(0, len(body), 8192):
                yield body[start : start + 8192]

        response = client.post("/segment", content=chunks(), headers={"content-type": request.headers["content-type"]})
        assert response.status_code == 200, response.text
        assert base64.b64decode(response.json()["mask"])

    def test_affines_within_tolerance_are_accepted(self, client):
        t1 = nifti_bytes(Case.image[1], affine=shifted(5e-4))
        assert client.post("/segment", files=files({"t1": t1})).status_code == 200

    def test_volume_of_one_voxel_per_axis_is_served(self, client):
        image = np.zeros((4, 1, 1, 1), dtype=np.float32)
        image[:, 0, 0, 0] = 5.0
        upload = [(m, (FILE_NAME, nifti_bytes(image[i]), "application/octet-stream")) for i, m in enumerate(MODALITIES)]
        response = client.post("/segment", files=upload)
        assert response.status_code == 200, response.text
        assert response.json()["shape"] == [1, 1, 1]


# ---------------------------------------------------------------------------------------------- errors
def _gz_bad_crc() -> bytes:
    data = bytearray(Case.parts_gz["t1"])
    data[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
    return bytes(data)


def _peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size (``VmHWM`` in ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def _bomb_inside_limit() -> bytes:
    """A header declaring a 40x44x36 uint8 volume followed by 64 MB of zeros: inflates far past its header."""
    raw = nifti_bytes(np.zeros(SHAPE), dtype=np.uint8, gz=False, plant=False)
    return gzip.compress(raw + bytes(64 << 20), compresslevel=9)


def _not_nifti_pair() -> bytes:
    raw = bytearray(nifti_bytes(Case.image[0], gz=False, plant=False))
    raw[344:348] = b"ni1\x00"
    return bytes(raw)


BAD_INPUTS = {
    # id: (parts to replace (None drops), extra parts, form, status, detail fragment)
    "not a NIfTI": ({"flair": b"hello, world! " * 40}, (), "4", 400, "part flair: not a NIfTI"),
    "a PNG": ({"t2": b"\x89PNG\r\n\x1a\n" + bytes(400)}, (), "4", 400, "part t2: not a NIfTI"),
    "an .hdr/.img pair": ({"flair": _not_nifti_pair()}, (), "4", 400, ".hdr/.img pair"),
    "truncated gzip": ({"t1": Case.parts_gz["t1"][:-100]}, (), "4", 400, "part t1: the gzip data is"),
    "gzip checksum": ({"t1": _gz_bad_crc()}, (), "4", 400, "checksum"),
    "truncated .nii": ({"t1ce": Case.parts_raw["t1ce"][:-1000]}, (), "4", 400, "part t1ce: the file is truncated"),
    "inflates past its header": ({"t2": _bomb_inside_limit()}, (), "4", 400, "part t2: the gzip data inflates"),
    "2D volume": ({"flair": nifti_bytes(np.ones(SHAPE[:2]))}, (), "4", 400, "part flair: expected a 3D volume"),
    "4D modality": ({"flair": nifti_bytes(np.ones((*SHAPE, 2)))}, (), "4", 400, "part flair: expected a 3D volume"),
    "3D image part": ({"image": Case.parts_gz["flair"]}, (), "image", 400, "part image: expected a 4D volume"),
    "image with 3 channels": (
        {"image": nifti_bytes(np.ones((*SHAPE, 3)))}, (), "image", 400, "part image: expected a 4D volume"
    ),
    "image with 5 channels": (
        {"image": nifti_bytes(np.ones((*SHAPE[:2], 20, 5)))}, (), "image", 400, "on the last axis, got shape"
    ),
    "zero voxel size": ({"t1": with_pixdim(Case.image[1], 1, 0.0)}, (), "4", 400, "part t1: voxel sizes"),
    "negative voxel size": ({"t1": with_pixdim(Case.image[1], 2, -1.0)}, (), "4", 400, "part t1: voxel sizes"),
    "NaN voxel size": ({"t1": with_pixdim(Case.image[1], 3, float("nan"))}, (), "4", 400, "part t1: voxel sizes"),
    "NaN voxels": ({"flair": nifti_bytes(np.where(Case.image[0] > 5, np.nan, 1))}, (), "4", 400, "not finite"),
    "infinite voxels": ({"t2": nifti_bytes(np.where(Case.image[3] > 5, np.inf, 1))}, (), "4", 400, "not finite"),
    "shapes differ": ({"t1": nifti_bytes(Case.image[1][:, :, :-1])}, (), "4", 400, "part t1: shape"),
    "affines differ": ({"t2": nifti_bytes(Case.image[3], affine=shifted(2e-3))}, (), "4", 400, "part t2: affine differs"),
    "label 3": ({"label": nifti_bytes(np.full(SHAPE, 3), dtype=np.uint8)}, (), "4", 400, "no label 3"),
    "label 5 with the 4D image": (
        {"label": nifti_bytes(np.full(SHAPE, 5), dtype=np.uint8)}, (), "image", 400, "part label: label values {5}"
    ),
    "fractional label": ({"label": nifti_bytes(np.full(SHAPE, 0.5))}, (), "4", 400, "part label: label values must"),
    "label shape": ({"label": nifti_bytes(Case.label[:-1], dtype=np.uint8)}, (), "4", 400, "part label: shape"),
    "label affine": (
        {"label": nifti_bytes(Case.label, dtype=np.uint8, affine=shifted(0.5))}, (), "image", 400,
        "part label: affine differs",
    ),
    "missing part": ({"t1ce": None}, (), "4", 400, "missing part t1ce"),
    "only a label": ({m: None for m in MODALITIES}, (), "4", 400, "no image parts"),
    "duplicated part": ({}, [("t1", Case.parts_gz["t1"])], "4", 400, "'t1' was sent more than once"),
    "unknown part": ({}, [("seg", Case.label_gz)], "4", 400, "unknown part 'seg'"),
    "both forms": ({}, [("image", Case.image4d)], "4", 400, "sent together with modality parts"),
    "empty part": ({"t2": b""}, (), "4", 400, "part 't2' is empty"),
    "voxels over the limit": ({"flair": nifti_bytes(np.ones((70, 70, 70)), dtype=np.uint8)}, (), "4", 413, "voxels"),
    "4D voxels over the limit": (
        {"image": nifti_bytes(np.ones((40, 44, 45, 4)), dtype=np.uint8)}, (), "image", 413, "voxels"
    ),
}
PART_RULE_CASES = {"missing part", "only a label", "duplicated part", "unknown part", "both forms", "empty part"}


class TestErrors:
    @pytest.mark.parametrize("case", list(BAD_INPUTS))
    def test_bad_input_is_refused_and_the_server_carries_on(self, client, case):
        replace, extra, form, status, says = BAD_INPUTS[case]
        response = client.post("/segment", files=files(replace, extra=extra, image4d=form == "image"))
        body = assert_problem(response, status, says=says)
        if case in PART_RULE_CASES:  # says what is expected
            assert "four parts named flair, t1, t1ce and t2" in body["detail"]
        assert_serves(client)

    def test_gzip_bomb_is_refused_from_its_header_quickly(self, client, service):
        """A few KB whose header claims 4096^3 voxels (128 GiB as int16): refused before inflating, quickly and
        without the server's peak memory moving."""
        assert_serves(client)  # the server's peak so far includes a normal request
        peak_before = _peak_rss_bytes(service.process.pid)

        def bomb(shape) -> bytes:
            header = nib.Nifti1Header()
            header.set_data_shape(shape)
            header.set_data_dtype(np.int16)
            header.set_zooms((1.0,) * len(shape))
            return gzip.compress(header.binaryblock + b"\x00" * 4 + bytes(8 << 20), compresslevel=9)

        for replace, form in (({"flair": bomb((4096,) * 3)}, "4"), ({"image": bomb((4096, 4096, 1024, 4))}, "image")):
            assert all(len(data) < 20_000 for data in replace.values())
            start = time.monotonic()
            response = client.post("/segment", files=files(replace, image4d=form == "image"))
            assert time.monotonic() - start < 5.0
            assert_problem(response, 413, says="voxels")
        assert _peak_rss_bytes(service.process.pid) - peak_before < 6 << 20  # inflating 8 MiB would pass it
        assert_serves(client)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"json": {"flair": "x"}},
            {"content": Case.parts_gz["flair"], "headers": {"content-type": "application/gzip"}},
            {"content": Case.parts_gz["flair"], "headers": {"content-type": "application/octet-stream"}},
            {"data": {"flair": "x"}},  # application/x-www-form-urlencoded
            {"content": b"flair"},  # no Content-Type at all
            {"content": b"--x\r\n", "headers": {"content-type": "multipart/mixed; boundary=x"}},
        ],
        ids=["json", "gzip", "octet-stream", "urlencoded", "none", "multipart-mixed"],
    )
    def test_not_multipart_form_data_is_415(self, client, kwargs):
        assert_problem(client.post("/segment", **kwargs), 415, says="multipart/form-data")
        assert_serves(client)

    def test_multipart_without_boundary_is_400(self, client):
        response = client.post("/segment", content=b"x", headers={"content-type": "multipart/form-data"})
        assert_problem(response, 400, says="boundary")
        assert_serves(client)

    def test_malformed_and_truncated_bodies_are_400(self, client):
        request = client.build_request("POST", "/segment", files=files())
        body, content_type = request.read(), request.headers["content-type"]
        response = client.post("/segment", content=body[: len(body) // 2], headers={"content-type": content_type})
        assert_problem(response, 400, says="closing boundary")
        response = client.post("/segment", content=b"garbage" * 100, headers={"content-type": content_type})
        assert_problem(response, 400)
        assert_serves(client)

    @pytest.mark.parametrize(
        ("params", "says"),
        [
            ({"model": "nnunet"}, "choose one of resunet, unet, unet2d, ensemble"),
            ({"model": ""}, "choose one of"),
            ({"format": "xml"}, "format"),
            ({"tta": "maybe"}, "tta"),
            ({"modle": "unet"}, "modle"),
        ],
        ids=["unknown model", "empty model", "format", "tta", "unknown parameter"],
    )
    def test_invalid_query_is_422(self, client, params, says):
        assert_problem(client.post("/segment", params=params, files=files()), 422, says=says)
        assert_serves(client)

    def test_upload_over_the_byte_limit_is_413_before_the_body_is_read(self, service, client):
        """Refused from Content-Length: the client gets the answer without sending the body."""
        host, port = service.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                + f"Content-Length: {MAX_UPLOAD_BYTES + 1}\r\n\r\n".encode()
            )
            reply = _read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 413")
        assert b"application/problem+json" in reply and b"connection: close" in reply.lower()
        assert_serves(client)

    def test_streamed_upload_over_the_byte_limit_is_413(self, client):
        """Without Content-Length (chunked), the bytes are counted as they arrive."""
        big = np.random.default_rng(0).integers(0, 255, MAX_UPLOAD_BYTES + 100_000, dtype=np.uint8).tobytes()
        upload = [("image", (FILE_NAME, big, "application/octet-stream"))]
        request = client.build_request("POST", "/segment", files=upload)
        body = request.read()

        def chunks():
            for start in range(0, len(body), 65536):
                yield body[start : start + 65536]

        response = client.post("/segment", content=chunks(), headers={"content-type": request.headers["content-type"]})
        assert_problem(response, 413, says=f"{MAX_UPLOAD_BYTES} bytes")
        assert_serves(client)

    def test_stalled_upload_is_cut_off_with_408(self, service, client):
        with _send_half_an_upload(service, client, timeout=30) as sock:
            start = time.monotonic()
            reply = _read_reply(sock)
            waited = time.monotonic() - start
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert IDLE_TIMEOUT_S * 0.8 < waited < IDLE_TIMEOUT_S + 10
        assert b"application/problem+json" in reply
        assert_serves(client)

    def test_client_that_disconnects_mid_upload_leaves_nothing(self, service, client, spool):
        with _send_half_an_upload(service, client, timeout=10):
            deadline = time.monotonic() + 10
            while not list(spool.iterdir()):  # the upload has begun: its folder exists
                assert time.monotonic() < deadline, "the server never started storing the upload"
                time.sleep(0.01)
        deadline = time.monotonic() + 10
        while entries(spool):  # the client is gone: the folder goes
            assert time.monotonic() < deadline, f"left behind: {entries(spool)}"
            time.sleep(0.01)
        assert_serves(client)
        time.sleep(0.1)
        assert re.search(r"POST /segment model=\S+ 499 ", service.logs())  # counted as gone, not as a bad request

    def test_logs_hold_no_file_names_header_text_or_tracebacks(self, service, client):
        assert_serves(client)
        logs = service.logs()
        assert "POST /segment" in logs
        for leak in ("PATIENT", "Jane", "MRN", "Traceback", " 500 "):
            assert leak not in logs


def _send_half_an_upload(service, client, *, timeout: float) -> socket.socket:
    """A raw connection that has sent the headers and half the body of a valid request (use it in ``with``)."""
    request = client.build_request("POST", "/segment", files=files())
    body = request.read()
    host, port = service.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.sendall(
        f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: {request.headers['content-type']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[: len(body) // 2]
    )
    return sock


def _read_reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection or 10 s pass."""
    sock.settimeout(15)
    reply = b""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not data:
            break
        reply += data
    return reply


# ------------------------------------------------------------------------------------------ the queue
def test_full_queue_is_503_with_retry_after(server_factory, models_dir, tmp_path):
    """One inference at a time, none waiting: while a slow one runs, another request gets 503."""
    spool = tmp_path / "spool"
    spool.mkdir()
    server = server_factory(models_dir, settings={"max_concurrent": 1, "max_queue": 0, "tmp_dir": spool})
    big_shape = (96, 96, 96)
    big = make_scan(big_shape)
    slow_upload = [(m, (FILE_NAME, nifti_bytes(big[i], plant=False), "application/octet-stream"))
                   for i, m in enumerate(MODALITIES)]
    outcome: dict[str, httpx.Response] = {}

    def slow():
        with server.client(timeout=300) as c:
            outcome["slow"] = c.post("/segment", params={"model": "unet", "tta": "true"}, files=slow_upload)

    thread = threading.Thread(target=slow)
    with server.client() as client:
        thread.start()
        deadline = time.monotonic() + 60
        while metric(client, "brats_inferences_running") != 1.0:
            assert time.monotonic() < deadline and thread.is_alive(), "the slow request never started"
            time.sleep(0.01)
        assert len(list(spool.iterdir())) == 1  # the slow request's upload folder, in BRATS_TMP_DIR
        response = client.post("/segment", files=files())
        thread_was_running = thread.is_alive()
        body = assert_problem(response, 503)
        assert int(response.headers["retry-after"]) >= 1
        assert "busy" in body["detail"] or "queue" in body["detail"]
        assert client.get("/healthz").status_code == 200
        thread.join(300)
        assert thread_was_running, "the slow request ended too soon for the test to mean anything"
        assert outcome["slow"].status_code == 200, outcome["slow"].text
        assert outcome["slow"].json()["shape"] == list(big_shape)
        assert_serves(client)
    assert entries(spool) == []


# ------------------------------------------------------------------------------ readiness and API keys
def test_not_ready_is_503(server_factory, empty_models_dir):
    server = server_factory(empty_models_dir)
    with server.client() as client:
        # The reason names the (operator's) models folder, as /readyz does; never an upload's name or text.
        body = assert_problem(client.post("/segment", files=files()), 503, leaks=("PATIENT", "Jane", "MRN"))
        assert "not ready" in body["detail"] and "no models loaded" in body["detail"]
        assert client.get("/healthz").status_code == 200


def test_api_key_is_checked_before_anything_else(server_factory, models_dir):
    server = server_factory(models_dir, settings={"api_keys": ["k-one", "k-two"]})
    with server.client() as client:
        for headers in ({}, {"X-API-Key": "wrong"}):
            # 401 wins over the invalid query (422) and the non-multipart body (415)
            response = client.post("/segment", params={"model": "nope"}, json={}, headers=headers)
            assert_problem(response, 401)
            assert response.headers["www-authenticate"] == "ApiKey"
        response = client.post("/segment", files=files(), headers={"X-API-Key": "k-two"})
        assert response.status_code == 200, response.text
