"""Hostile uploads against a real server, and NIfTI files mutated byte by byte.

- The corpus of :mod:`tests.hostile` (broken gzip, absurd headers, wrong shapes, bad parts, lying headers) sent
  to a real ``python -m service``: each case gets its own 4xx problem, never a 5xx and never a hang, and the
  server still segments a valid request exactly afterwards with nothing left in its upload folder.
- Hypothesis mutations of small valid ``.nii`` and ``.nii.gz`` files (bytes flipped, header fields overwritten,
  truncated, bytes inserted or deleted): read in process, only :class:`NiftiError` may come out (or a valid
  volume); sent to the server, every answer is 200 or a 4xx problem.

With ``CI=true`` the Hypothesis examples are derandomized (the same on every run) and no example database is
used; elsewhere failing examples are kept in ``.hypothesis/`` and tried first next time.
"""

from __future__ import annotations

import base64
import gzip
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.core.labels import MODALITIES, VALID_LABELS
from service.core.nifti import NiftiError, VolumeTooLargeError, load_label, load_volume
from tests.hostile import (
    BOUNDARY,
    FILE_NAME,
    HostileCase,
    Reply,
    hostile_cases,
    multipart_body,
    nifti_bytes,
    post,
    send,
    synthetic_parts,
)
from tests.service.support import affine_for, expected_labels, tumour_scan
from tests.service.test_segment import entries

settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI", "").lower() == "true" else "dev")

PROBLEM_KEYS = {"type", "title", "status", "detail"}
TIMEOUT_S = 5.0
LEAKS = ("PATIENT", "Jane", "MRN", "segment-", "/tmp")
"""Never in a reply: the client's file name, a temporary path."""


# ------------------------------------------------------------------------------------------------ data
def _valid_parts() -> dict[str, bytes]:
    image = tumour_scan()
    parts = {m: nifti_bytes(image[i], affine_for()) for i, m in enumerate(MODALITIES)}
    parts["label"] = nifti_bytes(expected_labels(), affine_for(), dtype=np.uint8)
    return parts


VALID = _valid_parts()
CORPUS = hostile_cases(VALID)

def _corpus_params() -> list:
    return [pytest.param(case, id=case.name) for case in CORPUS]


def _files(parts: dict[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(name, (FILE_NAME, data, "application/octet-stream")) for name, data in parts.items()]


def assert_problem(reply: Reply | httpx.Response, statuses, says: str = "", *, leaks=LEAKS) -> dict:
    """An RFC 9457 problem with one of ``statuses`` whose detail holds ``says`` and echoes none of ``leaks``."""
    status = reply.status if isinstance(reply, Reply) else reply.status_code
    text = (reply.body if isinstance(reply, Reply) else reply.content).decode("utf-8", "replace")
    assert status in statuses, f"{status}: {text[:500]}"
    assert reply.headers["content-type"] == "application/problem+json", reply.headers
    body = reply.json()
    assert PROBLEM_KEYS <= set(body), body
    assert body["status"] == status and isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert says in body["detail"], body["detail"]
    for leak in leaks:
        assert leak not in text, f"the reply echoes {leak!r}: {text[:500]}"
    return body


def assert_segments_exactly(server) -> None:
    """A valid request gets exactly the mask the test models predict."""
    with server.client(timeout=30.0) as client:
        response = client.post("/segment", files=_files(VALID))
    assert response.status_code == 200, response.text
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(response.json()["mask"])))
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected_labels())


@pytest.fixture(scope="module")
def spool(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-spool")


@pytest.fixture(scope="module")
def hostile_server(server_factory, spool):
    """Default limits, its own upload folder, and a queue long enough for the concurrent corpus."""
    return server_factory(settings={"tmp_dir": spool, "max_queue": 32})


# ----------------------------------------------------------------------------------------------- corpus
class TestCorpus:
    def test_corpus_is_large_tiny_and_unique(self):
        assert len(CORPUS) >= 100
        assert len({case.name for case in CORPUS}) == len(CORPUS)
        assert all(len(case.encode()[0]) < 1_000_000 for case in CORPUS)

    def test_corpus_builds_in_well_under_a_second(self):
        start = time.perf_counter()
        hostile_cases(VALID)
        assert time.perf_counter() - start < 1.0

    def test_statuses_must_be_4xx(self):
        with pytest.raises(ValueError, match="must be 4xx"):
            HostileCase(name="bad", statuses=frozenset({500}))

    def test_builds_from_any_valid_upload(self):
        other = hostile_cases(synthetic_parts((9, 8, 7), label=False))
        assert [case.name for case in other] == [case.name for case in CORPUS]

    def test_needs_the_four_modalities(self):
        with pytest.raises(ValueError, match="missing t2"):
            hostile_cases({m: VALID[m] for m in MODALITIES[:3]})


class TestHostileUploads:
    @pytest.mark.parametrize("case", _corpus_params())
    def test_case_gets_its_problem(self, hostile_server, case):
        reply = send(case, hostile_server.url, timeout=TIMEOUT_S)
        assert_problem(reply, case.statuses, case.says)

    def test_server_is_intact_after_the_whole_corpus(self, hostile_server, spool):
        """The corpus again, four requests at a time, with valid requests among them: every bad one is a 4xx,
        the valid ones get the exact mask, and no upload is left on disk."""

        def one(case: HostileCase) -> tuple[str, int]:
            return case.name, send(case, hostile_server.url, timeout=TIMEOUT_S).status

        with ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(one, case) for case in CORPUS]
            for _ in range(3):
                assert_segments_exactly(hostile_server)
            answered = [future.result() for future in pending]
        wrong = [(name, status) for (name, status), case in zip(answered, CORPUS) if status not in case.statuses]
        assert wrong == []
        assert_segments_exactly(hostile_server)
        assert entries(spool) == []
        logs = hostile_server.logs()
        assert "Traceback" not in logs and "PATIENT" not in logs


# ----------------------------------------------------------------------------------------- mutations
SHAPE = (6, 5, 4)
AFFINE = np.array([[0.0, -1.2, 0.0, 30.0], [1.1, 0.0, 0.0, -12.5], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]])


def _big_endian(data: np.ndarray) -> bytes:
    header = nib.Nifti1Header(endianness=">")
    img = nib.Nifti1Image(data.astype(">f4"), AFFINE, header=header)
    img.header.set_xyzt_units(xyz="mm")
    return img.to_bytes()


def _scaled_int16(data: np.ndarray) -> bytes:
    img = nib.Nifti1Image(np.round(data).astype(np.int16), AFFINE)
    img.header.set_slope_inter(0.5, -3.0)
    img.header.set_xyzt_units(xyz="mm")
    return gzip.compress(img.to_bytes(), mtime=0)


_rng = np.random.default_rng(7)
_VOLUME = _rng.normal(100, 20, SHAPE).astype(np.float32)
_LABEL = _rng.choice(np.array(VALID_LABELS, dtype=np.uint8), SHAPE)
NIFTI1, NIFTI2, NIFTI1_BIG = ("NIfTI-1", "<"), ("NIfTI-2", "<"), ("NIfTI-1", ">")
BASES = {  # name -> (file bytes, (header version, byte order), number of axes)
    "float32.nii": (nifti_bytes(_VOLUME, AFFINE, gz=False), NIFTI1, 3),
    "float32.nii.gz": (nifti_bytes(_VOLUME, AFFINE), NIFTI1, 3),
    "nifti2.nii": (nifti_bytes(_VOLUME, AFFINE, gz=False, version=2), NIFTI2, 3),
    "nifti2.nii.gz": (nifti_bytes(_VOLUME, AFFINE, version=2), NIFTI2, 3),
    "big-endian.nii": (_big_endian(_VOLUME), NIFTI1_BIG, 3),
    "int16-scaled.nii.gz": (_scaled_int16(_VOLUME), NIFTI1, 3),
    "label.nii.gz": (nifti_bytes(_LABEL, AFFINE, dtype=np.uint8), NIFTI1, 3),
    "label.nii": (nifti_bytes(_LABEL, AFFINE, gz=False, dtype=np.uint8), NIFTI1, 3),
    "4d.nii.gz": (nifti_bytes(np.stack([_VOLUME] * 4, -1), AFFINE), NIFTI1, 4),
}


def _header_fields(header_class, byte_order: str) -> list[tuple[int, np.dtype]]:
    """``(offset, dtype)`` of every scalar in a header (array fields element by element), in ``byte_order``."""
    template = header_class.template_dtype
    out = []
    for name in template.names:
        base, shape = template[name].subdtype or (template[name], ())
        count = int(np.prod(shape)) if base.kind in "iuf" else 1
        base = base.newbyteorder(byte_order) if base.kind in "iuf" else template[name]
        out += [(template.fields[name][1] + i * base.itemsize, base) for i in range(count)]
    return out


FIELDS = {
    (version, order): _header_fields(nib.Nifti2Header if version == "NIfTI-2" else nib.Nifti1Header, order)
    for version, order in (NIFTI1, NIFTI2, NIFTI1_BIG)
}


def _field_values(dtype: np.dtype) -> st.SearchStrategy[bytes]:
    """Bytes for one header field: telling values (0, -1, extremes, NaN, inf, small codes) or any value."""
    if dtype.kind == "f":
        width = dtype.itemsize * 8
        values = st.floats(width=width) | st.sampled_from([0.0, -1.0, 1e30, -1e30, 1e-40, 352.0, 540.0])
        return values.map(lambda v: np.array(v, dtype=dtype).tobytes())
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        telling = [0, 1, -1, 2, 3, 4, 7, 8, 16, 64, 128, 256, 348, 352, 540, 544, 1536, 2304, info.max, info.min]
        values = st.integers(int(info.min), int(info.max)) | st.sampled_from(
            [v for v in telling if info.min <= v <= info.max])
        return values.map(lambda v: np.array(v, dtype=dtype).tobytes())
    return st.binary(min_size=dtype.itemsize, max_size=dtype.itemsize)


@st.composite
def _mutation(draw, size: int, header: tuple[str, str]) -> tuple:
    kind = draw(st.sampled_from(["flip", "field", "field", "field", "truncate", "insert", "delete", "overwrite"]))
    at = draw(st.integers(0, max(0, size - 1)))
    if kind == "flip":
        return ("flip", at, draw(st.integers(1, 255)))
    if kind == "field":
        offset, dtype = draw(st.sampled_from(FIELDS[header]))
        return ("overwrite", offset, draw(_field_values(dtype)))
    if kind == "truncate":
        return ("truncate", at)
    if kind == "insert":
        return ("insert", at, draw(st.binary(min_size=1, max_size=64)))
    if kind == "delete":
        return ("delete", at, draw(st.integers(1, 64)))
    return ("overwrite", at, draw(st.binary(min_size=1, max_size=16)))


def _apply(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for mutation in mutations:
        kind, at = mutation[0], min(mutation[1], max(0, len(out) - 1))
        if kind == "flip" and out:
            out[at] ^= mutation[2]
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = mutation[2]
        elif kind == "delete":
            del out[at : at + mutation[2]]
        elif kind == "overwrite":
            out[mutation[1] : mutation[1] + len(mutation[2])] = mutation[2]
    return bytes(out)


@st.composite
def mutated_files(draw, bases=tuple(BASES)) -> tuple[str, bytes]:
    """A base file with 1 to 3 mutations, applied to its inflated bytes (then compressed again) or, for a
    ``.nii.gz``, either to those or to the compressed bytes."""
    name = draw(st.sampled_from(bases))
    data, header, _ = BASES[name]
    gzipped = data[:2] == b"\x1f\x8b"
    inner = gzip.decompress(data) if gzipped else data
    on_compressed = gzipped and draw(st.booleans())
    target = data if on_compressed else inner
    mutations = draw(st.lists(_mutation(len(target), header), min_size=1, max_size=3))
    out = _apply(target, mutations)
    if gzipped and not on_compressed:
        out = gzip.compress(out, mtime=0)
    return name, out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mutated")


def _check_refusal(err: NiftiError, path: Path) -> None:
    assert isinstance(err.reason, str) and err.reason
    assert str(path) not in err.reason and path.name not in err.reason
    event(f"refused: {' '.join(err.reason.split()[:4])}")


class TestMutatedFilesInProcess:
    @settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
    @given(case=mutated_files(), max_voxels=st.sampled_from([None, 10_000]))
    def test_load_volume_raises_only_nifti_errors(self, scratch, case, max_voxels):
        name, data = case
        path = scratch / "volume.nii.gz"
        path.write_bytes(data)
        ndim = BASES[name][2]
        try:
            volume, geometry = load_volume(path, ndim=ndim, max_voxels=max_voxels)
        except VolumeTooLargeError as err:
            _check_refusal(err, path)
            assert max_voxels is not None
            return
        except NiftiError as err:
            _check_refusal(err, path)
            return
        event("loaded")
        assert volume.dtype == np.float32 and volume.ndim == ndim and min(volume.shape) >= 1
        assert np.all(np.isfinite(volume))
        assert geometry.shape == volume.shape[:3]
        assert all(np.isfinite(z) and z > 0 for z in geometry.zooms)
        assert np.all(np.isfinite(geometry.affine))
        assert max_voxels is None or volume.size <= max_voxels

    @settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow])
    @given(case=mutated_files(bases=("label.nii.gz", "label.nii", "float32.nii", "int16-scaled.nii.gz")))
    def test_load_label_raises_only_nifti_errors(self, scratch, case):
        _, data = case
        path = scratch / "label.nii"
        path.write_bytes(data)
        try:
            label, geometry = load_label(path, max_voxels=10_000)
        except NiftiError as err:
            _check_refusal(err, path)
            return
        event("loaded")
        assert label.dtype == np.uint8 and label.ndim == 3 and geometry.shape == label.shape
        assert set(np.unique(label).tolist()) <= set(VALID_LABELS)


SERVED_PARTS = (*MODALITIES, "label")
VALID_RAW = {name: gzip.decompress(data) for name, data in VALID.items()}


@st.composite
def mutated_uploads(draw) -> dict[str, bytes]:
    """The valid upload with one part mutated (its ``.nii`` or ``.nii.gz`` form, inflated or compressed bytes)."""
    part = draw(st.sampled_from(SERVED_PARTS))
    gzipped = draw(st.booleans())
    on_compressed = gzipped and draw(st.booleans())
    target = VALID[part] if on_compressed else VALID_RAW[part]
    mutations = draw(st.lists(_mutation(len(target), NIFTI1), min_size=1, max_size=3))
    out = _apply(target, mutations)
    if gzipped and not on_compressed:
        out = gzip.compress(out, mtime=0)
    return {**VALID, part: out}


class TestMutatedUploadsThroughTheServer:
    def test_answers_are_200_or_a_problem_and_the_server_carries_on(self, hostile_server, spool):
        client = hostile_server.client(timeout=TIMEOUT_S * 2)

        @settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
        @given(parts=mutated_uploads())
        def check(parts):
            response = client.post("/segment", files=_files(parts))
            if response.status_code == 200:
                body = response.json()
                assert response.headers["content-type"] == "application/json"
                assert {"model", "shape", "mask", "volumes_ml", "dice", "hd95_mm"} <= set(body)
            else:
                assert_problem(response, {400, 413})

        with client:
            check()
        assert_segments_exactly(hostile_server)
        assert entries(spool) == []

    def test_mutated_multipart_bodies_are_200_or_a_problem(self, hostile_server, spool):
        """The whole body of a valid request mutated, multipart framing included (boundaries, part headers)."""
        body = multipart_body([(name, FILE_NAME, data) for name, data in VALID.items()])
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

        @settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow])
        @given(mutations=st.lists(_mutation(len(body), NIFTI1), min_size=1, max_size=4))
        def check(mutations):
            reply = post(hostile_server.url, "/segment", _apply(body, mutations), headers, timeout=TIMEOUT_S)
            if reply.status != 200:
                assert_problem(reply, {400, 413})

        check()
        assert_segments_exactly(hostile_server)
        assert entries(spool) == []
