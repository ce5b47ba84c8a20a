"""No patient data in the service's logs, even at DEBUG.

A real server logs at DEBUG while it receives requests that carry a unique marker in every place a client can
put patient data: the multipart file names and part content types, the NIfTI header text fields (``descrip``,
``aux_file``, ``intent_name``, ``db_name``) and a header extension, form part names, query values, the path,
``User-Agent`` and a hostile ``X-Request-ID``; in requests that succeed and in requests that fail (corrupt
gzip, bad label values, mismatched shapes, unknown parts, unknown model). None of the markers may appear in
the log, while the request ids, sizes and timings that the log is for must.
"""

from __future__ import annotations

import gzip
import re
import secrets
import time
from dataclasses import dataclass, field

import httpx
import nibabel as nib
import numpy as np
import pytest

from service.core.labels import MODALITIES
from tests.service.support import affine_for, expected_labels, tumour_scan

PREFIX = "zqphi"
"""Every marker starts with this (no hex digit in it, so no generated request id can contain it): finding
the prefix alone in the log catches a shortened leak too."""


@dataclass
class Planted:
    """The markers planted so far: marker -> where it was put."""

    places: dict[str, str] = field(default_factory=dict)

    def __call__(self, place: str, tag: str) -> str:
        marker = f"{PREFIX}{tag}{secrets.token_hex(3)}"  # 14 characters: fits intent_name (16 bytes)
        self.places[marker] = place
        return marker

    def leaks(self, text: str) -> list[str]:
        lowered = text.lower()
        return [f"{place} ({marker})" for marker, place in self.places.items() if marker.lower() in lowered]


def nifti_gz(data: np.ndarray, planted: Planted, request: str, *, dtype=np.float32) -> bytes:
    """``data`` as .nii.gz whose header text fields and one comment extension each carry a marker."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine_for())
    header = img.header
    header.set_qform(img.affine, code=1)
    header.set_sform(img.affine, code=1)
    for name, tag in (("descrip", "de"), ("aux_file", "ax"), ("intent_name", "in"), ("db_name", "db")):
        header[name] = planted(f"{request}: header {name}", tag).encode()
    text = f"patient {planted(f'{request}: header extension', 'ex')} born 1970-01-01".encode()
    header.extensions.append(nib.nifti1.Nifti1Extension(6, text))  # 6: a comment
    return gzip.compress(img.to_bytes(), mtime=0)


def case_files(planted: Planted, request: str, *, label: np.ndarray | None = None, replace=None) -> list:
    """The four modalities (and ``label``) with marked file names, part content types and headers."""
    image = tumour_scan()
    volumes = {m: image[i] for i, m in enumerate(MODALITIES)}
    parts = {m: nifti_gz(v, planted, request) for m, v in volumes.items()}
    if label is not None:
        parts["label"] = nifti_gz(label, planted, request, dtype=np.uint8)
    parts.update(replace or {})
    return [
        (
            name,
            (
                f"Doe_Jane_{planted(f'{request}: file name of part {name}', 'fn')}.nii.gz",
                data,
                f"application/x-{planted(f'{request}: content type of part {name}', 'ct')}",
            ),
        )
        for name, data in parts.items()
    ]


def corrupt_checksum(data: bytes) -> bytes:
    """The gzip stream with its CRC-32 trailer broken (every byte still there)."""
    return data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:]


@pytest.fixture(scope="module")
def debug_server(server_factory):
    return server_factory(settings={"log_level": "DEBUG"})


def test_no_marker_reaches_the_log(debug_server):
    planted = Planted()
    good_label = expected_labels()
    bad_label = good_label.copy()
    bad_label[0, 0, 0] = 3
    shape = tumour_scan().shape[1:]
    image4d = np.moveaxis(tumour_scan(), 0, -1)

    def headers(name: str, request_id: str | None = None) -> dict[str, str]:
        return {
            "User-Agent": f"scanner/{planted(f'{name}: User-Agent', 'ua')}",
            "X-Request-ID": request_id if request_id is not None else f"phi-{name}",
        }

    sent: list[tuple[str, httpx.Response]] = []
    with debug_server.client() as client:

        def post(name: str, expected: int, *, files, params=None, request_id: str | None = None):
            response = client.post("/segment", params=params, files=files, headers=headers(name, request_id))
            assert response.status_code == expected, f"{name}: {response.status_code} {response.text[:300]}"
            sent.append((name, response))

        post("ok-modalities", 200, files=case_files(planted, "ok-modalities", label=good_label),
             params={"tta": "false", "format": "json"})
        post("ok-image4d", 200, params={"format": "nifti"}, files=[(
            "image", (f"{planted('ok-image4d: file name', 'fn')}.nii.gz", nifti_gz(image4d, planted, "ok-image4d"),
                      "application/gzip"))])
        post("corrupt-gzip", 400, files=case_files(planted, "corrupt-gzip", replace={
            "flair": corrupt_checksum(nifti_gz(tumour_scan()[0], planted, "corrupt-gzip flair"))}))
        post("bad-label", 400, files=case_files(planted, "bad-label", label=bad_label))
        post("mismatched-shapes", 400, files=case_files(planted, "mismatched-shapes", replace={
            "t2": nifti_gz(np.zeros((shape[0] + 1, *shape[1:])), planted, "mismatched-shapes t2")}))
        unknown = planted("unknown-part: form part name", "pn")
        post("unknown-part", 400, files=case_files(planted, "unknown-part") + [
            (unknown, (f"{planted('unknown-part: file name', 'fn')}.nii.gz", b"\x1f\x8b", "application/gzip"))])
        post("unknown-model", 422, params={"model": planted("unknown-model: query value model", "qm")},
             files=case_files(planted, "unknown-model"))
        post("bad-format", 422, params={"format": planted("bad-format: query value format", "qf")},
             files=case_files(planted, "bad-format"))
        post("unknown-query", 422, params={"note": planted("unknown-query: query value", "qv")},
             files=case_files(planted, "unknown-query"))
        hostile = f"Doe^Jane {planted('hostile X-Request-ID (a failing request)', 'ri')} 1970-01-01"
        post("hostile-id-fail", 400, request_id=hostile, files=case_files(planted, "hostile-id-fail", label=bad_label))
        hostile = f"{planted('hostile X-Request-ID (a good request)', 'ri')}/../{'x' * 200}"
        post("hostile-id-ok", 200, request_id=hostile, files=case_files(planted, "hostile-id-ok"))
        missing = client.get(f"/patients/{planted('unknown-path: path', 'pa')}", headers=headers("unknown-path"))
        assert missing.status_code == 404
        sent.append(("unknown-path", missing))

    ids = {name: response.headers["x-request-id"] for name, response in sent}
    for name in ("hostile-id-fail", "hostile-id-ok"):
        assert re.fullmatch(r"[0-9a-f]{32}", ids[name]), f"{name}: the hostile id was not replaced"
    for name, rid in ids.items():
        if not name.startswith("hostile"):
            assert rid == f"phi-{name}"

    logs = wait_for_access_lines(debug_server, ids.values())
    assert not planted.leaks(logs), "patient data in the log: " + "; ".join(planted.leaks(logs))
    assert PREFIX not in logs.lower(), "part of a planted marker is in the log"
    assert "Doe_Jane" not in logs and "Doe^Jane" not in logs and "1970-01-01" not in logs

    # The log did record these requests, at DEBUG: ids, statuses, sizes and timings are there.
    for name, response in sent:
        lines = [line for line in logs.splitlines() if f"[{ids[name]}]" in line]
        access = [line for line in lines if " service.access " in line]
        assert len(access) == 1, f"{name}: {lines}"
        assert re.search(rf" {response.status_code} in=(\d+|-) out={len(response.content)} [\d.]+ ms$",
                         access[0]), access[0]
        if name.startswith("ok-"):
            assert re.search(r" in=\d+ ", access[0])
    ok = [line for line in logs.splitlines() if f"[{ids['ok-modalities']}]" in line]
    assert any(" DEBUG " in line and re.search(r"upload received: \d+ bytes", line) for line in ok), ok
    assert any("segmented with" in line and "timings" in line for line in ok), ok
    assert len(planted.places) > 100  # every place was marked in every request


def wait_for_access_lines(server, request_ids, timeout: float = 10.0) -> str:
    """The server's log once it holds the access line of every request (written after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = server.logs()
        if all(re.search(rf" service\.access \[{re.escape(rid)}\] ", logs) for rid in request_ids):
            return logs
        if time.monotonic() > deadline:
            return logs
        time.sleep(0.05)
