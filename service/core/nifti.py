"""NIfTI input: a volume's voxels and its geometry, checked before anything large is read.

Inputs are single-file NIfTI-1 or NIfTI-2 (``.nii`` or gzip-compressed ``.nii.gz``; gzip is recognised
from its magic bytes ``1f 8b``, whatever the file is called). Everything a user can get wrong raises
:class:`NiftiError`, whose ``reason`` says what to fix without the file name (the service must not echo
upload names) and whose ``str`` names the file as well. Output is :mod:`service.core.nifti_write`.
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import sys
from typing import Union

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from service.core.geometry import Geometry
from service.core.labels import VALID_LABELS, LabelError, check_labels

try:  # zlib-ng: the zlib API and format, about 1.7x faster inflating than zlib
    from zlib_ng import zlib_ng as zlib
except ImportError:  # pragma: no cover - a platform without zlib-ng wheels
    import zlib

__all__ = ["NiftiError", "VolumeTooLargeError", "read_header", "load_volume", "load_label"]

PathLike = Union[str, "os.PathLike[str]"]
NiftiHeader = Union[nib.Nifti1Header, nib.Nifti2Header]

GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC = b"n+1\x00"
_NIFTI1_PAIR_MAGIC = b"ni1\x00"
_NIFTI2_MAGIC = b"n+2\x00\r\n\x1a\n"
_NIFTI2_PAIR_MAGIC = b"ni2\x00\r\n\x1a\n"
_NIFTI1_SIZE = 348
_NIFTI2_SIZE = 540
_CHUNK = 16 << 20  # compressed bytes read at a time: a whole BraTS .nii.gz (2-4 MB) inflates in one call, one buffer
_TRAILING_SLACK = 1 << 20  # bytes a file may hold past its declared voxel data


class NiftiError(ValueError):
    """A file is not a usable NIfTI volume.

    Attributes:
        reason: What is wrong and what was expected, without the file name (safe to show to a user).
        path: The file concerned, or ``None``.
    """

    def __init__(self, reason: str, *, path: PathLike | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        super().__init__(reason if path is None else f"{self.path}: {reason}")


class VolumeTooLargeError(NiftiError):
    """A volume's header declares more voxels than allowed (how a gzip bomb is refused before inflating)."""


def _is_gzip(fileobj: io.BufferedIOBase) -> bool:
    head = fileobj.read(2)
    fileobj.seek(0)
    return head == GZIP_MAGIC


def _zlib_reason(err: zlib.error) -> str:
    text = str(err)
    if "incorrect data check" in text or "incorrect length check" in text:
        return "the gzip data is corrupt (checksum mismatch); the file was damaged in transfer or on disk"
    return f"the gzip data is corrupt ({text.split(': ', 1)[-1]})"


def _inflate(fileobj: io.BufferedIOBase, limit: int, *, path: PathLike, whole: bool) -> bytes:
    """Inflate a gzip stream (all members, checksums verified) into at most ``limit`` bytes.

    With ``whole=False`` it stops as soon as ``limit`` bytes are out (checksums are then not reached); with
    ``whole=True`` more than ``limit`` bytes is an error, and so is a stream that ends early.
    """
    out: list[bytes] = []
    size = 0
    decomp = zlib.decompressobj(wbits=31)  # gzip container: header, CRC-32 and length are checked
    pending = b""
    try:
        while True:
            if not pending:
                pending = fileobj.read(_CHUNK)
                if not pending:
                    break
            piece = decomp.decompress(pending, limit + 1 - size)
            out.append(piece)
            size += len(piece)
            if size > limit:
                if not whole:
                    break
                raise NiftiError(
                    f"the gzip data inflates to more than its NIfTI header declares (over {limit} bytes)",
                    path=path,
                )
            pending = decomp.unconsumed_tail
            if decomp.eof:
                rest = decomp.unused_data + pending
                if not rest:
                    rest = fileobj.read(_CHUNK)
                if not rest:
                    break
                if rest[:2] == GZIP_MAGIC:  # another gzip member follows
                    decomp = zlib.decompressobj(wbits=31)
                    pending = rest
                    continue
                if rest.strip(b"\x00") or fileobj.read(_CHUNK).strip(b"\x00"):
                    raise NiftiError("unexpected bytes after the end of the gzip data", path=path)
                break
    except zlib.error as err:
        raise NiftiError(_zlib_reason(err), path=path) from err
    data = b"".join(out)
    if not decomp.eof and (whole or size <= limit):  # the input ran out inside a gzip stream
        raise NiftiError("the gzip data is truncated (it ends before its end-of-stream marker)", path=path)
    return data if whole else data[:limit]


def _read_prefix(path: PathLike, nbytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            if _is_gzip(f):
                return _inflate(f, nbytes, path=path, whole=False)
            return f.read(nbytes)
    except OSError as err:
        raise NiftiError(f"cannot read the file ({err.strerror or err})", path=path) from err


def _parse_header(raw: bytes, path: PathLike) -> NiftiHeader:
    """Parse a single-file NIfTI-1/2 header from the first bytes of a file, without nibabel's fixes."""
    if len(raw) < 4:
        raise NiftiError("not a NIfTI file (it is empty or only a few bytes long)", path=path)
    little = int.from_bytes(raw[:4], "little")
    sizes = {little, int.from_bytes(raw[:4], "big")}
    if _NIFTI2_SIZE in sizes:
        klass, version, size = nib.Nifti2Header, "NIfTI-2", _NIFTI2_SIZE
        magic, expected_magic, pair_magic = raw[4:12], _NIFTI2_MAGIC, _NIFTI2_PAIR_MAGIC
    elif _NIFTI1_SIZE in sizes:
        klass, version, size = nib.Nifti1Header, "NIfTI-1", _NIFTI1_SIZE
        magic, expected_magic, pair_magic = raw[344:348], _NIFTI1_MAGIC, _NIFTI1_PAIR_MAGIC
    else:
        raise NiftiError("not a NIfTI file (no NIfTI-1 or NIfTI-2 header at its start)", path=path)
    if len(raw) < size:
        raise NiftiError(f"the file is truncated: it ends inside its {version} header", path=path)
    if magic == pair_magic:
        raise NiftiError(
            f"this is the header of a {version} .hdr/.img pair; send a single-file .nii or .nii.gz", path=path
        )
    if magic != expected_magic:
        raise NiftiError(f"not a NIfTI file (the {version} magic string is missing)", path=path)
    # The byte order is the one that makes sizeof_hdr right (nibabel would guess it from dim[0], which is
    # what a damaged header gets wrong, and then report every field byte-swapped).
    endianness = "<" if little == size else ">"
    try:
        return klass(raw[:size], endianness=endianness, check=False)
    except (HeaderDataError, ValueError) as err:
        raise NiftiError(f"the {version} header cannot be read ({err})", path=path) from err


def read_header(path: PathLike) -> NiftiHeader:
    """Read only the header of a ``.nii`` or ``.nii.gz`` file (inflating at most its first 540 bytes).

    Cheap whatever the file's size, so a service can refuse a volume from its declared shape before
    inflating it. The header is returned as stored (nibabel's silent fixes are not applied) and without
    its extensions.

    Raises:
        NiftiError: the file cannot be read or does not start with a single-file NIfTI-1/2 header.
    """
    return _parse_header(_read_prefix(path, _NIFTI2_SIZE), path)


def _declared_shape(header: NiftiHeader, path: PathLike) -> tuple[int, ...]:
    dim = np.asarray(header["dim"], dtype=np.int64)
    if not 1 <= dim[0] <= 7:
        raise NiftiError(f"the header's dim[0] is {int(dim[0])}; a NIfTI volume has 1 to 7 dimensions", path=path)
    shape = tuple(int(d) for d in dim[1 : dim[0] + 1])
    if min(shape) < 1:
        raise NiftiError(f"the header declares shape {shape}; every axis needs at least one voxel", path=path)
    return shape


def _check_header(
    header: NiftiHeader, path: PathLike, ndim: int | None, max_voxels: int | None
) -> tuple[tuple[int, ...], np.dtype]:
    """Validate what the header alone can tell; return the (possibly squeezed) shape and voxel dtype."""
    shape = _declared_shape(header, path)
    try:
        dtype = header.get_data_dtype()
    except (HeaderDataError, KeyError, ValueError) as err:
        raise NiftiError(f"unknown voxel data type code {int(header['datatype'])}", path=path) from err
    if dtype.kind not in "biuf" or dtype.itemsize == 0:
        code = int(header["datatype"])
        name = nib.nifti1.data_type_codes.label.get(code, str(dtype))
        raise NiftiError(
            f"unsupported voxel data type {name} (datatype code {code}); expected integer or real values",
            path=path,
        )
    wanted = shape
    if ndim is not None and len(shape) > ndim and all(s == 1 for s in shape[ndim:]):
        wanted = shape[:ndim]  # (X, Y, Z, 1) is a 3D volume
    if ndim is not None and len(wanted) != ndim:
        layout = "(X, Y, Z)" if ndim == 3 else "(X, Y, Z, C)" if ndim == 4 else f"{ndim} axes"
        raise NiftiError(f"expected a {ndim}D volume {layout}, got a {len(shape)}D volume of shape {shape}", path=path)
    if len(wanted) < 3:
        raise NiftiError(f"expected at least a 3D volume, got shape {shape}", path=path)
    zooms = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise NiftiError(
            f"voxel sizes (pixdim) {tuple(float(z) for z in zooms)} are invalid; "
            "each must be a finite positive number of mm",
            path=path,
        )
    unit = _spatial_unit(header, path)
    if unit not in ("mm", "unknown"):  # spacing, volumes and HD95 are in mm, as the output header says
        raise NiftiError(
            f"the header gives voxel sizes in {unit}s; only millimetres are supported: convert the volume to mm",
            path=path,
        )
    nvox = math.prod(shape)  # Python integers: a huge claimed shape must not wrap around
    if max_voxels is not None and nvox > max_voxels:
        raise VolumeTooLargeError(
            f"the header declares {nvox} voxels (shape {shape}), more than the limit of {max_voxels}", path=path
        )
    return wanted, dtype


_SPATIAL_UNITS = {0: "unknown", 1: "meter", 2: "mm", 3: "micron"}


def _spatial_unit(header: NiftiHeader, path: PathLike) -> str:
    """The unit of the voxel sizes (``"mm"``, ``"unknown"``, ...), from the spatial bits of ``xyzt_units``.

    The temporal bits are ignored: the time unit plays no part here, and nibabel raises a ``KeyError`` on
    codes it does not know.
    """
    code = int(header["xyzt_units"]) & 0x07
    if code not in _SPATIAL_UNITS:
        raise NiftiError(
            f"the header's spatial units code (xyzt_units & 7) is {code}, which NIfTI does not define; "
            "expected 2 (mm) or 0 (unknown)",
            path=path,
        )
    return _SPATIAL_UNITS[code]


def _read_image(
    path: PathLike, ndim: int | None, max_voxels: int | None
) -> tuple[np.ndarray, NiftiHeader, bool]:
    """Read and validate a volume; return its raw (scaled, unconverted) voxel array, nibabel header, and whether
    the header's ``scl_slope``/``scl_inter`` scaled the values (nibabel clears them in the returned header)."""
    if ndim is not None and ndim < 3:
        raise ValueError(f"ndim must be None or at least 3, got {ndim}")
    header = read_header(path)
    shape, dtype = _check_header(header, path, ndim, max_voxels)
    _geometry(_as_nibabel_loads(header), path)  # an impossible qform/sform is refused before any voxel is read
    offset = _data_offset(header, path)
    expected = offset + math.prod(_declared_shape(header, path)) * dtype.itemsize
    if expected + _TRAILING_SLACK >= sys.maxsize:  # Python integers: no wrap-around, but no read that large
        raise NiftiError(
            f"the header declares {expected} bytes of voxel data (shape {shape}, {dtype}), more than any file "
            "can hold; the header is damaged",
            path=path,
        )
    try:
        with open(path, "rb") as f:
            if _is_gzip(f):
                raw = _inflate(f, expected + _TRAILING_SLACK, path=path, whole=True)
            else:
                raw = f.read(_plain_read_size(f, expected + _TRAILING_SLACK))
    except OSError as err:
        raise NiftiError(f"cannot read the file ({err.strerror or err})", path=path) from err
    if len(raw) < expected:
        raise NiftiError(
            f"the file is truncated: its header declares {expected} bytes up to the end of the voxel data, "
            f"the file holds {len(raw)}",
            path=path,
        )
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    scaled = _is_scaled(header)
    try:
        if scaled:  # nibabel applies scl_slope and scl_inter
            img = klass.from_bytes(raw)
            del raw
            data, loaded = np.asanyarray(img.dataobj), img.header
        else:  # the voxels as they lie in the bytes: no copy (the header is parsed and checked as nibabel loads it)
            loaded = klass.header_class.from_fileobj(io.BytesIO(raw))
            data = _voxels(raw, loaded)
    except (ImageFileError, HeaderDataError, ValueError, TypeError, OSError, EOFError) as err:
        raise NiftiError(f"the NIfTI file cannot be decoded ({err})", path=path) from err
    if not np.all(np.isfinite(loaded.get_best_affine())):
        raise NiftiError("the header's affine (qform/sform) holds non-finite numbers", path=path)
    return data.reshape(shape), loaded, scaled


def _voxels(raw: bytes, header: NiftiHeader) -> np.ndarray:
    """The unscaled voxel array that ``header`` describes in ``raw`` (a read-only view, Fortran order)."""
    shape = header.get_data_shape()
    return np.frombuffer(
        raw, dtype=header.get_data_dtype(), count=math.prod(shape), offset=int(header.get_data_offset())
    ).reshape(shape, order="F")


_NIBABEL_FIXES = logging.getLogger(f"{__name__}.nibabel_fixes")
_NIBABEL_FIXES.addHandler(logging.NullHandler())
_NIBABEL_FIXES.propagate = False  # nibabel reports its fixes again, as usual, when it loads the image


def _as_nibabel_loads(header: NiftiHeader) -> NiftiHeader:
    """A copy of ``header`` with the fixes nibabel makes when it loads an image (``pixdim[0]`` of 0 taken as 1,
    undefined qform/sform codes as 0, ...), so that a check made before loading judges what will be loaded."""
    fixed = type(header)(header.binaryblock, endianness=header.endianness, check=False)
    fixed.check_fix(logger=_NIBABEL_FIXES, error_level=60)  # above every level nibabel reports: fix, never raise
    return fixed


def _plain_read_size(f: io.BufferedIOBase, wanted: int) -> int:
    """``wanted``, capped at the size of a regular file (a read allocates its whole size up front)."""
    info = os.fstat(f.fileno())
    return min(wanted, info.st_size) if stat.S_ISREG(info.st_mode) else wanted


def _data_offset(header: NiftiHeader, path: PathLike) -> int:
    """The header's ``vox_offset``, checked: finite, past the header itself, and not absurdly far."""
    offset = float(header["vox_offset"])
    minimum = header.sizeof_hdr + 4  # the header, then the 4-byte extension flag of a single .nii file
    if not math.isfinite(offset) or offset < minimum or offset > 2**31:
        raise NiftiError(
            f"the header's vox_offset {offset:g} is invalid; expected where the voxel data starts, at least "
            f"{minimum}",
            path=path,
        )
    return int(header.get_data_offset())


def _geometry(header: NiftiHeader, path: PathLike) -> Geometry:
    try:
        return Geometry.from_header(header)
    except (ValueError, OverflowError, HeaderDataError) as err:
        raise NiftiError(f"the header's orientation (qform/sform) is invalid ({err})", path=path) from err


def _is_scaled(header: NiftiHeader) -> bool:
    """Whether a header as stored makes nibabel scale the voxels by something other than the identity."""
    try:
        slope, inter = header.get_slope_inter()
    except (HeaderDataError, ValueError):  # a valid slope with a non-finite intercept
        return True
    return (slope is not None and slope != 1.0) or (inter is not None and inter != 0.0)


def _check_finite(data: np.ndarray, path: PathLike, *, what: str, scaled: bool) -> None:
    if data.dtype.kind == "f":
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            if scaled:
                raise NiftiError(
                    f"{bad} voxel values are not finite (NaN or infinity) once scaled by the header's scl_slope "
                    "and scl_inter; expected finite values: check the scaling or the voxel data",
                    path=path,
                )
            raise NiftiError(f"{bad} voxel values are not finite (NaN or infinity); expected finite {what}", path=path)


_SLAB = 32
"""Planes along the last axis converted at a time when the file's voxel order (Fortran) differs from the
output's (C): a slab of a full-size volume fits in the cache, which makes the transposing copy about 4x faster
than one copy of the whole volume."""


def _convert(out: np.ndarray, data: np.ndarray) -> None:
    """``out[...] = data`` (any dtype to ``out``'s), slab by slab along the last axis when the layouts differ."""
    if data.ndim < 2 or data.flags.c_contiguous == out.flags.c_contiguous:
        np.copyto(out, data, casting="unsafe")
        return
    for start in range(0, data.shape[-1], _SLAB):
        np.copyto(out[..., start : start + _SLAB], data[..., start : start + _SLAB], casting="unsafe")


def load_volume(
    path: PathLike, *, ndim: int | None = 3, max_voxels: int | None = None, out: np.ndarray | None = None
) -> tuple[np.ndarray, Geometry]:
    """Read a ``.nii`` or ``.nii.gz`` (NIfTI-1 or NIfTI-2) volume as float32.

    Args:
        path: The file; gzip is recognised from its first bytes, not its name.
        ndim: Number of axes expected (3 for ``(X, Y, Z)``, 4 for ``(X, Y, Z, C)``), trailing axes of size 1
            beyond it dropped; ``None`` accepts 3 or more axes.
        max_voxels: Refuse, from the header alone and before inflating, a volume declaring more voxels.
        out: A float32 array of the volume's shape to convert the voxels into (one pass, no new array), e.g.
            one channel of a multi-channel image; its contents are undefined if an error is raised.

    Returns:
        ``(data, geometry)``: float32 array with the file's axis order (``(X, Y, Z)`` or ``(X, Y, Z, C)``,
        scaled by ``scl_slope``/``scl_inter``), ``out`` when given, and the geometry of its first three axes.

    Raises:
        VolumeTooLargeError: more voxels than ``max_voxels``.
        NiftiError: not a NIfTI file, corrupt or truncated gzip (checksums included), truncated data, wrong
            number of axes, unsupported voxel type, zero/negative/non-finite voxel sizes, non-finite affine
            or voxel values.
        ValueError: ``out`` is not float32 or not of the volume's shape.
    """
    data, header, scaled = _read_image(path, ndim, max_voxels)
    if out is None:
        out = np.empty(data.shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != data.shape:
        raise ValueError(f"out must be float32 of shape {data.shape}, got {out.dtype} {out.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become inf, refused just below
        _convert(out, data)
    if data.dtype.kind == "f" or scaled:  # whole numbers that fit the header's type are always finite
        _check_finite(out, path, what="intensities", scaled=scaled)
    return out, _geometry(header, path)


def load_label(
    path: PathLike, *, valid: tuple[int, ...] = VALID_LABELS, max_voxels: int | None = None
) -> tuple[np.ndarray, Geometry]:
    """Read a 3D label volume as uint8, its values as stored (no remapping).

    Float files are accepted when every value is a whole number.

    Args:
        path: The file, as for :func:`load_volume`.
        valid: The values allowed; BraTS 2020 labels {0, 1, 2, 4} by default. An MSD Task01 label passes
            ``(0, 1, 2, 3)`` and maps the result with :func:`service.core.labels.msd_to_brats`.
        max_voxels: As for :func:`load_volume`.

    Raises:
        NiftiError: as :func:`load_volume`, and for values that are not whole numbers or not in ``valid``
            (with the default, label 3 included).
    """
    data, header, scaled = _read_image(path, 3, max_voxels)
    _check_finite(data, path, what="labels", scaled=scaled)
    if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
        raise NiftiError("label values must be whole numbers; the file holds fractional values", path=path)
    try:
        check_labels(data, valid)
    except LabelError as err:
        raise NiftiError(str(err), path=path) from err
    return data.astype(np.uint8), _geometry(header, path)
