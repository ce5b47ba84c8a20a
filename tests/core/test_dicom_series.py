"""DICOM instances to volumes (service/core/dicom_series.py) and a study to a scan (service/core/dicom_scan.py).

Everything here is real DICOM: series written by the synthetic study writer (or edited datasets of it), read
back through :func:`read_instances` from files and zips. Geometry is checked through affines only: every voxel
of a volume read back must land, at the same world point, on a voxel of the original with the same value.
"""

from __future__ import annotations

import copy
import io
import os
import struct
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from service.core.dicom_scan import BRATS_AXES, load_dicom_scan, resample_to
from service.core.dicom_series import (
    DicomInputError,
    Series,
    group_series,
    read_instances,
    series_volume,
    sorted_instances,
)
from service.core.geometry import Geometry
from service.core.labels import MODALITIES
from service.core.series_rules import load_rules
from training.data.synthetic.dicom_study import SERIES_DESCRIPTIONS, StudyInfo, write_dicom_study, write_series

SHAPE = (10, 9, 7)
SPACING = (0.9, 1.1, 2.5)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
RULES = load_rules(None)
DESCRIPTION = "AX T1 POST GD"


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    u, v = [x for x in range(3) if x != axis]
    r = np.eye(3)
    r[u, u], r[u, v], r[v, u], r[v, v] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
    return r


def straight_affine(spacing=SPACING, origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def oblique_affine(spacing=SPACING) -> np.ndarray:
    """Rotated ~20 degrees about z and ~15 about x, anisotropic voxels, a non-zero origin."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(2, 20.0) @ _rotation(0, 15.0) @ np.diag(spacing)
    affine[:3, 3] = (-12.3, 45.6, 7.8)
    return affine


def pattern(shape=SHAPE, offset: int = 0) -> np.ndarray:
    """A distinct int16 value in every voxel, negative ones included."""
    return (np.arange(np.prod(shape)).reshape(shape) - 300 + offset).astype(np.int16)


def study_info(case_id: str = "SYN_1") -> StudyInfo:
    return StudyInfo.for_case(case_id)


def write(tmp: Path, volume=None, affine=None, name="s", **kwargs) -> list[Path]:
    volume = pattern() if volume is None else volume
    affine = straight_affine() if affine is None else affine
    return write_series(volume, affine, tmp / name, modality_name="t1ce", series_description=DESCRIPTION,
                        study=study_info(), series_number=3, **kwargs)


def one_series(datasets: list[Dataset]) -> Series:
    (series,) = group_series(datasets)
    return series


def read_back(files: list[Path]) -> tuple[np.ndarray, Geometry]:
    return series_volume(one_series(read_instances(files)))


def assert_same_voxels(volume: np.ndarray, affine: np.ndarray, read: np.ndarray, read_affine: np.ndarray) -> None:
    """Every voxel read back lies on a distinct voxel of the original, at the same world point, with its value."""
    assert read.size == volume.size
    index = np.indices(read.shape).reshape(3, -1)
    world = read_affine[:3, :3] @ index + read_affine[:3, 3:4]
    original = np.linalg.solve(affine[:3, :3], world - affine[:3, 3:4])
    nearest = np.rint(original).astype(int)
    assert np.abs(original - nearest).max() < 1e-4
    assert np.abs(affine[:3, :3] @ nearest + affine[:3, 3:4] - world).max() < 1e-4  # mm
    assert np.all(nearest >= 0) and np.all(nearest < np.array(volume.shape)[:, None])
    assert len(np.unique(np.ravel_multi_index(tuple(nearest), volume.shape))) == volume.size
    assert np.array_equal(read.reshape(-1), volume[tuple(nearest)].astype(np.float32))


def uids_of(datasets: list[Dataset]) -> set[str]:
    found = set()
    for ds in datasets:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if keyword in ds:
                found.add(str(ds[keyword].value))
    return found


def problem(call, *args, status: int = 400, **kwargs) -> DicomInputError:
    with pytest.raises(DicomInputError) as info:
        call(*args, **kwargs)
    assert info.value.status == status, info.value.reason
    assert str(info.value) == info.value.reason
    return info.value


def series_problem(datasets: list[Dataset], says: str) -> DicomInputError:
    """``series_volume`` refuses the series with a 400 naming it by description, never by a UID."""
    err = problem(series_volume, one_series(datasets))
    assert says in err.reason
    assert f"'{DESCRIPTION}' (series 3)" in err.reason
    assert not any(uid in err.reason for uid in uids_of(datasets))
    return err


def with_transfer_syntax(path: Path, syntax: str) -> bytes:
    """The file's bytes with its file meta claiming ``syntax``; the data set itself is left as it is."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) group length first
    end = 144 + struct.unpack("<I", raw[140:144])[0]
    meta = copy.deepcopy(pydicom.dcmread(path, stop_before_pixels=True).file_meta)
    meta.TransferSyntaxUID = syntax
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)
    return raw[:132] + fp.getvalue() + raw[end:]


def zip_bytes(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# ------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reversed"])
@pytest.mark.parametrize("slice_axis", [2, 0, 1], ids=["axial", "sagittal", "coronal"])
@pytest.mark.parametrize("oblique", [False, True], ids=["straight", "oblique"])
def test_series_volume_keeps_every_voxel_at_its_world_point(tmp_path, slice_axis, reverse, enhanced, oblique):
    volume = pattern()
    affine = oblique_affine() if oblique else straight_affine()
    files = write(tmp_path, volume, affine, slice_axis=slice_axis, reverse=reverse, enhanced=enhanced)
    read, geometry = read_back(files)
    assert read.dtype == np.float32 and read.flags.c_contiguous
    assert geometry.shape == read.shape
    assert np.allclose(geometry.zooms, np.array(SPACING)[[*(a for a in range(3) if a != slice_axis), slice_axis]])
    assert_same_voxels(volume, affine, read, geometry.affine)


def test_file_order_and_instance_numbers_are_not_trusted(tmp_path):
    volume, affine = pattern(), oblique_affine()
    datasets = read_instances(write(tmp_path, volume, affine))
    rng = np.random.default_rng(3)
    shuffled = [datasets[i] for i in rng.permutation(len(datasets))]
    for n, ds in enumerate(shuffled, start=1):
        ds.InstanceNumber = n
    read, geometry = series_volume(one_series(shuffled))
    assert_same_voxels(volume, affine, read, geometry.affine)


def test_nifti_geometry_is_ras_flipped_once(tmp_path):
    """An axial series of a RAS-diagonal affine reads back with that very affine (LPS turned to RAS once)."""
    affine = straight_affine()
    files = write(tmp_path, affine=affine)
    read, geometry = read_back(files)
    assert np.allclose(geometry.affine, affine, atol=1e-6)
    assert nib.aff2axcodes(geometry.affine) == ("R", "A", "S")
    assert np.array_equal(read, pattern().astype(np.float32))
    first = pydicom.dcmread(files[0])
    assert np.allclose(geometry.affine[:3, 3], LPS_TO_RAS[:3, :3] @ np.array(first.ImagePositionPatient, float))
    assert np.allclose(geometry.affine[:3, 3], (10.0, -20.0, 30.0))  # not (-10, 20, 30): not flipped twice
    assert geometry.qform_code == geometry.sform_code == 1


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    datasets = read_instances(write(tmp_path))
    for ds in datasets:
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-5"
    read, _ = series_volume(one_series(datasets))
    assert np.array_equal(read, pattern().astype(np.float32) * 2 - 5)


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_sorted_instances_follow_the_volume(tmp_path, enhanced):
    datasets = read_instances(write(tmp_path, reverse=True, enhanced=enhanced))
    series = one_series(datasets[::-1] if not enhanced else datasets)
    read, _ = series_volume(series)
    ordered = sorted_instances(series)
    if enhanced:
        assert len(ordered) == 1 and ordered[0] is datasets[0]
    else:
        assert np.array_equal(np.stack([ds.pixel_array.T for ds in ordered], axis=-1), read)


def test_group_series_in_order_of_first_appearance(tmp_path):
    a = read_instances(write(tmp_path, name="a"))
    b = read_instances(write_series(pattern(offset=7), straight_affine(), tmp_path / "b", modality_name="flair",
                                    series_description="  AX FLAIR ", study=study_info(), series_number=1))
    mixed = [b[0], *a[:3], *b[1:], *a[3:]]
    series = group_series(mixed)
    assert [s.description for s in series] == ["AX FLAIR", DESCRIPTION]
    assert [len(s.instances) for s in series] == [len(b), len(a)]
    assert [s.number for s in series] == [1, 3]
    assert {s.study_uid for s in series} == {a[0].StudyInstanceUID}
    assert series[1].label == f"'{DESCRIPTION}' (series 3)"
    assert series[0].modality == "MR" and series[0].protocol == "AX FLAIR"


# ------------------------------------------------------------------------------------------- series problems
def test_tilted_stack(tmp_path):
    datasets = read_instances(write(tmp_path))
    for ds in datasets:  # gantry tilt: each slice shifted along the rows in proportion to its depth
        position = np.array(ds.ImagePositionPatient, float)
        ds.ImagePositionPatient = list(position + np.array([0.0, 0.3, 0.0]) * position[2])
    series_problem(datasets, "tilted")


def test_float_noise_in_positions_is_not_tilt(tmp_path):
    datasets = read_instances(write(tmp_path))
    rng = np.random.default_rng(0)
    for ds in datasets:
        ds.ImagePositionPatient = list(np.array(ds.ImagePositionPatient, float) + rng.uniform(-2e-4, 2e-4, 3))
    read, _ = series_volume(one_series(datasets))
    assert np.array_equal(read, pattern().astype(np.float32))


def test_uneven_spacing(tmp_path):
    datasets = read_instances(write(tmp_path))
    del datasets[3]  # a missing slice: one gap twice the others
    series_problem(datasets, "unevenly spaced")


def test_slightly_moved_slice_is_uneven(tmp_path):
    datasets = read_instances(write(tmp_path))
    position = np.array(datasets[2].ImagePositionPatient, float)
    datasets[2].ImagePositionPatient = list(position + [0.0, 0.0, 0.5])
    series_problem(datasets, "unevenly spaced")


def test_two_instances_at_one_position(tmp_path):
    datasets = read_instances(write(tmp_path))
    series_problem([*datasets, copy.deepcopy(datasets[2])], "same position")


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_a_single_slice(tmp_path, enhanced):
    volume = pattern((6, 5, 1))
    datasets = read_instances(write(tmp_path, volume, enhanced=enhanced))
    series_problem(datasets, "1 slice")


def test_slices_differing_in_orientation(tmp_path):
    datasets = read_instances(write(tmp_path))
    datasets[4].ImageOrientationPatient = [1, 0, 0, 0, np.cos(0.2), np.sin(0.2)]
    series_problem(datasets, "differ in orientation")


def test_slices_differing_in_pixel_spacing(tmp_path):
    datasets = read_instances(write(tmp_path))
    datasets[1].PixelSpacing = [1.2, 0.9]
    series_problem(datasets, "pixel spacing")


def test_missing_position(tmp_path):
    datasets = read_instances(write(tmp_path))
    del datasets[2].ImagePositionPatient
    series_problem(datasets, "ImagePositionPatient is missing or invalid")


def test_pixel_data_in_a_syntax_it_is_not_in(tmp_path):
    """The file meta says JPEG 2000 Lossless over uncompressed pixels: refused, naming the transfer syntax."""
    files = write(tmp_path)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(with_transfer_syntax(files[2], JPEG2000Lossless))
    with pytest.warns(UserWarning):  # pydicom notes that the data has the size of uncompressed pixels
        datasets = read_instances([*files[:2], bad, *files[3:]])
        err = series_problem(datasets, "pixel data cannot be decoded")
    assert "JPEG 2000 Image Compression (Lossless Only)" in err.reason


def test_undecodable_jpeg2000_frames(tmp_path):
    datasets = read_instances(write(tmp_path))
    ds = datasets[0]
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    (tmp_path / "j2k.dcm").write_bytes(buffer.getvalue())
    datasets[0] = read_instances([tmp_path / "j2k.dcm"])[0]
    err = series_problem(datasets, "pixel data cannot be decoded")
    assert "JPEG 2000 Image Compression (Lossless Only)" in err.reason


def test_truncated_pixel_data(tmp_path):
    datasets = read_instances(write(tmp_path))
    datasets[3].PixelData = datasets[3].PixelData[:-20]
    err = series_problem(datasets, "pixel data cannot be decoded")
    assert "Explicit VR Little Endian" in err.reason


# ------------------------------------------------------------------------------------------- compressed input
def _compressed(tmp_path: Path, syntax: str, enhanced: bool) -> list[Path]:
    out = []
    for n, path in enumerate(write(tmp_path, affine=oblique_affine(), slice_axis=1, reverse=True, enhanced=enhanced)):
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        out.append(tmp_path / f"c{n}.dcm")
        ds.save_as(out[-1], enforce_file_format=True)
    return out


@pytest.mark.filterwarnings("ignore:The number of bytes of compressed pixel data matches:UserWarning")  # tiny frames
@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless], ids=["rle", "jpeg-ls"])
def test_lossless_compressed_series_read_the_same(tmp_path, syntax, enhanced):
    if syntax == JPEGLSLossless:
        pytest.importorskip("jpeg_ls")
    files = _compressed(tmp_path, syntax, enhanced)
    datasets = read_instances(files)
    assert {ds.file_meta.TransferSyntaxUID for ds in datasets} == {syntax}
    read, geometry = series_volume(one_series(datasets))
    assert_same_voxels(pattern(), oblique_affine(), read, geometry.affine)


# ------------------------------------------------------------------------------------------- reading parts
def test_a_dicom_file(tmp_path):
    files = write(tmp_path)
    (ds,) = read_instances(files[:1])
    assert ds.SOPInstanceUID == pydicom.dcmread(files[0]).SOPInstanceUID
    assert len(read_instances(files)) == SHAPE[2]


def test_a_zip_in_nested_folders_with_other_files(tmp_path):
    files = write(tmp_path)
    directory = Dataset()
    directory.SOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory: not an image, skipped
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, directory, implicit_vr=False, little_endian=True)
    members = {f"PATIENT/STUDY/SERIES {n % 2}/{p.name}": p.read_bytes() for n, p in enumerate(files)}
    members.update({"README.txt": b"exported by a viewer\n", "DICOMDIR": buffer.getvalue(),
                    "PATIENT/DICOMDIR": b"not dicom at all", "__MACOSX/PATIENT/._IM0001.dcm": b"\x00\x05\x16\x07junk"})
    (tmp_path / "study.zip").write_bytes(zip_bytes(members))
    datasets = read_instances([tmp_path / "study.zip"])
    assert len(datasets) == len(files)
    read, geometry = series_volume(one_series(datasets))
    assert_same_voxels(pattern(), straight_affine(), read, geometry.affine)


def test_files_and_zips_together(tmp_path):
    files = write(tmp_path)
    (tmp_path / "half.zip").write_bytes(zip_bytes({p.name: p.read_bytes() for p in files[3:]}))
    datasets = read_instances([*files[:3], tmp_path / "half.zip"])
    assert len(datasets) == len(files)
    read, _ = series_volume(one_series(datasets))
    assert np.array_equal(read, pattern().astype(np.float32))


@pytest.mark.parametrize("content", [b"just some text", b"", b"\x00" * 132 + b"DICM", b"PK\x05\x06" + b"\0" * 18])
def test_a_part_that_is_neither(tmp_path, content):
    files = write(tmp_path)
    (tmp_path / "x.bin").write_bytes(content)
    err = problem(read_instances, [files[0], tmp_path / "x.bin"])
    assert "dicom part 2 is neither a DICOM file nor a zip" in err.reason


def test_a_zip_without_dicom(tmp_path):
    (tmp_path / "x.zip").write_bytes(zip_bytes({"README": b"nothing here", "empty/": b""}))
    err = problem(read_instances, [tmp_path / "x.zip"])
    assert "no DICOM instance" in err.reason


@pytest.mark.parametrize("corrupt", ["garbage", "truncated"])
def test_a_corrupt_zip(tmp_path, corrupt):
    files = write(tmp_path)
    data = zip_bytes({p.name: p.read_bytes() for p in files})
    data = b"PK\x03\x04" + os.urandom(200) if corrupt == "garbage" else data[: len(data) // 2]
    (tmp_path / "x.zip").write_bytes(data)
    err = problem(read_instances, [files[0], tmp_path / "x.zip"])
    assert "dicom part 2: the zip cannot be read" in err.reason


def test_a_zip_with_more_members_than_allowed(tmp_path):
    files = write(tmp_path)
    (tmp_path / "x.zip").write_bytes(zip_bytes({f"{n}.dcm": p.read_bytes() for n, p in enumerate(files)}))
    err = problem(read_instances, [tmp_path / "x.zip"], max_instances=len(files) - 1, status=413)
    assert f"limit of {len(files) - 1} instances" in err.reason
    assert len(read_instances([tmp_path / "x.zip"], max_instances=len(files))) == len(files)
    # the files already read count against the limit of a later zip, and the limit named is the one set
    err = problem(read_instances, [files[0], tmp_path / "x.zip"], max_instances=len(files), status=413)
    assert f"a zip holds {len(files)} files after 1 instances in earlier parts" in err.reason
    assert f"limit of {len(files)} instances" in err.reason


def test_more_files_than_allowed(tmp_path):
    files = write(tmp_path)
    err = problem(read_instances, files, max_instances=len(files) - 1, status=413)
    assert "limit" in err.reason


def test_zips_inflating_past_the_byte_limit(tmp_path):
    files = write(tmp_path)
    size = sum(p.stat().st_size for p in files)
    for n, half in enumerate((files[:3], files[3:])):
        (tmp_path / f"{n}.zip").write_bytes(zip_bytes({p.name: p.read_bytes() for p in half}, zipfile.ZIP_STORED))
    zips = [tmp_path / "0.zip", tmp_path / "1.zip"]
    assert len(read_instances(zips, max_bytes=size)) == len(files)
    for zipped in zips:  # each alone is within the limit, both together are not
        assert read_instances([zipped], max_bytes=size - 1)
    err = problem(read_instances, zips, max_bytes=size - 1, status=413)
    assert f"limit of {size - 1} bytes" in err.reason


def test_a_zip_bomb_member(tmp_path):
    files = write(tmp_path)
    bomb = zip_bytes({"a.dcm": files[0].read_bytes(), "pad.bin": bytes(2 << 20)})
    assert len(bomb) * 200 < (2 << 20)
    (tmp_path / "bomb.zip").write_bytes(bomb)
    err = problem(read_instances, [tmp_path / "bomb.zip"], status=413)
    assert "zip bomb" in err.reason
    # highly compressible but under 1 MiB: only skipped as not DICOM
    (tmp_path / "ok.zip").write_bytes(zip_bytes({"a.dcm": files[0].read_bytes(), "pad.bin": bytes(512 << 10)}))
    assert len(read_instances([tmp_path / "ok.zip"])) == 1


def test_a_member_larger_than_it_declares(tmp_path):
    """A central directory that understates a member's size does not get more than the declared bytes in."""
    files = write(tmp_path)
    data = bytearray(zip_bytes({"a.dcm": files[0].read_bytes()}))
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 100)  # uncompressed size
    (tmp_path / "liar.zip").write_bytes(bytes(data))
    err = problem(read_instances, [tmp_path / "liar.zip"], status=400)  # the CRC of the first 100 bytes fails
    assert "the zip cannot be read" in err.reason


def test_zip_names_are_never_paths(tmp_path, monkeypatch):
    files = write(tmp_path / "src")
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    names = ["../../x.dcm", "/etc/y.dcm", "..\\..\\z.dcm", "ok/../../../w.dcm"]
    (work / "evil.zip").write_bytes(zip_bytes({n: p.read_bytes() for n, p in zip(names, files)}))
    monkeypatch.chdir(work)
    before = files_under(tmp_path)
    datasets = read_instances([Path("evil.zip")])
    assert len(datasets) == len(names)
    assert files_under(tmp_path) == before
    assert not Path("/etc/y.dcm").exists()


# ------------------------------------------------------------------------------------------- scans
def case(affine=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    affine = oblique_affine() if affine is None else affine
    return {m: (pattern(offset=1000 * i), affine) for i, m in enumerate(MODALITIES)}


def study_datasets(tmp: Path, volumes=None, **kwargs) -> list[Dataset]:
    written = write_dicom_study(case() if volumes is None else volumes, tmp, case_id="SYN_9", **kwargs)
    return read_instances([p for files in written.values() for p in files])


@pytest.fixture(scope="module")
def acquisitions(tmp_path_factory):
    """The same oblique case as an axial, a sagittal (reversed, enhanced) and a coronal study, each loaded."""
    tmp = tmp_path_factory.mktemp("planes")
    out = {}
    for name, kwargs in {"axial": {"slice_axis": 2}, "sagittal": {"slice_axis": 0, "reverse": True, "enhanced": True},
                         "coronal": {"slice_axis": 1}}.items():
        datasets = study_datasets(tmp / name, **kwargs)
        out[name] = (datasets, load_dicom_scan(datasets, RULES))
    return out


def test_every_plane_gives_the_same_scan(acquisitions):
    _, axial = acquisitions["axial"]
    assert nib.aff2axcodes(axial.scan.geometry.affine) == BRATS_AXES == ("L", "P", "S")
    assert axial.scan.image.shape == (4, *axial.scan.geometry.shape) and axial.scan.image.dtype == np.float32
    for name in ("sagittal", "coronal"):
        _, other = acquisitions[name]
        assert np.array_equal(other.scan.image, axial.scan.image), name
        assert other.scan.geometry.shape == axial.scan.geometry.shape
        assert np.allclose(other.scan.geometry.affine, axial.scan.geometry.affine, atol=1e-4), name
        assert not np.allclose(other.reference_geometry.affine, axial.reference_geometry.affine, atol=1e-4)


def test_scan_voxels_keep_their_world_points(acquisitions):
    volumes = case()
    for name, (_, loaded) in acquisitions.items():
        assert loaded.scan.image_part == "dicom"
        for c, modality in enumerate(MODALITIES):
            volume, affine = volumes[modality]
            assert_same_voxels(volume, affine, loaded.scan.image[c], loaded.scan.geometry.affine)
        assert loaded.used() == {m: SERIES_DESCRIPTIONS[m] for m in MODALITIES}


def test_to_reference_and_to_scan(acquisitions):
    rng = np.random.default_rng(1)
    t1ce = MODALITIES.index("t1ce")
    for name, (_, loaded) in acquisitions.items():
        x = rng.random(loaded.reference_geometry.shape).astype(np.float32)
        turned = loaded.to_scan(x)
        assert turned.shape == loaded.scan.geometry.shape and turned.flags.c_contiguous
        assert np.array_equal(loaded.to_reference(turned), x), name
        reference, geometry = series_volume(loaded.series["t1ce"])
        assert geometry.allclose(loaded.reference_geometry, atol=1e-9)
        assert np.array_equal(loaded.to_reference(loaded.scan.image[t1ce]), reference)
        assert np.array_equal(loaded.to_scan(reference), loaded.scan.image[t1ce])


def test_reference_instances_are_the_t1ce_series_in_slice_order(acquisitions):
    for name, (_, loaded) in acquisitions.items():
        reference, _ = series_volume(loaded.series["t1ce"])
        instances = loaded.reference_instances
        assert {ds.SeriesDescription for ds in instances} == {SERIES_DESCRIPTIONS["t1ce"]}
        if name == "sagittal":  # one enhanced object
            assert len(instances) == 1
        else:
            assert np.array_equal(np.stack([ds.pixel_array.T for ds in instances], axis=-1), reference)


def test_a_finer_series_is_resampled_onto_the_t1ce_grid(tmp_path):
    coarse = oblique_affine((2.0, 2.0, 2.0))
    fine = oblique_affine((1.0, 1.0, 1.0))  # same origin and axes: fine voxel 2p is coarse voxel p
    shape = (6, 5, 4)
    fine_shape = tuple(2 * s - 1 for s in shape)
    volumes = {m: (pattern(shape, 1000 * i), coarse) for i, m in enumerate(MODALITIES)}
    rng = np.random.default_rng(2)
    flair = rng.integers(-500, 2000, size=fine_shape).astype(np.int16)
    volumes["flair"] = (flair, fine)
    loaded = load_dicom_scan(study_datasets(tmp_path, volumes), RULES)
    assert loaded.reference_geometry.shape == shape
    on_reference = loaded.to_reference(loaded.scan.image[MODALITIES.index("flair")])
    assert np.allclose(on_reference, flair[::2, ::2, ::2], atol=1e-2)
    for c, modality in enumerate(MODALITIES):
        if modality != "flair":
            assert_same_voxels(volumes[modality][0], coarse, loaded.scan.image[c], loaded.scan.geometry.affine)


def test_resample_to():
    volume = np.random.default_rng(4).random((5, 6, 7)).astype(np.float32)
    geometry = Geometry.from_affine(volume.shape, oblique_affine())
    assert np.allclose(resample_to(volume, geometry, geometry), volume, atol=1e-5)
    shifted = Geometry.from_affine((5, 6, 7), oblique_affine() @ np.array(
        [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 2], [0, 0, 0, 1]], dtype=float))
    out = resample_to(volume, geometry, shifted)  # reference voxel p is source voxel p + (1, 0, 2)
    assert out.dtype == np.float32 and out.shape == (5, 6, 7)
    assert np.allclose(out[:4, :, :5], volume[1:, :, 2:], atol=1e-5)
    assert np.all(out[4:] == 0) and np.all(out[:, :, 5:] == 0)  # outside the source: 0
    finer = Geometry.from_affine((9, 11, 13), oblique_affine() @ np.diag([0.5, 0.5, 0.5, 1.0]))
    out = resample_to(volume, geometry, finer)  # the same extent: every point inside, edges included
    assert np.allclose(out[::2, ::2, ::2], volume, atol=1e-5)
    assert np.allclose(out[1::2, ::2, ::2], (volume[1:] + volume[:-1]) / 2, atol=1e-5)
    assert np.all(out != 0)
    nearest = resample_to(volume, geometry, finer, order=0)
    assert np.allclose(nearest[::2, ::2, ::2], volume)


@pytest.mark.parametrize("keyword, what, plural", [("StudyInstanceUID", "study", "studies"),
                                                   ("FrameOfReferenceUID", "frame of reference", "frames of reference")])
def test_two_studies_or_frames_of_reference(tmp_path, keyword, what, plural):
    datasets = study_datasets(tmp_path)
    other = generate_uid()
    for ds in datasets:
        if ds.SeriesDescription == SERIES_DESCRIPTIONS["t2"]:
            setattr(ds, keyword, other)
    err = problem(load_dicom_scan, datasets, RULES)
    assert f"2 different {plural};" in err.reason and f"send the series of one {what}" in err.reason
    assert all(f"'{SERIES_DESCRIPTIONS[m]}'" in err.reason for m in MODALITIES)
    assert not any(uid in err.reason for uid in uids_of(datasets))


def test_a_bad_series_in_a_study_is_named(tmp_path):
    datasets = study_datasets(tmp_path)
    t2 = [ds for ds in datasets if ds.SeriesDescription == SERIES_DESCRIPTIONS["t2"]]
    datasets.remove(t2[2])
    err = problem(load_dicom_scan, datasets, RULES)
    assert f"'{SERIES_DESCRIPTIONS['t2']}' (series 4)" in err.reason and "unevenly" in err.reason


def test_reference_grid_over_the_voxel_limit(tmp_path):
    err = problem(load_dicom_scan, study_datasets(tmp_path), RULES, max_voxels=int(np.prod(SHAPE)) - 1, status=413)
    assert "voxels" in err.reason
    assert load_dicom_scan(study_datasets(tmp_path / "again"), RULES, max_voxels=int(np.prod(SHAPE)))
