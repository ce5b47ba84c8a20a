"""Synthetic DICOM studies (training/data/synthetic/dicom_study.py), read back with pydicom and a reference reader.

The reader below is written from the DICOM standard alone: it sorts slices (or frames) along the normal
``cross(row direction, column direction)``, builds the LPS affine from Image Orientation (Patient), Image
Position (Patient) and Pixel Spacing, and converts it to RAS+. Every voxel read back must land on a voxel of
the original volume, at the same world position (within 1e-4 mm) and with the same value.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from service.core.labels import MODALITIES
from training.cli import build_parser, main
from training.data.synthetic.dicom_study import (
    ENHANCED_MR_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    SERIES_DESCRIPTIONS,
    StudyInfo,
    write_dicom_study,
    write_series,
)

SHAPE = (24, 20, 12)
SPACING = (0.9, 1.1, 2.5)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    u, v = [x for x in range(3) if x != axis]
    r = np.eye(3)
    r[u, u], r[u, v], r[v, u], r[v, v] = c, -s, s, c
    return r


def oblique_affine(flip: bool = False) -> np.ndarray:
    """Rotated ~20 degrees about x and about z, anisotropic voxels, a non-zero origin; ``flip``: det < 0."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(2, 20.0) @ _rotation(0, 18.0) @ np.diag(SPACING) @ np.diag([-1 if flip else 1, 1, 1])
    affine[:3, 3] = (-12.3, 45.6, 7.8)
    return affine


def pattern() -> np.ndarray:
    """A distinct int16 value in every voxel, negative ones included."""
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) - 1000).astype(np.int16)


def read_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A series folder as a volume ``(columns, rows, slices)`` and its RAS+ affine, from pydicom alone."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    if datasets[0].SOPClassUID == ENHANCED_MR_IMAGE_STORAGE:
        (ds,) = datasets
        shared = ds.SharedFunctionalGroupsSequence[0]
        orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
        spacing = np.array(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float)
        transform = shared.PixelValueTransformationSequence[0]
        frames = ds.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
        positions = np.array([f.PlanePositionSequence[0].ImagePositionPatient
                              for f in ds.PerFrameFunctionalGroupsSequence], dtype=float)
        assert frames.shape == (int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    else:
        orientation = np.array(datasets[0].ImageOrientationPatient, dtype=float)
        spacing = np.array(datasets[0].PixelSpacing, dtype=float)
        for ds in datasets:
            assert np.array_equal(np.array(ds.ImageOrientationPatient, dtype=float), orientation)
            assert np.array_equal(np.array(ds.PixelSpacing, dtype=float), spacing)
        frames = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
        positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    assert abs(np.linalg.norm(row_dir) - 1) < 1e-6 and abs(np.linalg.norm(col_dir) - 1) < 1e-6
    assert abs(row_dir @ col_dir) < 1e-6
    normal = np.cross(row_dir, col_dir)
    order = np.argsort(positions @ normal)
    frames, positions = frames[order], positions[order]
    n = len(positions)
    step = (positions[-1] - positions[0]) / (n - 1)
    assert np.allclose(positions, positions[0] + np.arange(n)[:, None] * step, atol=1e-4)  # evenly spaced
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # along a row: column index, column spacing
    lps[:3, 1] = col_dir * spacing[0]  # down a column: row index, row spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return np.transpose(frames, (2, 1, 0)), LPS_TO_RAS @ lps


def assert_same_voxels(volume: np.ndarray, affine: np.ndarray, read: np.ndarray, read_affine: np.ndarray) -> None:
    """Every voxel read back lies on a distinct voxel of the original, at the same world point, with its value."""
    assert read.size == volume.size
    index = np.indices(read.shape).reshape(3, -1)
    world = read_affine[:3, :3] @ index + read_affine[:3, 3:4]
    original = np.linalg.solve(affine[:3, :3], world - affine[:3, 3:4])
    nearest = np.rint(original).astype(int)
    assert np.abs(affine[:3, :3] @ nearest + affine[:3, 3:4] - world).max() < 1e-4
    assert np.all(nearest >= 0) and np.all(nearest < np.array(volume.shape)[:, None])
    assert len(np.unique(np.ravel_multi_index(tuple(nearest), volume.shape))) == volume.size
    assert np.array_equal(read.reshape(-1), volume[tuple(nearest)].astype(float))


def _study(case_id: str = "SYN_0001") -> StudyInfo:
    return StudyInfo.for_case(case_id)


@pytest.mark.parametrize("flip", [False, True], ids=["det+", "det-"])
@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_series_geometry_round_trip(tmp_path, slice_axis, reverse, enhanced, flip):
    volume, affine = pattern(), oblique_affine(flip)
    files = write_series(volume, affine, tmp_path / "s", modality_name="t1", series_description="AX T1 SE",
                         study=_study(), series_number=2, slice_axis=slice_axis, reverse=reverse, enhanced=enhanced)
    assert len(files) == (1 if enhanced else SHAPE[slice_axis])
    read, read_affine = read_series(tmp_path / "s")
    assert_same_voxels(volume, affine, read, read_affine)


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_axial_conventions_and_order(tmp_path, enhanced):
    """Slices along k: pixel[row=j, col=i], IOP (+i, +j) in LPS, PixelSpacing [dj, di], stored order."""
    volume, affine = pattern(), oblique_affine()
    lps = LPS_TO_RAS @ affine
    for reverse in (False, True):
        out = tmp_path / str(reverse)
        files = write_series(volume, affine, out, modality_name="flair", series_description="AX FLAIR",
                             study=_study(), series_number=1, reverse=reverse, enhanced=enhanced)
        first_k = SHAPE[2] - 1 if reverse else 0
        ds = pydicom.dcmread(files[0])
        if enhanced:
            shared = ds.SharedFunctionalGroupsSequence[0]
            orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
            spacing = shared.PixelMeasuresSequence[0].PixelSpacing
            position = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
            pixels = ds.pixel_array[0]
            positions = [f.FrameContentSequence[0].InStackPositionNumber for f in ds.PerFrameFunctionalGroupsSequence]
            assert positions == [k + 1 for k in (range(SHAPE[2])[::-1] if reverse else range(SHAPE[2]))]
        else:
            orientation, spacing, position, pixels = (ds.ImageOrientationPatient, ds.PixelSpacing,
                                                      ds.ImagePositionPatient, ds.pixel_array)
            assert [f.name for f in files] == [f"IM{n:04d}.dcm" for n in range(1, SHAPE[2] + 1)]
            assert [int(pydicom.dcmread(f).InstanceNumber) for f in files] == list(range(1, SHAPE[2] + 1))
            assert float(ds.SpacingBetweenSlices) == pytest.approx(SPACING[2])
            assert float(ds.SliceThickness) == pytest.approx(SPACING[2])
        assert pixels.shape == (SHAPE[1], SHAPE[0])
        assert pixels.dtype == np.int16
        assert np.array_equal(pixels, volume[:, :, first_k].T)
        expected = np.concatenate([lps[:3, 0] / SPACING[0], lps[:3, 1] / SPACING[1]])
        assert np.allclose(np.array(orientation, dtype=float), expected, atol=1e-9)
        assert np.allclose(np.array(spacing, dtype=float), [SPACING[1], SPACING[0]])
        assert np.allclose(np.array(position, dtype=float), lps[:3, 3] + first_k * lps[:3, 2], atol=1e-9)


def test_pixel_module_and_file_format(tmp_path):
    files = write_series(pattern(), oblique_affine(), tmp_path / "s", modality_name="t2",
                         series_description="AX T2 FSE", study=_study(), series_number=4)
    assert files[0].read_bytes()[128:132] == b"DICM"
    ds = pydicom.dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == MR_IMAGE_STORAGE
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (ds.SamplesPerPixel, ds.PhotometricInterpretation) == (1, "MONOCHROME2")
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
    assert (ds.Modality, ds.MRAcquisitionType, ds.SequenceVariant) == ("MR", "3D", "NONE")
    assert ds.ImageType == ["ORIGINAL", "PRIMARY", "OTHER"]
    assert float(ds.EchoTime) > 0 and float(ds.RepetitionTime) > float(ds.EchoTime)
    assert ds.Manufacturer == "brats-seg synthetic"


def _uids(root: Path) -> dict[str, tuple[str, str, str, str, str]]:
    found = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found[str(path.relative_to(root))] = (ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SeriesInstanceUID,
                                              ds.SOPInstanceUID, ds.SOPClassUID)
    return found


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_study_uids_patient_and_reruns(tmp_path, enhanced):
    rng = np.random.default_rng(0)
    case = {m: (rng.integers(-100, 3000, size=SHAPE).astype(np.int16), oblique_affine()) for m in MODALITIES}
    written = write_dicom_study(case, tmp_path / "a", case_id="SYN_0007", enhanced=enhanced,
                                series_descriptions={"t2": "AX T2 PROPELLER"})
    assert list(written) == list(MODALITIES)
    assert sorted(p.name for p in (tmp_path / "a" / "SYN_0007").iterdir()) == sorted(MODALITIES)
    uids = _uids(tmp_path / "a")
    assert len(uids) == 4 * (1 if enhanced else SHAPE[2])
    studies, frames, series, sops, classes = (set(column) for column in zip(*uids.values()))
    assert len(studies) == 1 and len(frames) == 1 and len(series) == 4 and len(sops) == len(uids)
    assert classes == {ENHANCED_MR_IMAGE_STORAGE if enhanced else MR_IMAGE_STORAGE}
    assert not (studies & series) and not (series & sops) and studies != frames
    for number, modality in enumerate(MODALITIES, start=1):
        ds = pydicom.dcmread(written[modality][0], stop_before_pixels=True)
        expected = "AX T2 PROPELLER" if modality == "t2" else SERIES_DESCRIPTIONS[modality]
        assert (int(ds.SeriesNumber), ds.SeriesDescription, ds.ProtocolName) == (number, expected, expected)
        patient = {e.keyword: str(e.value) for e in ds if e.tag.group == 0x0010}
        assert patient == {"PatientName": "SYNTHETIC^CASE^SYN_0007", "PatientID": "SYN_0007",
                           "PatientBirthDate": "", "PatientSex": "O"}
        assert ds.ReferringPhysicianName == "" and ds.PositionReferenceIndicator == ""
        assert 0 < len(ds.AccessionNumber) <= 16 and ds.StudyDate and ds.StudyTime
    # a rerun gives the same UIDs; another case id, or other voxels under the same id, other ones
    write_dicom_study(case, tmp_path / "b", case_id="SYN_0007", enhanced=enhanced,
                      series_descriptions={"t2": "AX T2 PROPELLER"})
    assert _uids(tmp_path / "b") == uids
    write_dicom_study(case, tmp_path / "c", case_id="SYN_0008", enhanced=enhanced)
    other = _uids(tmp_path / "c")
    assert not {u for v in other.values() for u in v[:4]} & {u for v in uids.values() for u in v[:4]}
    changed = dict(case, flair=(case["flair"][0] + 1, case["flair"][1]))
    write_dicom_study(changed, tmp_path / "d", case_id="SYN_0007", enhanced=enhanced)
    assert not {v[0] for v in _uids(tmp_path / "d").values()} & studies
    # rewriting a study replaces it whole
    write_dicom_study(case, tmp_path / "a", case_id="SYN_0007", enhanced=enhanced,
                      series_descriptions={"t2": "AX T2 PROPELLER"})
    assert _uids(tmp_path / "a") == uids
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["SYN_0007"]


def test_refuses_what_dicom_cannot_hold(tmp_path):
    volume, affine = pattern(), oblique_affine()
    kwargs = dict(modality_name="t1", series_description="T1", study=_study(), series_number=1)
    sheared = affine.copy()
    sheared[:3, 1] += 0.3 * sheared[:3, 0]
    with pytest.raises(ValueError, match="shear"):
        write_series(volume, sheared, tmp_path / "a", **kwargs)
    with pytest.raises(ValueError, match="int16"):
        write_series(volume.astype(np.float32) * 100, affine, tmp_path / "b", **kwargs)
    with pytest.raises(ValueError, match="slice_axis"):
        write_series(volume, affine, tmp_path / "c", slice_axis=3, **kwargs)
    for bad in ("DOE^JOHN", "..", "a/b", "x\n", ""):
        with pytest.raises(ValueError, match="case id"):
            StudyInfo.for_case(bad)
    write_series(volume, affine, tmp_path / "d", **kwargs)
    with pytest.raises(FileExistsError):
        write_series(volume, affine, tmp_path / "d", **kwargs)
    with pytest.raises(ValueError, match="case_id"):
        write_dicom_study({m: (volume, affine) for m in MODALITIES}, tmp_path / "e")


def test_cli_writes_a_dicom_study_per_case(tmp_path):
    assert build_parser().parse_args(["synth", "x"]).format == "nifti"
    out = tmp_path / "synth"
    assert main(["synth", str(out), "--cases", "1", "--format", "dicom", "--size", "24,24,16",
                 "--spacing", "8,8,8"]) == 0
    case = "BraTS20_Training_001"
    study = out / "dicom" / case
    assert sorted(p.name for p in study.iterdir()) == sorted(MODALITIES)
    for modality in MODALITIES:
        assert len(list((study / modality).glob("*.dcm"))) == 16
    nifti = out / "MICCAI_BraTS2020_TrainingData" / case
    assert (nifti / f"{case}_seg.nii.gz").is_file()  # the labelled NIfTI case is still written
    for modality in ("flair", "t1ce"):
        image = nib.load(nifti / f"{case}_{modality}.nii.gz")
        read, read_affine = read_series(study / modality)
        assert_same_voxels(np.asarray(image.dataobj), image.affine, read, read_affine)
