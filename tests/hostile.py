"""A corpus of hostile uploads for ``POST /segment``, each with the answer the service owes it.

:func:`hostile_cases` derives every case from one valid upload (the four modalities, optionally a label), so
the files stay as small as that upload (a few thousand voxels) and the whole corpus builds in a fraction of a
second. A case is either multipart parts ``(part name, file name, bytes)``, which :meth:`HostileCase.encode`
turns into a body, or a raw body with its own headers (malformed multipart, a lying ``Content-Length``).
:func:`send` delivers a case (:func:`post` any body) over a plain socket with a timeout, reading the reply even
when the server answers before the body is sent (as it does for a 413 from ``Content-Length``).

The expected statuses hold for a server whose limits are the defaults of SPEC section 2 (1 GiB per upload,
64 Mi voxels per volume) or anything between those and the size of the valid upload. The module needs only
numpy and nibabel, so a load script can import it outside the test suite::

    from tests.hostile import hostile_cases, send, synthetic_parts
    for case in hostile_cases(synthetic_parts()):
        reply = send(case, "http://127.0.0.1:8000")
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence
from urllib.parse import urlencode, urlsplit

import nibabel as nib
import numpy as np

__all__ = [
    "FILE_NAME",
    "MODALITIES",
    "HostileCase",
    "Reply",
    "hostile_cases",
    "multipart_body",
    "nifti_bytes",
    "patch_header",
    "post",
    "send",
    "synthetic_parts",
]

MODALITIES = ("flair", "t1", "t1ce", "t2")
FILE_NAME = "PATIENT_Jane_Doe_MRN-0042.nii.gz"
"""The client file name of every part: patient-like text that no reply may echo."""

BOUNDARY = "hostile-corpus-boundary-5f3a9c"
"""The multipart boundary of every encoded case."""
GIGABYTES = 8 * 2**30
"""What a lying ``Content-Length`` claims: far over the default upload limit of 1 GiB."""

Part = tuple[str, str, bytes]
"""One multipart file part: ``(part name, client file name, bytes)``."""


# ------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class HostileCase:
    """One bad request to ``POST /segment`` and the answer it must get.

    Attributes:
        name: A short unique id (usable as a pytest id).
        statuses: The acceptable statuses (all 4xx).
        parts: The multipart file parts, in order; used when ``body`` is ``None``.
        body: A raw request body, sent as it is with ``headers``.
        headers: Extra request headers (for a raw body, its ``Content-Type``); a ``Content-Length`` given here
            is sent instead of the body's real length.
        query: Query parameters.
        says: A fragment that the reply's ``detail`` must contain (empty: not checked).
    """

    name: str
    statuses: frozenset[int]
    parts: tuple[Part, ...] = ()
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    says: str = ""

    def __post_init__(self) -> None:
        if not self.statuses or not all(400 <= s < 500 for s in self.statuses):
            raise ValueError(f"case {self.name!r}: expected statuses must be 4xx, got {sorted(self.statuses)}")

    def encode(self) -> tuple[bytes, dict[str, str]]:
        """The request body and headers (``Content-Type`` included; ``Content-Length`` only when it lies)."""
        headers = dict(self.headers)
        if self.body is not None:
            return self.body, headers
        return multipart_body(self.parts), {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **headers}

    @property
    def target(self) -> str:
        """Path and query string of the request."""
        return "/segment" + (f"?{urlencode(self.query)}" if self.query else "")


def _case(name: str, status: int | Sequence[int], says: str = "", **kwargs: Any) -> HostileCase:
    statuses = frozenset([status] if isinstance(status, int) else status)
    return HostileCase(name=name, statuses=statuses, says=says, **kwargs)


def multipart_body(parts: Sequence[Part], *, boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A ``multipart/form-data`` body of file parts (closed by the final boundary unless ``close`` is false)."""
    out = bytearray()
    for name, filename, data in parts:
        out += (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode("latin-1")
        out += data + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode("latin-1")
    return bytes(out)


# --------------------------------------------------------------------------------------------- replies
@dataclass(frozen=True)
class Reply:
    """What the server answered: status, headers (lower-case names) and body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send ``data``; a server that answers and closes before reading it all is not an error here."""
    try:
        sock.sendall(data)
    except OSError:
        pass


def send(case: HostileCase, base_url: str, *, timeout: float = 5.0, headers: Mapping[str, str] | None = None) -> Reply:
    """Send ``case`` to the server at ``base_url`` and return its reply (see :func:`post`).

    Args:
        case: The request.
        base_url: ``http://host:port``.
        timeout: Longest wait for any single socket operation, in seconds.
        headers: More request headers (an ``X-API-Key``).
    """
    body, head = case.encode()
    return post(base_url, case.target, body, {**head, **(headers or {})}, timeout=timeout)


def post(base_url: str, target: str, body: bytes, headers: Mapping[str, str], *, timeout: float = 5.0) -> Reply:
    """``POST`` ``body`` as it is, with ``headers`` (``Content-Length`` added unless given), over a plain socket.

    The body is sent from a thread while the reply is read, so a server that answers early (413 from the
    headers, 400 at the first bad part) is heard whatever the body's size. Every socket operation waits at
    most ``timeout`` seconds: a server that hangs raises :class:`TimeoutError`.
    """
    head = dict(headers)
    if not any(k.lower() == "content-length" for k in head):
        head["Content-Length"] = str(len(body))
    url = urlsplit(base_url)
    request = f"POST {target} HTTP/1.1\r\nHost: {url.netloc}\r\nConnection: close\r\n"
    request += "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
    sender = threading.Thread(target=_send_quietly, args=(sock, request.encode("latin-1") + body), daemon=True)
    try:
        sender.start()
        response = http.client.HTTPResponse(sock)
        response.begin()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the sender if it is still blocked
        except OSError:
            pass
        sock.close()
        sender.join(timeout)


# ------------------------------------------------------------------------------------------------ files
def nifti_bytes(
    data: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    gz: bool = True,
    dtype: Any = None,
    version: int = 1,
) -> bytes:
    """A little-endian single-file NIfTI-1 (or NIfTI-2) in memory, qform and sform both ``affine``."""
    data = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    klass = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    img = klass(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    raw = img.to_bytes()
    if raw[:4] not in (struct.pack("<i", 348), struct.pack("<i", 540)):
        raise RuntimeError("expected a little-endian header")  # the patches below write little-endian values
    return gzip.compress(raw, mtime=0) if gz else raw


def _plain(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _header_class(raw: bytes) -> type[nib.Nifti1Header]:
    return nib.Nifti2Header if struct.unpack_from("<i", raw)[0] == 540 else nib.Nifti1Header


def patch_header(data: bytes, fields: Mapping[str | tuple[str, int], Any], *, gz: bool | None = None) -> bytes:
    """``data`` (a NIfTI file, gzip or not) with raw header fields overwritten, nothing else changed or fixed.

    Args:
        data: A little-endian NIfTI-1 or NIfTI-2 file.
        fields: Field name (``"vox_offset"``) or ``(name, index)`` for an element of an array field
            (``("dim", 1)``, ``("pixdim", 2)``) -> the value, stored with the field's own type.
        gz: Compress the result; default: as ``data`` was.
    """
    raw = bytearray(_plain(data))
    template = _header_class(bytes(raw)).template_dtype
    for key, value in fields.items():
        name, index = (key, 0) if isinstance(key, str) else key
        base, _ = template[name].subdtype or (template[name], ())
        offset = template.fields[name][1] + index * base.itemsize
        with np.errstate(over="ignore", invalid="ignore"):
            stored = np.array(value).astype(base) if base.kind in "iuf" else np.array(value, dtype=base)
        raw[offset : offset + base.itemsize] = stored.tobytes()
    gz = data[:2] == b"\x1f\x8b" if gz is None else gz
    return gzip.compress(bytes(raw), mtime=0) if gz else bytes(raw)


def _decode(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    raw = _plain(data)
    klass = nib.Nifti2Image if _header_class(raw) is nib.Nifti2Header else nib.Nifti1Image
    img = klass.from_bytes(raw)
    return np.asarray(img.dataobj), img.affine


def synthetic_parts(shape: tuple[int, int, int] = (12, 10, 9), *, label: bool = True) -> dict[str, bytes]:
    """A valid upload of ``shape`` (four ``.nii.gz`` modalities and a label): a bright box in a brain box."""
    image = np.zeros((4, *shape), dtype=np.float32)
    inner = tuple(slice(1, max(2, s - 1)) for s in shape)
    image[(slice(None), *inner)] = 1.0
    tumour = tuple(slice(s // 3, max(s // 3 + 1, 2 * s // 3)) for s in shape)
    image[(slice(None), *tumour)] = 10.0
    affine = np.diag([1.0, 1.5, 2.0, 1.0])
    parts = {m: nifti_bytes(image[i], affine) for i, m in enumerate(MODALITIES)}
    if label:
        truth = np.zeros(shape, dtype=np.uint8)
        truth[tumour] = 2
        parts["label"] = nifti_bytes(truth, affine, dtype=np.uint8)
    return parts


# ----------------------------------------------------------------------------------------------- corpus
def _gzip(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def _xor(data: bytes, index: int, mask: int = 0xFF) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


def _raw_deflate_corruption(raw: bytes) -> bytes:
    """A gzip file whose deflate stream is damaged in the middle (the CRC-32 and length left correct)."""
    packed = bytearray(_gzip(raw))
    middle = 10 + (len(packed) - 18) // 2
    for i in range(middle, middle + 8):
        packed[i] ^= 0x5A
    return bytes(packed)


def _claims_gigabytes(header_class: type[nib.Nifti1Header], shape: tuple[int, ...]) -> bytes:
    """A few KB of gzip whose header claims ``shape`` int16 voxels, its data stream cut short.

    Inflating it would fail (truncated stream), so a 413 proves the refusal came from the header alone.
    """
    header = header_class()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0,) * len(shape))
    header.set_xyzt_units(xyz="mm")
    header["vox_offset"] = header.sizeof_hdr + 4
    raw = header.binaryblock + b"\x00" * 4 + bytes(1 << 20)
    return _gzip(raw)[:-64]


def hostile_cases(valid_parts: Mapping[str, bytes]) -> list[HostileCase]:
    """The corpus: bad uploads derived from one valid upload, each with its expected 4xx.

    Args:
        valid_parts: Part name -> file bytes of a valid upload: ``flair``, ``t1``, ``t1ce``, ``t2`` (3D
            volumes of one shape and affine), optionally ``label``. A few thousand voxels keep it fast.

    Returns:
        The cases, with unique names.
    """
    missing = [m for m in MODALITIES if m not in valid_parts]
    if missing:
        raise ValueError(f"valid_parts needs the parts {', '.join(MODALITIES)}; missing {', '.join(missing)}")
    volumes = {m: _decode(valid_parts[m]) for m in MODALITIES}
    image = np.stack([volumes[m][0] for m in MODALITIES]).astype(np.float32)
    affine = volumes[MODALITIES[0]][1]
    shape = image.shape[1:]
    if "label" in valid_parts:
        label_bytes = valid_parts["label"]
    else:
        label_bytes = nifti_bytes(np.zeros(shape, dtype=np.uint8), affine, dtype=np.uint8)
    flair = image[0]
    flair_raw = nifti_bytes(flair, affine, gz=False)
    flair_gz = nifti_bytes(flair, affine)
    flair_v2 = nifti_bytes(flair, affine, gz=False, version=2)
    image4d = nifti_bytes(np.moveaxis(image, 0, -1), affine)

    def upload(replace: Mapping[str, bytes | None] | None = None, *, form: str = "4", label: bool = True,
               extra: Sequence[tuple[str, bytes]] = ()) -> tuple[Part, ...]:
        chosen: dict[str, bytes | None] = {"image": image4d} if form == "image" else {
            m: valid_parts[m] for m in MODALITIES
        }
        if label:
            chosen["label"] = label_bytes
        chosen.update(replace or {})
        parts = [(name, FILE_NAME, data) for name, data in chosen.items() if data is not None]
        return tuple(parts + [(name, FILE_NAME, data) for name, data in extra])

    def flair_case(name: str, data: bytes, status: int | Sequence[int] = 400, says: str = "part flair: "):
        return _case(name, status, says, parts=upload({"flair": data}))

    def moved(dx: float = 0.0, scale: float = 1.0) -> np.ndarray:
        out = affine.copy()
        out[0, 3] += dx
        out[:3, :3] *= scale
        return out

    nan, inf = float("nan"), float("inf")
    cases: list[HostileCase] = []
    add = cases.append

    # gzip: truncated, damaged, checksums
    add(flair_case("gzip truncated in the middle", flair_gz[: len(flair_gz) // 2], says="part flair: the gzip data"))
    add(flair_case("gzip without its trailer", flair_gz[:-8], says="truncated"))
    add(flair_case("gzip header only", flair_gz[:10]))
    add(flair_case("gzip with a wrong CRC-32", _xor(flair_gz, -8), says="checksum"))
    add(flair_case("gzip with a wrong length", _xor(flair_gz, -2, 0x01), says="checksum"))
    add(flair_case("gzip deflate stream damaged", _raw_deflate_corruption(flair_raw)))
    add(flair_case("gzip followed by garbage", flair_gz + b"not gzip at all", says="after the end of the gzip"))
    add(flair_case("gzip of garbage", _gzip(b"\x89PNG\r\n\x1a\n" + bytes(600)), says="not a NIfTI"))

    # magic and header size
    add(flair_case("NIfTI-1 magic wrong", patch_header(flair_gz, {"magic": b"n+9\x00"}), says="magic"))
    add(flair_case("NIfTI-2 magic wrong", patch_header(flair_v2, {"magic": b"n+3\x00"}), says="magic"))
    add(flair_case("hdr/img pair magic", patch_header(flair_gz, {"magic": b"ni1\x00"}), says=".hdr/.img pair"))
    add(flair_case("sizeof_hdr wrong", patch_header(flair_gz, {"sizeof_hdr": 349}), says="not a NIfTI"))
    add(flair_case("a PNG", b"\x89PNG\r\n\x1a\n" + bytes(400), says="not a NIfTI"))
    add(flair_case("three bytes", b"n+1", says="not a NIfTI"))
    add(flair_case("header cut short", flair_raw[:200], says="truncated"))
    add(flair_case("voxel data cut short", flair_raw[:-7], says="truncated"))

    # absurd dims (NIfTI-1 int16, NIfTI-2 int64)
    for version, data in ((1, flair_gz), (2, flair_v2)):
        add(flair_case(
            f"NIfTI-{version} negative dim", patch_header(data, {("dim", 2): -4}), says="at least one voxel"
        ))
        add(flair_case(f"NIfTI-{version} zero dim", patch_header(data, {("dim", 3): 0}), says="at least one voxel"))
        add(flair_case(f"NIfTI-{version} dim[0] zero", patch_header(data, {("dim", 0): 0}), says="dim[0]"))
        add(flair_case(f"NIfTI-{version} dim[0] eight", patch_header(data, {("dim", 0): 8}), says="dim[0]"))
        add(flair_case(f"NIfTI-{version} dim[0] negative", patch_header(data, {("dim", 0): -3}), says="dim[0]"))
    add(flair_case("NIfTI-1 huge dims", patch_header(flair_gz, {("dim", i): 32767 for i in (1, 2, 3)}), 413, "voxels"))
    add(flair_case("NIfTI-2 huge dim", patch_header(flair_v2, {("dim", 1): 2**40}), 413, "voxels"))
    add(flair_case(
        "NIfTI-2 dims whose product overflows int64", patch_header(flair_v2, {("dim", i): 2**62 for i in (1, 2, 3)}),
        413, "voxels",
    ))

    # voxel data types
    for code, what in ((9999, "unknown"), (0, "none"), (32, "complex64"), (128, "RGB24"), (2304, "RGBA32"),
                       (1, "binary"), (1792, "complex128")):
        add(flair_case(f"datatype {what}", patch_header(flair_gz, {"datatype": code}), says="data type"))
    add(flair_case("NIfTI-2 datatype unknown", patch_header(flair_v2, {"datatype": -7}), says="data type"))

    # vox_offset
    for value, what in ((-352.0, "negative"), (0.0, "zero"), (1e9, "past the end"), (nan, "NaN"), (inf, "inf"),
                        (349.0, "inside the header")):
        add(flair_case(f"vox_offset {what}", patch_header(flair_gz, {"vox_offset": value}), says="part flair: "))
    add(flair_case("NIfTI-2 vox_offset negative", patch_header(flair_v2, {"vox_offset": -1}), says="vox_offset"))
    add(flair_case("NIfTI-2 vox_offset huge", patch_header(flair_v2, {"vox_offset": 2**62}), says="vox_offset"))

    # voxel sizes and units
    for axis, value, what in ((1, 0.0, "zero"), (2, -1.5, "negative"), (3, nan, "NaN"), (1, inf, "inf"),
                              (2, -inf, "-inf")):
        add(flair_case(f"pixdim {what}", patch_header(flair_gz, {("pixdim", axis): value}), says="voxel sizes"))
        add(flair_case(
            f"NIfTI-2 pixdim {what}", patch_header(flair_v2, {("pixdim", axis): value}), says="voxel sizes"
        ))
    add(flair_case("units metres", patch_header(flair_gz, {"xyzt_units": 1}), says="millimetres"))
    add(flair_case("units code undefined", patch_header(flair_gz, {"xyzt_units": 4}), says="units code"))
    add(flair_case("units code undefined, time code too", patch_header(flair_gz, {"xyzt_units": 7 + 56}),
                   says="units code"))
    add(flair_case("NIfTI-2 units code undefined", patch_header(flair_v2, {"xyzt_units": 2**20 + 5}),
                   says="units code"))

    # orientation
    add(flair_case("sform holds NaN", patch_header(flair_gz, {("srow_x", 0): nan}), says="affine"))
    add(flair_case("quaternion not a rotation", patch_header(
        flair_gz, {"sform_code": 0, "quatern_b": 2.0, "quatern_c": 2.0}), says="part flair: "))

    # voxel values
    for value, what in ((nan, "NaN"), (inf, "inf"), (-inf, "-inf")):
        bad = flair.copy()
        bad[tuple(s // 2 for s in shape)] = value
        add(flair_case(f"voxels {what}", nifti_bytes(bad, affine), says="not finite"))
    add(flair_case("scaling overflows float32", patch_header(
        nifti_bytes(flair * 1000, affine, dtype=np.int16), {"scl_slope": 1e38}), says="not finite"))

    # number of dimensions
    add(flair_case("2D modality", nifti_bytes(flair[:, :, 0], affine), says="expected a 3D volume"))
    add(flair_case("4D modality", nifti_bytes(np.stack([flair, flair], -1), affine), says="expected a 3D volume"))
    add(flair_case("5D modality", nifti_bytes(flair[..., None, None].repeat(2, -1), affine), says="expected a 3D"))
    add(_case("3D image part", 400, "part image: expected a 4D volume",
              parts=upload({"image": valid_parts["flair"]}, form="image")))
    add(_case("5D image part", 400, "part image: expected a 4D volume",
              parts=upload({"image": nifti_bytes(np.moveaxis(image, 0, -1)[..., None].repeat(2, -1), affine)},
                           form="image")))
    add(_case("image with 3 channels", 400, "part image: expected a 4D volume",
              parts=upload({"image": nifti_bytes(np.moveaxis(image[:3], 0, -1), affine)}, form="image")))
    add(_case("2D image part", 400, "part image: expected a 4D volume",
              parts=upload({"image": nifti_bytes(image[0, :, :, 0], affine)}, form="image")))

    # shapes and affines between parts
    for axis in range(3):
        for delta in (-1, 1) if shape[axis] > 1 else (1,):
            other = np.pad(image[1], [(0, 1) if a == axis else (0, 0) for a in range(3)]) if delta > 0 else (
                image[1][tuple(slice(0, s - 1) if a == axis else slice(None) for a, s in enumerate(shape))]
            )
            add(_case(f"t1 shape {'+' if delta > 0 else '-'}1 on axis {axis}", 400, "part t1: shape",
                      parts=upload({"t1": nifti_bytes(other, affine)})))
    add(_case("t2 affine shifted", 400, "part t2: affine differs",
              parts=upload({"t2": nifti_bytes(image[3], moved(dx=0.01))})))
    add(_case("t1ce voxel size differs", 400, "part t1ce: affine differs",
              parts=upload({"t1ce": nifti_bytes(image[2], moved(scale=1.01))})))
    add(_case("label affine shifted", 400, "part label: affine differs",
              parts=upload({"label": nifti_bytes(_decode(label_bytes)[0], moved(dx=0.5), dtype=np.uint8)})))
    add(_case("label shape differs", 400, "part label: shape",
              parts=upload({"label": nifti_bytes(np.zeros((shape[0] + 1, *shape[1:])), affine, dtype=np.uint8)})))
    add(_case("image and label on different grids", 400, "part label: affine differs", parts=upload(
        {"label": nifti_bytes(_decode(label_bytes)[0], moved(dx=1.0), dtype=np.uint8)}, form="image")))

    # labels
    for value in (3, 255, 5):
        truth = _decode(label_bytes)[0].astype(np.uint8)
        truth[tuple(s // 2 for s in shape)] = value
        add(_case(f"label {value}", 400, "part label: ",
                  parts=upload({"label": nifti_bytes(truth, affine, dtype=np.uint8)})))
    add(_case("label negative", 400, "part label: ",
              parts=upload({"label": nifti_bytes(np.full(shape, -1), affine, dtype=np.int16)})))
    add(_case("label fractional", 400, "whole numbers",
              parts=upload({"label": nifti_bytes(np.full(shape, 0.5), affine)})))
    add(_case("label NaN", 400, "not finite", parts=upload({"label": nifti_bytes(np.full(shape, np.nan), affine)})))
    add(_case("label 4D", 400, "part label: expected a 3D",
              parts=upload({"label": nifti_bytes(np.zeros((*shape, 2)), affine, dtype=np.uint8)})))

    # parts
    add(_case("empty modality part", 400, "part 't2' is empty", parts=upload({"t2": b""})))
    add(_case("empty label part", 400, "part 'label' is empty", parts=upload({"label": b""})))
    add(_case("duplicated modality", 400, "more than once", parts=upload(extra=[("t1", valid_parts["t1"])])))
    add(_case("duplicated label", 400, "more than once", parts=upload(extra=[("label", label_bytes)])))
    add(_case("missing modality", 400, "missing part t1ce", parts=upload({"t1ce": None})))
    add(_case("label only", 400, "no image parts", parts=upload({m: None for m in MODALITIES})))
    add(_case("unknown part", 400, "unknown part", parts=upload(extra=[("seg", label_bytes)])))
    add(_case("both forms", 400, "together", parts=upload(extra=[("image", image4d)])))
    add(_case("thousands of parts", 400, "unknown part", parts=upload(
        extra=[(f"extra{i}", b"x") for i in range(3000)])))
    add(_case("thousands of duplicated parts", 400, "more than once", parts=upload(
        extra=[("label", b"x")] * 3000)))

    # volumes whose header claims gigabytes of voxels: refused before inflating
    add(_case("header claims 4096^3 voxels", 413, "voxels",
              parts=upload({"flair": _claims_gigabytes(nib.Nifti1Header, (4096, 4096, 4096))})))
    add(_case("4D header claims gigabytes", 413, "voxels",
              parts=upload({"image": _claims_gigabytes(nib.Nifti1Header, (2048, 2048, 1024, 4))}, form="image")))
    add(_case("label header claims gigabytes", 413, "voxels",
              parts=upload({"label": _claims_gigabytes(nib.Nifti2Header, (2**20, 2**20, 2**10))})))

    # the request itself
    body = multipart_body(upload())
    content_type = (("Content-Type", f"multipart/form-data; boundary={BOUNDARY}"),)
    add(_case("Content-Length claims gigabytes", 413, "limit",
              body=body[:1000], headers=(*content_type, ("Content-Length", str(GIGABYTES)))))
    add(_case("multipart body of garbage", 400, "multipart", body=b"garbage\r\n" * 200, headers=content_type))
    add(_case("multipart body cut short", 400, "closing boundary", body=body[: len(body) // 2], headers=content_type))
    add(_case("multipart without the final boundary", 400, "closing boundary",
              body=multipart_body(upload(), close=False), headers=content_type))
    add(_case("multipart part without a name", 400, "Content-Disposition", headers=content_type, body=(
        f"--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n".encode() + valid_parts["flair"]
        + f"\r\n--{BOUNDARY}--\r\n".encode())))
    add(_case("multipart part that is not form-data", 400, "Content-Disposition", headers=content_type, body=(
        f"--{BOUNDARY}\r\nContent-Disposition: attachment; name=\"flair\"\r\n\r\n".encode() + valid_parts["flair"]
        + f"\r\n--{BOUNDARY}--\r\n".encode())))
    add(_case("part name missing its closing quote", 400, "unknown part", headers=content_type, body=(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="flair; filename="{FILE_NAME}"\r\n\r\n'.encode()
        + valid_parts["flair"] + f"\r\n--{BOUNDARY}--\r\n".encode())))
    add(_case("multipart body with another boundary", 400, "", body=multipart_body(upload(), boundary="other"),
              headers=content_type))
    add(_case("multipart without a boundary", 400, "boundary", body=body,
              headers=(("Content-Type", "multipart/form-data"),)))
    add(_case("multipart boundary too long", 400, "boundary", body=body,
              headers=(("Content-Type", "multipart/form-data; boundary=" + "b" * 71),)))
    add(_case("empty body", 400, "", body=b"", headers=content_type))
    add(_case("not multipart: JSON", 415, "multipart/form-data", body=b'{"flair": "AAAA"}',
              headers=(("Content-Type", "application/json"),)))
    add(_case("not multipart: a bare .nii.gz", 415, "multipart/form-data", body=valid_parts["flair"],
              headers=(("Content-Type", "application/gzip"),)))
    add(_case("no Content-Type", 415, "multipart/form-data", body=body))
    add(_case("gzip Content-Encoding", 415, "Content-Encoding", body=zlib.compress(body),
              headers=(*content_type, ("Content-Encoding", "gzip"))))

    # query parameters
    add(_case("unknown model", 422, "choose one of", parts=upload(), query=(("model", "nnunet"),)))
    add(_case("unknown format", 422, "format", parts=upload(), query=(("format", "xml"),)))
    add(_case("unknown parameter", 422, "modle", parts=upload(), query=(("modle", "unet"),)))

    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise RuntimeError("the corpus has duplicate case names")
    return cases
