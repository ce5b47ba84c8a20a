"""Tests for service.core.nifti: geometry round trips, header privacy, gzip detection, input errors."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from service.core.geometry import Geometry, grid_mismatch
from service.core.nifti import NiftiError, VolumeTooLargeError, load_label, load_volume, read_header
from service.core.nifti_write import mask_image, mask_to_bytes, save_image, save_mask

SHAPE = (6, 5, 4)
PLANTED = {"descrip": b"PATIENT John Doe", "aux_file": b"dob-1970", "intent_name": b"mrn123", "db_name": b"ward7"}
PLANTED_EXTENSION = b"Jane Roe, born 1970-01-01"


def oblique_affine() -> np.ndarray:
    """A rotated, anisotropic, left-handed affine whose entries are exact float32 numbers."""
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.9375, 1.25, 3.0])
    affine[:3, 3] = [90.5, -126.25, -72.0]
    return affine.astype(np.float32).astype(np.float64)


def make_image(
    data: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    qform_code: int = 1,
    sform_code: int = 1,
    klass: type = nib.Nifti1Image,
) -> nib.Nifti1Image:
    affine = oblique_affine() if affine is None else affine
    header = klass(data, affine).header
    header.set_qform(affine, code=qform_code)
    header.set_sform(affine, code=sform_code)
    # no affine beside the header: nibabel then writes the header exactly as set here (edits included)
    return klass(data, None, header=header)


def write(img: nib.Nifti1Image, path: Path, *, gzipped: bool | None = None) -> Path:
    """Write ``img`` to ``path``, gzip-compressed or not regardless of the name when ``gzipped`` is given."""
    raw = img.to_bytes()
    if gzipped is None:
        gzipped = path.name.endswith(".gz")
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    return path


def random_volume(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, size=shape).astype(np.float32)


def plain_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


class TestRoundTrip:
    @pytest.mark.parametrize("codes", [(1, 1), (1, 0), (0, 1), (0, 0), (2, 4)])
    @pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
    def test_mask_keeps_geometry_exactly(self, tmp_path, codes, suffix):
        qcode, scode = codes
        src = write(make_image(random_volume(), qform_code=qcode, sform_code=scode), tmp_path / f"in{suffix}")
        data, geometry = load_volume(src)
        mask = (data > 100).astype(np.uint8) * 2
        out = tmp_path / f"mask{suffix}"
        save_mask(mask, geometry, out)

        back, back_geometry = load_label(out)
        assert back_geometry == geometry  # exact: shape, affine, zooms, qform, sform, codes
        assert (back_geometry.qform_code, back_geometry.sform_code) == codes
        np.testing.assert_array_equal(back, mask)
        # and nibabel, reading it on its own, agrees with the input voxel for voxel
        original, written = nib.load(src), nib.load(out)
        np.testing.assert_array_equal(written.affine, original.affine)
        assert written.header.get_zooms() == original.header.get_zooms()
        assert written.header.get_data_dtype() == np.uint8
        assert written.shape == SHAPE

    def test_geometry_fields(self, tmp_path):
        affine = oblique_affine()
        _, geometry = load_volume(write(make_image(random_volume()), tmp_path / "a.nii"))
        assert geometry.shape == SHAPE
        np.testing.assert_allclose(geometry.affine, affine, atol=1e-5)
        np.testing.assert_allclose(geometry.zooms, (0.9375, 1.25, 3.0), rtol=1e-6)
        assert geometry.affine.dtype == np.float64 and geometry.affine.shape == (4, 4)
        assert not geometry.affine.flags.writeable

    def test_data_is_float32_and_exact(self, tmp_path):
        volume = random_volume()
        data, _ = load_volume(write(make_image(volume), tmp_path / "a.nii.gz"))
        assert data.dtype == np.float32
        np.testing.assert_array_equal(data, volume)

    def test_scaling_applied(self, tmp_path):
        img = make_image(np.arange(120, dtype=np.int16).reshape(SHAPE))
        img.header.set_slope_inter(2.0, 10.0)
        path = tmp_path / "scaled.nii"
        nib.save(img, path)
        data, _ = load_volume(path)
        np.testing.assert_allclose(data, np.arange(120).reshape(SHAPE) * 2.0 + 10.0)

    def test_nifti2_input(self, tmp_path):
        src = write(make_image(random_volume(), klass=nib.Nifti2Image), tmp_path / "two.nii.gz")
        assert nib.load(src).header.sizeof_hdr == 540
        data, geometry = load_volume(src)
        np.testing.assert_array_equal(data, random_volume())
        out = tmp_path / "mask.nii.gz"
        save_mask(np.ones(SHAPE, np.uint8), geometry, out)
        back = load_label(out)[1]  # written as NIfTI-1: float64 quaternion stored as float32
        assert back.shape == geometry.shape
        np.testing.assert_allclose(back.zooms, geometry.zooms, rtol=1e-6)
        assert (back.qform_code, back.sform_code) == (geometry.qform_code, geometry.sform_code)
        np.testing.assert_array_equal(back.sform, geometry.sform)
        np.testing.assert_allclose(back.qform, geometry.qform, rtol=0, atol=1e-5)

    @pytest.mark.parametrize("klass, size", [(nib.Nifti1Image, 348), (nib.Nifti2Image, 540)])
    def test_big_endian(self, tmp_path, klass, size):
        header = klass.header_class(endianness=">")
        header.set_data_dtype(np.float32)
        header.set_data_shape(SHAPE)
        header.set_zooms((2.0, 2.0, 2.0))
        header.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
        path = tmp_path / "be.nii.gz"
        write(klass(random_volume(), None, header=header), path)
        assert plain_bytes(path)[:4] == size.to_bytes(4, "big")
        data, geometry = load_volume(path)
        np.testing.assert_array_equal(data, random_volume())
        assert geometry.zooms == (2.0, 2.0, 2.0)

    def test_4d_volume_with_ndim_4(self, tmp_path):
        volume = random_volume(SHAPE + (4,))
        data, geometry = load_volume(write(make_image(volume), tmp_path / "img.nii.gz"), ndim=4)
        assert data.shape == SHAPE + (4,) and geometry.shape == SHAPE
        np.testing.assert_array_equal(data, volume)

    def test_trailing_singleton_axis_is_3d(self, tmp_path):
        data, _ = load_volume(write(make_image(random_volume(SHAPE + (1,))), tmp_path / "one.nii"))
        assert data.shape == SHAPE

    def test_save_image_channel_first(self, tmp_path):
        geometry = Geometry.from_affine(SHAPE, np.diag([1.0, 1.0, 2.5, 1.0]))
        image = np.stack([random_volume(seed=s) for s in range(4)])
        save_image(image, geometry, tmp_path / "img.nii.gz")
        data, back = load_volume(tmp_path / "img.nii.gz", ndim=4)
        np.testing.assert_array_equal(np.moveaxis(data, -1, 0), image)
        assert back == geometry and back.zooms == (1.0, 1.0, 2.5)

    def test_save_image_dtype(self, tmp_path):
        geometry = Geometry.from_affine(SHAPE, np.eye(4))
        save_image(np.full(SHAPE, 7.0), geometry, tmp_path / "i.nii", dtype=np.int16)
        assert nib.load(tmp_path / "i.nii").get_data_dtype() == np.int16
        np.testing.assert_array_equal(load_volume(tmp_path / "i.nii")[0], 7.0)

    def test_mask_to_bytes_matches_save_mask(self, tmp_path):
        _, geometry = load_volume(write(make_image(random_volume()), tmp_path / "a.nii"))
        mask = np.zeros(SHAPE, np.uint8)
        mask[1:3, 2, 1:] = 4
        payload = mask_to_bytes(mask, geometry)
        assert payload[:2] == b"\x1f\x8b"
        path = tmp_path / "bytes.nii.gz"
        path.write_bytes(payload)
        back, back_geometry = load_label(path)
        np.testing.assert_array_equal(back, mask)
        assert back_geometry == geometry
        assert mask_to_bytes(mask, geometry) == payload  # deterministic: no time stamp in the gzip header

    def test_save_mask_is_atomic_and_overwrites(self, tmp_path):
        geometry = Geometry.from_affine(SHAPE, np.eye(4))
        out = tmp_path / "m.nii.gz"
        save_mask(np.zeros(SHAPE, np.uint8), geometry, out)
        save_mask(np.full(SHAPE, 4, np.uint8), geometry, out)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nii.gz"]
        assert (load_label(out)[0] == 4).all()

    def test_save_mask_leaves_nothing_on_failure(self, tmp_path):
        geometry = Geometry.from_affine(SHAPE, np.eye(4))
        with pytest.raises(ValueError, match=r"spatial shape \(2, 2, 2\) but the geometry is \(6, 5, 4\)"):
            save_mask(np.zeros((2, 2, 2), np.uint8), geometry, tmp_path / "m.nii.gz")
        assert list(tmp_path.iterdir()) == []

    def test_mask_image_accepts_bool_and_whole_floats(self):
        geometry = Geometry.from_affine(SHAPE, np.eye(4))
        img = mask_image(np.ones(SHAPE, bool), geometry)
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), 1)
        assert np.asanyarray(mask_image(np.full(SHAPE, 4.0), geometry).dataobj).max() == 4

    @pytest.mark.parametrize("value, message", [(1.5, "whole numbers"), (-1, "0..255"), (300, "0..255")])
    def test_mask_image_rejects_values(self, value, message):
        geometry = Geometry.from_affine(SHAPE, np.eye(4))
        with pytest.raises(ValueError, match=message):
            mask_image(np.full(SHAPE, value), geometry)

    def test_mask_image_does_not_modify_input(self):
        geometry = Geometry.from_affine(SHAPE, np.eye(4))
        mask = np.full(SHAPE, 2.0)
        mask_image(mask, geometry)
        assert mask.dtype == np.float64 and (mask == 2.0).all()


class TestPrivacy:
    def planted_source(self, tmp_path) -> Path:
        img = make_image(random_volume())
        for field, value in PLANTED.items():
            img.header[field] = value
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", PLANTED_EXTENSION))
        path = write(img, tmp_path / "planted.nii.gz")
        back = nib.load(path)  # the planted text really is in the input
        assert back.header["descrip"].tobytes().startswith(PLANTED["descrip"])
        assert len(back.header.extensions) == 1
        return path

    def assert_clean(self, raw: bytes) -> None:
        for value in [*PLANTED.values(), PLANTED_EXTENSION]:
            assert value not in raw
        header = nib.Nifti1Image.from_bytes(raw).header
        for field in PLANTED:
            assert header[field].tobytes().strip(b"\x00") == b""
        assert len(header.extensions) == 0
        assert struct.unpack("<f", raw[108:112])[0] == 352.0  # vox_offset: nothing between header and voxels

    def test_save_mask_drops_free_text_and_extensions(self, tmp_path):
        _, geometry = load_volume(self.planted_source(tmp_path))
        save_mask(np.zeros(SHAPE, np.uint8), geometry, tmp_path / "out.nii.gz")
        self.assert_clean(plain_bytes(tmp_path / "out.nii.gz"))

    def test_mask_to_bytes_drops_free_text_and_extensions(self, tmp_path):
        _, geometry = load_volume(self.planted_source(tmp_path))
        payload = mask_to_bytes(np.zeros(SHAPE, np.uint8), geometry)
        assert payload[3] & 0x08 == 0  # gzip FNAME flag unset: no file name in the gzip header
        self.assert_clean(gzip.decompress(payload))

    def test_save_image_drops_free_text(self, tmp_path):
        _, geometry = load_volume(self.planted_source(tmp_path))
        save_image(random_volume(), geometry, tmp_path / "img.nii")
        self.assert_clean((tmp_path / "img.nii").read_bytes())


class TestGzipDetection:
    def test_gzip_named_nii(self, tmp_path):
        path = write(make_image(random_volume()), tmp_path / "really_gzip.nii", gzipped=True)
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        np.testing.assert_array_equal(load_volume(path)[0], random_volume())

    def test_plain_named_nii_gz(self, tmp_path):
        path = write(make_image(random_volume()), tmp_path / "really_plain.nii.gz", gzipped=False)
        assert path.read_bytes()[:2] != b"\x1f\x8b"
        np.testing.assert_array_equal(load_volume(path)[0], random_volume())

    def test_no_suffix_at_all(self, tmp_path):
        path = write(make_image(random_volume()), tmp_path / "upload", gzipped=True)
        np.testing.assert_array_equal(load_volume(path)[0], random_volume())

    def test_multi_member_gzip(self, tmp_path):
        raw = make_image(random_volume()).to_bytes()
        path = tmp_path / "multi.nii.gz"
        path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
        np.testing.assert_array_equal(load_volume(path)[0], random_volume())


class TestErrors:
    def gz(self, tmp_path) -> bytes:
        return write(make_image(random_volume()), tmp_path / "good.nii.gz").read_bytes()

    def check(self, path: Path, match: str, **kwargs) -> NiftiError:
        with pytest.raises(NiftiError, match=match) as err:
            load_volume(path, **kwargs)
        assert err.value.path == os.fspath(path) and os.fspath(path) in str(err.value)
        assert path.name not in err.value.reason  # the reason is safe to show without the (upload) name
        return err.value

    @pytest.mark.parametrize("offset", [float("nan"), float("inf"), 1e30, 100.0])
    def test_absurd_vox_offset(self, tmp_path, offset):
        raw = bytearray(make_image(random_volume()).to_bytes())
        raw[108:112] = struct.pack("<f", offset)  # vox_offset in a NIfTI-1 header
        (tmp_path / "o.nii").write_bytes(bytes(raw))
        self.check(tmp_path / "o.nii", "vox_offset .* is invalid")

    @pytest.mark.parametrize("unit", ["meter", "micron"])
    def test_voxel_sizes_not_in_mm(self, tmp_path, unit):
        img = make_image(random_volume())
        img.header.set_xyzt_units(xyz=unit)
        self.check(write(img, tmp_path / "u.nii"), f"voxel sizes in {unit}s; only millimetres")

    def test_unknown_units_are_taken_as_mm(self, tmp_path):
        img = make_image(random_volume())
        img.header.set_xyzt_units(xyz="unknown")
        assert load_volume(write(img, tmp_path / "u.nii"))[1].zooms == img.header.get_zooms()[:3]

    def test_invalid_quaternion(self, tmp_path):
        raw = bytearray(make_image(random_volume(), qform_code=1, sform_code=1).to_bytes())
        raw[256:260] = struct.pack("<f", 5.0)  # quatern_b: b*b + c*c + d*d > 1 cannot be a rotation
        (tmp_path / "q.nii").write_bytes(bytes(raw))
        self.check(tmp_path / "q.nii", "orientation .* is invalid")

    def test_huge_nifti2_shape_does_not_wrap_past_the_voxel_limit(self, tmp_path):
        header = nib.Nifti2Header()
        header.set_data_shape((2**32, 2**32, 1))
        header.set_data_dtype(np.uint8)
        (tmp_path / "h.nii").write_bytes(header.binaryblock + bytes(4 + 64))
        with pytest.raises(VolumeTooLargeError, match="more than the limit"):
            load_volume(tmp_path / "h.nii", max_voxels=64 * 2**20)

    def test_truncated_gzip(self, tmp_path):
        raw = self.gz(tmp_path)
        (tmp_path / "t.nii.gz").write_bytes(raw[: len(raw) // 2])
        self.check(tmp_path / "t.nii.gz", "gzip data is truncated")

    def test_truncated_gzip_trailer(self, tmp_path):
        raw = self.gz(tmp_path)
        (tmp_path / "t.nii.gz").write_bytes(raw[:-3])
        self.check(tmp_path / "t.nii.gz", "gzip data is truncated")

    def test_corrupted_crc(self, tmp_path):
        raw = bytearray(self.gz(tmp_path))
        raw[-8] ^= 0xFF  # first byte of the CRC-32 trailer; the deflate data is intact
        (tmp_path / "crc.nii.gz").write_bytes(bytes(raw))
        self.check(tmp_path / "crc.nii.gz", "corrupt.*checksum")

    def test_corrupted_length(self, tmp_path):
        raw = bytearray(self.gz(tmp_path))
        raw[-2] ^= 0x01  # ISIZE trailer
        (tmp_path / "len.nii.gz").write_bytes(bytes(raw))
        self.check(tmp_path / "len.nii.gz", "corrupt.*checksum")

    def test_corrupted_deflate_data(self, tmp_path):
        raw = bytearray(self.gz(tmp_path))
        raw[len(raw) // 2] ^= 0xFF
        (tmp_path / "bad.nii.gz").write_bytes(bytes(raw))
        self.check(tmp_path / "bad.nii.gz", "gzip data is corrupt")

    def test_trailing_garbage_after_gzip(self, tmp_path):
        (tmp_path / "g.nii.gz").write_bytes(self.gz(tmp_path) + b"not gzip")
        self.check(tmp_path / "g.nii.gz", "unexpected bytes after the end of the gzip data")

    def test_truncated_plain_data(self, tmp_path):
        raw = make_image(random_volume()).to_bytes()
        (tmp_path / "t.nii").write_bytes(raw[:-10])
        self.check(tmp_path / "t.nii", r"truncated: its header declares 832 bytes .* holds 822")

    def test_truncated_header(self, tmp_path):
        (tmp_path / "h.nii").write_bytes(make_image(random_volume()).to_bytes()[:200])
        self.check(tmp_path / "h.nii", "truncated: it ends inside its NIfTI-1 header")

    @pytest.mark.parametrize(
        "payload", [b"hello, this is not an image" * 40, b"", gzip.compress(b"plain text, gzipped" * 40)]
    )
    def test_not_a_nifti(self, tmp_path, payload):
        (tmp_path / "x.nii.gz").write_bytes(payload)
        self.check(tmp_path / "x.nii.gz", "not a NIfTI file")

    def test_missing_magic(self, tmp_path):
        raw = bytearray(make_image(random_volume()).to_bytes())
        raw[344:348] = b"\x00\x00\x00\x00"  # an Analyze 7.5 header
        (tmp_path / "a.nii").write_bytes(bytes(raw))
        self.check(tmp_path / "a.nii", "magic string is missing")

    def test_pair_header(self, tmp_path):
        img = nib.Nifti1Pair(random_volume(), np.eye(4))
        nib.save(img, tmp_path / "pair.hdr")
        self.check(tmp_path / "pair.hdr", r"\.hdr/\.img pair")

    def test_missing_file(self, tmp_path):
        self.check(tmp_path / "nope.nii", "cannot read the file")

    def test_2d_when_3d_expected(self, tmp_path):
        path = write(make_image(np.ones((6, 5), np.float32)), tmp_path / "flat.nii")
        self.check(path, r"expected a 3D volume \(X, Y, Z\), got a 2D volume of shape \(6, 5\)")

    def test_4d_when_3d_expected(self, tmp_path):
        path = write(make_image(random_volume(SHAPE + (4,))), tmp_path / "four.nii")
        self.check(path, r"expected a 3D volume \(X, Y, Z\), got a 4D volume of shape \(6, 5, 4, 4\)")

    def test_3d_when_4d_expected(self, tmp_path):
        path = write(make_image(random_volume()), tmp_path / "three.nii")
        self.check(path, r"expected a 4D volume \(X, Y, Z, C\)", ndim=4)

    @pytest.mark.parametrize("zoom", [0.0, -1.0, np.nan, np.inf])
    def test_bad_zooms(self, tmp_path, zoom):
        img = make_image(random_volume())
        img.header["pixdim"][2] = zoom  # nibabel would silently "fix" 0 and negative values on load
        path = write(img, tmp_path / "z.nii.gz")
        self.check(path, r"voxel sizes \(pixdim\) .* must be a finite positive number")

    @pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
    def test_non_finite_voxels(self, tmp_path, value):
        volume = random_volume()
        volume[1, 2, 3] = value
        volume[0, 0, 0] = value
        self.check(write(make_image(volume), tmp_path / "n.nii"), r"2 voxel values are not finite")

    def test_non_finite_affine(self, tmp_path):
        img = make_image(random_volume(), qform_code=0, sform_code=1)
        img.header["srow_x"][3] = np.nan
        self.check(write(img, tmp_path / "a.nii"), "affine .* non-finite")

    def test_complex_data(self, tmp_path):
        img = make_image(np.ones(SHAPE, np.complex64))
        self.check(write(img, tmp_path / "c.nii"), "unsupported voxel data type complex64")

    def test_header_lies_about_size(self, tmp_path):
        """A gzip stream inflating far beyond what the header declares is refused (bomb inside a small header)."""
        raw = make_image(np.zeros((4, 4, 4), np.uint8)).to_bytes() + bytes(3 << 20)
        (tmp_path / "lie.nii.gz").write_bytes(gzip.compress(raw))
        self.check(tmp_path / "lie.nii.gz", "inflates to more than its NIfTI header declares")

    def test_errors_are_value_errors(self):
        assert issubclass(NiftiError, ValueError) and issubclass(VolumeTooLargeError, NiftiError)


class TestHeaderOnly:
    def bomb(self, tmp_path) -> Path:
        """A gzip file whose header declares 2000^3 voxels; only its first megabyte of zeros is present."""
        header = nib.Nifti1Header()
        header.set_data_shape((2000, 2000, 2000))
        header.set_data_dtype(np.uint8)
        raw = header.binaryblock + b"\x00" * 4 + bytes(1 << 20)
        path = tmp_path / "bomb.nii.gz"
        path.write_bytes(gzip.compress(raw))
        return path

    def test_read_header_shape_without_inflating(self, tmp_path):
        header = read_header(self.bomb(tmp_path))
        assert header.get_data_shape() == (2000, 2000, 2000)
        assert header.get_data_dtype() == np.uint8

    def test_read_header_nifti2_and_plain(self, tmp_path):
        path = write(make_image(random_volume(), klass=nib.Nifti2Image), tmp_path / "two.nii")
        header = read_header(path)
        assert isinstance(header, nib.Nifti2Header) and header.get_data_shape() == SHAPE

    def test_read_header_not_nifti(self, tmp_path):
        (tmp_path / "x.nii").write_bytes(b"\x00" * 600)
        with pytest.raises(NiftiError, match="not a NIfTI file"):
            read_header(tmp_path / "x.nii")

    def test_max_voxels_refused_from_header(self, tmp_path):
        with pytest.raises(VolumeTooLargeError, match=r"declares 8000000000 voxels .* limit of 67108864"):
            load_volume(self.bomb(tmp_path), max_voxels=64 * 2**20)

    def test_max_voxels_allows_smaller(self, tmp_path):
        path = write(make_image(random_volume()), tmp_path / "ok.nii.gz")
        assert load_volume(path, max_voxels=120)[0].shape == SHAPE
        with pytest.raises(VolumeTooLargeError, match="declares 120 voxels"):
            load_volume(path, max_voxels=119)


class TestLoadLabel:
    def labels(self) -> np.ndarray:
        labels = np.zeros(SHAPE, np.uint8)
        labels[1:4, 1:3, 1:3] = 2
        labels[2, 2, 2] = 1
        labels[2, 1, 1] = 4
        return labels

    @pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
    def test_dtypes_accepted(self, tmp_path, dtype):
        path = write(make_image(self.labels().astype(dtype)), tmp_path / "seg.nii.gz")
        labels, geometry = load_label(path)
        assert labels.dtype == np.uint8 and geometry.shape == SHAPE
        np.testing.assert_array_equal(labels, self.labels())

    def test_label_3_rejected(self, tmp_path):
        labels = self.labels()
        labels[0, 0, 0] = 3
        with pytest.raises(NiftiError, match="BraTS 2020 has no label 3") as err:
            load_label(write(make_image(labels), tmp_path / "seg.nii"))
        assert "seg.nii" in str(err.value)

    def test_other_valid_set(self, tmp_path):
        msd = np.zeros(SHAPE, np.uint8)
        msd[1:4, 1:3, 1:3] = [1, 2]
        msd[2, 2, 2] = 3
        path = write(make_image(msd), tmp_path / "msd.nii.gz")
        labels, _ = load_label(path, valid=(0, 1, 2, 3))
        np.testing.assert_array_equal(labels, msd)  # returned as stored, not remapped
        with pytest.raises(NiftiError, match="BraTS 2020 has no label 3"):
            load_label(path)  # the default stays BraTS 2020

    def test_value_outside_other_valid_set_is_refused(self, tmp_path):
        labels = self.labels()  # holds 4, which MSD labels do not
        with pytest.raises(NiftiError, match=r"\{4\} are not allowed; expected only \{0, 1, 2, 3\}"):
            load_label(write(make_image(labels), tmp_path / "seg.nii"), valid=(0, 1, 2, 3))

    def test_unknown_labels_listed(self, tmp_path):
        labels = self.labels()
        labels[0, 0, :2] = [5, 9]
        with pytest.raises(NiftiError, match=r"\{5, 9\} are not allowed"):
            load_label(write(make_image(labels), tmp_path / "seg.nii"))

    def test_fractional_rejected(self, tmp_path):
        labels = self.labels().astype(np.float32)
        labels[0, 0, 0] = 0.5
        with pytest.raises(NiftiError, match="whole numbers"):
            load_label(write(make_image(labels), tmp_path / "seg.nii"))

    def test_nan_rejected(self, tmp_path):
        labels = self.labels().astype(np.float32)
        labels[0, 0, 0] = np.nan
        with pytest.raises(NiftiError, match="not finite"):
            load_label(write(make_image(labels), tmp_path / "seg.nii"))

    def test_4d_label_rejected(self, tmp_path):
        with pytest.raises(NiftiError, match="expected a 3D volume"):
            load_label(write(make_image(np.zeros(SHAPE + (2,), np.uint8)), tmp_path / "seg.nii"))


class TestGeometry:
    def test_allclose_tolerance(self):
        a = Geometry.from_affine(SHAPE, np.eye(4))
        shifted = np.eye(4)
        shifted[0, 3] = 0.0009
        assert a.allclose(Geometry.from_affine(SHAPE, shifted))
        shifted[0, 3] = 0.002
        assert not a.allclose(Geometry.from_affine(SHAPE, shifted))
        assert a.allclose(Geometry.from_affine(SHAPE, shifted), atol=0.01)
        assert not a.allclose(Geometry.from_affine((6, 5, 5), np.eye(4)))

    def test_equality_and_immutability(self):
        a = Geometry.from_affine(SHAPE, np.diag([1.0, 2.0, 3.0, 1.0]))
        assert a == Geometry.from_affine(SHAPE, np.diag([1.0, 2.0, 3.0, 1.0]))
        assert a != Geometry.from_affine(SHAPE, np.diag([1.0, 2.0, 3.0, 1.0]), qform_code=2)
        assert a.zooms == (1.0, 2.0, 3.0)
        with pytest.raises(AttributeError):
            a.shape = (1, 1, 1)  # type: ignore[misc]
        with pytest.raises(ValueError):
            a.affine[0, 0] = 5.0

    def test_invalid_construction(self):
        with pytest.raises(ValueError, match="3 positive sizes"):
            Geometry.from_affine((6, 5), np.eye(4))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="4x4 affine"):
            Geometry((1, 1, 1), np.eye(3), (1.0, 1.0, 1.0), np.eye(4), 1, np.eye(4), 1)


class TestGridMismatch:
    def test_same_grid_within_the_tolerance(self):
        ref = Geometry.from_affine((4, 5, 6), np.eye(4))
        nudged = np.eye(4)
        nudged[0, 3] = 9e-4
        assert grid_mismatch(Geometry.from_affine((4, 5, 6), nudged), ref) is None

    def test_shape_then_affine(self):
        ref = Geometry.from_affine((4, 5, 6), np.eye(4))
        assert grid_mismatch(Geometry.from_affine((4, 5, 7), np.eye(4)), ref) == "shape (4, 5, 7) differs from (4, 5, 6)"
        moved = np.eye(4)
        moved[1, 3] = 2e-3
        assert grid_mismatch(Geometry.from_affine((4, 5, 6), moved), ref) == (
            "affine differs by up to 0.002 (allowed 0.001 per element)"
        )


class TestDamagedHeaders:
    """Header damage found by mutating files byte by byte: each is a :class:`NiftiError` that says what is wrong."""

    def patched(self, tmp_path, offset: int, fmt: str, value, *, klass=nib.Nifti1Image, gz: bool = False) -> Path:
        raw = bytearray(make_image(random_volume(), klass=klass).to_bytes())
        struct.pack_into(fmt, raw, offset, value)
        path = tmp_path / ("p.nii.gz" if gz else "p.nii")
        path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
        return path

    def check(self, path: Path, match: str, **kwargs) -> NiftiError:
        with pytest.raises(NiftiError, match=match) as err:
            load_volume(path, **kwargs)
        assert path.name not in err.value.reason
        return err.value

    @pytest.mark.parametrize(("klass", "offset", "fmt"), [(nib.Nifti1Image, 123, "<B"), (nib.Nifti2Image, 500, "<i")])
    @pytest.mark.parametrize("units", [4, 5, 7, 7 + 56])
    def test_undefined_spatial_units_code(self, tmp_path, klass, offset, fmt, units):
        """nibabel raises KeyError on these codes; they were a crash, not an input error."""
        path = self.patched(tmp_path, offset, fmt, units, klass=klass)
        self.check(path, rf"spatial units code \(xyzt_units & 7\) is {units & 7}, which NIfTI does not define")

    @pytest.mark.parametrize("units", [2 + 56, 2 + 64, 0 + 128])
    def test_undefined_time_units_code_is_ignored(self, tmp_path, units):
        path = self.patched(tmp_path, 123, "<B", units)
        assert load_volume(path)[0].shape == SHAPE

    @pytest.mark.parametrize("gz", [False, True])
    def test_shape_larger_than_any_file_without_a_voxel_limit(self, tmp_path, gz):
        """A NIfTI-2 dim of 2**62 made an OverflowError (a read of that many bytes) when no limit was set."""
        path = self.patched(tmp_path, 24, "<q", 2**62, klass=nib.Nifti2Image, gz=gz)
        self.check(path, "more than any file can hold")

    def test_huge_plain_file_is_truncated_not_a_memory_error(self, tmp_path):
        """A plain file claiming 2**40 voxels was read with a buffer of that size (MemoryError)."""
        path = self.patched(tmp_path, 24, "<q", 2**40, klass=nib.Nifti2Image)
        self.check(path, "the file is truncated: its header declares")

    @pytest.mark.parametrize(("klass", "fmt"), [(nib.Nifti1Image, "<h"), (nib.Nifti2Image, "<q")])
    @pytest.mark.parametrize("dim0", [0, 8, -3])
    def test_bad_dim0_is_reported_as_stored(self, tmp_path, klass, fmt, dim0):
        """The byte order comes from sizeof_hdr: a bad dim[0] is not reported byte-swapped (8 as 2048)."""
        path = self.patched(tmp_path, 40 if klass is nib.Nifti1Image else 16, fmt, dim0, klass=klass)
        self.check(path, rf"dim\[0\] is {dim0};")

    def test_big_endian_bad_dim0(self, tmp_path):
        header = nib.Nifti1Header(endianness=">")
        header.set_data_shape(SHAPE)
        raw = bytearray(header.binaryblock + bytes(4) + bytes(4 * int(np.prod(SHAPE))))
        struct.pack_into(">h", raw, 40, 9)
        (tmp_path / "b.nii").write_bytes(bytes(raw))
        self.check(tmp_path / "b.nii", r"dim\[0\] is 9;")

    def test_gzip_that_ends_inside_the_header(self, tmp_path):
        packed = gzip.compress(make_image(random_volume()).to_bytes())
        (tmp_path / "t.nii.gz").write_bytes(packed[:60])
        self.check(tmp_path / "t.nii.gz", "the gzip data is truncated")

    @pytest.mark.parametrize("offset", [348.0, 349.0, 351.0])
    def test_vox_offset_inside_the_extension_flag(self, tmp_path, offset):
        self.check(self.patched(tmp_path, 108, "<f", offset), "vox_offset .* is invalid; .* at least 352")

    def test_impossible_orientation_is_refused_before_the_voxels(self, tmp_path):
        """sform unused, quaternion not a rotation, voxel data missing: the orientation is what is reported."""
        raw = bytearray(make_image(random_volume(), qform_code=1, sform_code=0).to_bytes())
        struct.pack_into("<fff", raw, 256, 2.0, 2.0, 0.0)
        (tmp_path / "q.nii").write_bytes(bytes(raw[:400]))
        self.check(tmp_path / "q.nii", r"orientation \(qform/sform\) is invalid")

    @pytest.mark.parametrize("qfac", [0.0, 3.0, float("nan")])
    def test_odd_qfac_is_taken_as_one_as_nibabel_does(self, tmp_path, qfac):
        """pixdim[0] of 0 is common in real files; the orientation check before loading must not refuse it."""
        path = self.patched(tmp_path, 76, "<f", qfac)
        assert load_volume(path)[1].shape == SHAPE

    @pytest.mark.parametrize(("code", "name"), [(128, "RGB"), (2304, "RGBA"), (0, "none"), (1, "binary")])
    def test_unsupported_data_type_is_named(self, tmp_path, code, name):
        path = self.patched(tmp_path, 70, "<h", code)
        self.check(path, rf"unsupported voxel data type {name} \(datatype code {code}\)")

    def test_non_finite_after_scaling_says_so(self, tmp_path):
        img = make_image(np.full(SHAPE, 1000, np.int16))
        img.header.set_slope_inter(1e38, 0.0)
        self.check(write(img, tmp_path / "s.nii"), "not finite .* once scaled by the header's scl_slope")

    def test_non_finite_label_says_labels(self, tmp_path):
        path = write(make_image(np.full(SHAPE, np.nan, np.float32)), tmp_path / "l.nii")
        with pytest.raises(NiftiError, match="expected finite labels"):
            load_label(path)
