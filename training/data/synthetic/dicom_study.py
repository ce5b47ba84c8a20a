"""Synthetic cases written as DICOM MR studies, so the DICOM path can be shown and tested without patient data.

A case's four modalities become four series of one study, sharing its Study Instance UID and Frame of
Reference UID: ``OUT/CASE/{flair,t1,t1ce,t2}/IM0001.dcm ...``. Each series is either one MR Image Storage
object per slice or one multi-frame Enhanced MR Image Storage object. The NIfTI files stay the ground truth
(they hold the labels); the DICOM pixels are their voxels, placed so that a reader which sorts slices along
the slice normal and builds the affine from Image Orientation/Position (Patient) and Pixel Spacing gets back
the NIfTI affine, once converted from DICOM's LPS patient coordinates to NIfTI's RAS+.

Geometry, for a slice along volume axis ``s`` with the two other axes ``c < r``: the DICOM columns run along
``c`` and the rows along ``r`` (``pixel[row=r, col=c]``); Image Orientation (Patient) is the LPS direction of
``+c`` then of ``+r``; Pixel Spacing is ``[spacing along r, spacing along c]`` (row spacing first); Image
Position (Patient) is the LPS position of the voxel ``(c=0, r=0, s=k)``. For ``s = 2`` (axial-style, the
default) that is ``pixel[j, i] = volume[i, j, k]``. The slice normal ``cross(+c, +r)`` may point along
``+s`` or ``-s`` depending on the handedness of the affine and on ``s``; DICOM does not require either.

UIDs are derived (:func:`pydicom.uid.generate_uid` with fixed entropy) from the case id and a digest of the
voxels and geometry, so a rerun on the same data gives the same UIDs and a different case, or the same case
id with other data, gives other ones. Patient name and id hold only the synthetic case id.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from service.core.labels import MODALITIES

__all__ = ["ENHANCED_MR_IMAGE_STORAGE", "MR_IMAGE_STORAGE", "SERIES_DESCRIPTIONS", "StudyInfo", "read_nifti_case",
           "write_dicom_study", "write_series"]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

SERIES_DESCRIPTIONS: dict[str, str] = {"flair": "AX FLAIR", "t1": "AX T1 SE", "t1ce": "AX T1 POST GD",
                                       "t2": "AX T2 FSE"}
"""Series Description (and Protocol Name) per modality, as a scanner might label an axial brain protocol."""

# Plausible 1.5 T spin-echo parameters per modality: TR (ms), TE (ms), TI (ms) or None, Acquisition Contrast.
_TIMING: dict[str, tuple[float, float, float | None, str]] = {
    "flair": (9000.0, 120.0, 2500.0, "FLUID_ATTENUATED"), "t1": (500.0, 12.0, None, "T1"),
    "t1ce": (500.0, 12.0, None, "T1"), "t2": (4000.0, 100.0, None, "T2")}
# Enhanced MR Image and MR Pulse Sequence attributes that are the same for every synthetic series.
_ENHANCED_FIXED: dict[str, str] = {
    "PixelPresentation": "MONOCHROME", "VolumetricProperties": "VOLUME", "VolumeBasedCalculationTechnique": "NONE",
    "ComplexImageComponent": "MAGNITUDE", "ContentQualification": "PRODUCT", "ResonantNucleus": "1H",
    "KSpaceFiltering": "NONE", "ApplicableSafetyStandardAgency": "IEC", "BurnedInAnnotation": "NO",
    "LossyImageCompression": "00", "PulseSequenceName": "SE", "EchoPulseSequence": "SPIN", "MultipleSpinEcho": "NO",
    "PhaseContrast": "NO", "SteadyStatePulseSequence": "NONE", "EchoPlanarPulseSequence": "NO",
    "SpectrallySelectedSuppression": "NONE", "OversamplingPhase": "NONE", "GeometryOfKSpaceTraversal": "RECTILINEAR",
    "SegmentedKSpaceTraversal": "SINGLE", "RectilinearPhaseEncodeReordering": "LINEAR",
    "DimensionOrganizationType": "3D"}
_CASE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_INT16 = np.iinfo(np.int16)


def _ds(values) -> list[str]:
    """Numbers as Decimal String values of at most 16 characters (what DS allows)."""
    return [format_number_as_ds(float(v)) for v in np.atleast_1d(values)]


def _item(**values) -> Dataset:
    ds = Dataset()
    ds.update(values)
    return ds


def _seq(**values) -> Sequence:
    """A sequence of one item holding ``values``."""
    return Sequence([_item(**values)])


@dataclass(frozen=True)
class StudyInfo:
    """What the series of one synthetic study share.

    Attributes:
        case_id: The synthetic case id; also the Patient ID and part of the Patient's Name.
        study_uid: Study Instance UID.
        frame_of_reference_uid: Frame of Reference UID: every series of the study lies in one patient space.
        date: Study, series and content date (DICOM ``YYYYMMDD``), fixed so that files are reproducible.
        time: Study, series and content time (``HHMMSS``).
        accession_number: Accession Number (at most 16 characters).
        study_id: Study ID (at most 16 characters).
    """

    case_id: str
    study_uid: str
    frame_of_reference_uid: str
    date: str = "20260101"
    time: str = "120000"
    accession_number: str = ""
    study_id: str = "1"

    def __post_init__(self) -> None:
        if not isinstance(self.case_id, str) or not _CASE_ID_RE.fullmatch(self.case_id):
            raise ValueError(f"case id must be 1 to 64 letters, digits, '.', '_' or '-' (it names a folder and "
                             f"the Patient ID), starting with a letter or digit, got {self.case_id!r}")
        if len(self.accession_number) > 16 or len(self.study_id) > 16:
            raise ValueError("accession number and study id take at most 16 characters")

    @classmethod
    def for_case(cls, case_id: str, *, salt: str = "") -> StudyInfo:
        """The study of ``case_id`` with UIDs and accession number derived from it (and ``salt``, if given)."""
        digest = hashlib.sha256(f"{case_id}\0{salt}".encode()).hexdigest()
        return cls(case_id=case_id,
                   study_uid=generate_uid(entropy_srcs=["brats-seg synthetic study", case_id, salt]),
                   frame_of_reference_uid=generate_uid(entropy_srcs=["brats-seg synthetic frame", case_id, salt]),
                   accession_number="SYN" + digest[:13].upper())


def _digest(volume: np.ndarray, affine: np.ndarray) -> str:
    """A digest of the voxels (with their type and shape) and the affine, for deriving UIDs."""
    volume = np.ascontiguousarray(volume)
    h = hashlib.sha256(f"{volume.dtype.str}{volume.shape}".encode())
    h.update(volume.tobytes())
    h.update(np.asarray(affine, dtype=np.float64).tobytes())
    return h.hexdigest()


def _check(volume: np.ndarray, affine: np.ndarray, slice_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The volume as int16 and the LPS affine; ``ValueError`` for what DICOM cannot hold."""
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"expected a finite 4x4 affine, got shape {affine.shape}")
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(norms <= 0):
        raise ValueError("the affine has a zero-length axis")
    cosines = affine[:3, :3] / norms
    if not np.allclose(cosines.T @ cosines, np.eye(3), atol=1e-4):
        raise ValueError("the affine has sheared axes, which DICOM image planes cannot describe")
    rounded = np.rint(volume.astype(np.float64, copy=False))
    if not np.all(np.isfinite(rounded)) or rounded.min() < _INT16.min or rounded.max() > _INT16.max:
        raise ValueError("voxel values must be finite and fit int16 once rounded")
    return rounded.astype(np.int16), _RAS_TO_LPS @ affine


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.update({"MediaStorageSOPClassUID": sop_class, "MediaStorageSOPInstanceUID": sop_uid,
                 "TransferSyntaxUID": ExplicitVRLittleEndian, "ImplementationClassUID": PYDICOM_IMPLEMENTATION_UID,
                 "ImplementationVersionName": "BRATS_SEG_SYN"})
    return meta


def _common(study: StudyInfo, series_uid: str, series_number: int, description: str, modality_name: str,
            sop_class: str, sop_uid: str) -> Dataset:
    """Patient, General Study/Series, Frame of Reference, General Equipment, SOP Common, most of Image Pixel."""
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.PatientName = f"SYNTHETIC^CASE^{study.case_id}"
    ds.PatientID, ds.PatientBirthDate, ds.PatientSex = study.case_id, "", "O"
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study.study_uid, study.study_id, study.accession_number
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study.time
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC BRAIN MRI"
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", series_uid, int(series_number)
    ds.SeriesDescription = ds.ProtocolName = description
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = study.frame_of_reference_uid, ""
    ds.Manufacturer, ds.ManufacturerModelName = "brats-seg synthetic", "synthetic"
    ds.BodyPartExamined = "BRAIN"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.MagneticFieldStrength = "1.5"
    return ds


def write_series(volume: np.ndarray, affine: np.ndarray, out_dir: Path, *, modality_name: str,
                 series_description: str, study: StudyInfo, series_number: int, slice_axis: int = 2,
                 reverse: bool = False, enhanced: bool = False) -> list[Path]:
    """Write one MR series of ``volume`` into ``out_dir`` (created; it must not hold files already).

    Args:
        volume: 3D array in NIfTI voxel order ``(i, j, k)``; values are rounded to int16.
        affine: The NIfTI (RAS+) voxel-to-world affine, as nibabel gives it (rotation times voxel sizes,
            no shear).
        modality_name: ``flair``, ``t1``, ``t1ce``, ``t2`` (sets echo/repetition times; any other name gets
            the T1 ones).
        series_description: Series Description and Protocol Name.
        study: The study the series belongs to.
        series_number: Series Number.
        slice_axis: The volume axis the slices are taken along (2: slices along ``k``).
        reverse: Store the slices in reverse order (Instance Number 1 and ``IM0001.dcm`` are the last slice;
            in an enhanced object, frame 1), for testing readers that must sort along the slice normal.
        enhanced: One Enhanced MR Image Storage object (multi-frame, ``IM0001.dcm``) instead of one MR Image
            Storage object per slice.

    Returns:
        The files written, in Instance Number order.

    Raises:
        ValueError: a volume or affine DICOM cannot hold, or a bad ``slice_axis``.
        FileExistsError: ``out_dir`` holds files already.
    """
    pixels, lps = _check(volume, affine, slice_axis)
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    col_axis, row_axis = (a for a in range(3) if a != slice_axis)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    orientation = _ds(np.concatenate([lps[:3, col_axis] / spacing[col_axis], lps[:3, row_axis] / spacing[row_axis]]))
    pixel_spacing = _ds([spacing[row_axis], spacing[col_axis]])
    thickness = _ds(spacing[slice_axis])[0]
    n = pixels.shape[slice_axis]
    order = list(range(n))[::-1] if reverse else list(range(n))

    def position(k: int) -> list[str]:
        return _ds(lps[:3, 3] + k * lps[:3, slice_axis])

    def frame(k: int) -> np.ndarray:
        return np.ascontiguousarray(np.take(pixels, k, axis=slice_axis).T)  # (rows along r, columns along c)

    series_uid = generate_uid(entropy_srcs=[study.study_uid, modality_name, str(series_number), str(slice_axis),
                                            str(reverse), str(enhanced), _digest(volume, affine)])
    tr, te, ti, contrast = _TIMING.get(modality_name, _TIMING["t1"])
    rows, cols = pixels.shape[row_axis], pixels.shape[col_axis]
    paths: list[Path] = []
    if not enhanced:
        for number, k in enumerate(order, start=1):
            sop_uid = generate_uid(entropy_srcs=[series_uid, "slice", str(k)])
            ds = _common(study, series_uid, series_number, series_description, modality_name, MR_IMAGE_STORAGE,
                         sop_uid)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
            ds.InstanceNumber = number
            ds.ImageOrientationPatient, ds.ImagePositionPatient = orientation, position(k)
            ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = pixel_spacing, thickness, thickness
            ds.ScanningSequence = ["SE", "IR"] if ti is not None else "SE"
            ds.ImagedNucleus = "1H"
            if modality_name == "t1ce":
                ds.ContrastBolusAgent = "GADOLINIUM"
            ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "NONE", "", "3D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = _ds(tr)[0], _ds(te)[0], 1
            if ti is not None:
                ds.InversionTime = _ds(ti)[0]
            ds.Rows, ds.Columns = rows, cols
            ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
            ds.PixelData = frame(k).tobytes()
            paths.append(out_dir / f"IM{number:04d}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        return paths

    sop_uid = generate_uid(entropy_srcs=[series_uid, "multi-frame"])
    ds = _common(study, series_uid, series_number, series_description, modality_name, ENHANCED_MR_IMAGE_STORAGE,
                 sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber, ds.NumberOfFrames, ds.Rows, ds.Columns = 1, n, rows, cols
    ds.AcquisitionDateTime, ds.AcquisitionDuration = study.date + study.time, 300.0
    ds.update({**_ENHANCED_FIXED, "AcquisitionContrast": contrast})
    organization = generate_uid(entropy_srcs=[series_uid, "dimensions"])
    ds.DimensionOrganizationSequence = _seq(DimensionOrganizationUID=organization)
    ds.DimensionIndexSequence = Sequence([  # frames are indexed by (Stack ID, In-Stack Position Number)
        _item(DimensionOrganizationUID=organization, DimensionIndexPointer=pointer,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel=label)
        for pointer, label in ((0x00209056, "Stack ID"), (0x00209057, "In-Stack Position Number"))])
    shared = _item(
        PixelMeasuresSequence=_seq(PixelSpacing=pixel_spacing, SliceThickness=thickness,
                                   SpacingBetweenSlices=thickness),
        PlaneOrientationSequence=_seq(ImageOrientationPatient=orientation),
        MRImageFrameTypeSequence=_seq(FrameType=ds.ImageType, AcquisitionContrast=contrast, **{
            k: _ENHANCED_FIXED[k] for k in ("PixelPresentation", "VolumetricProperties",
                                            "VolumeBasedCalculationTechnique", "ComplexImageComponent")}),
        MRTimingAndRelatedParametersSequence=_seq(RepetitionTime=_ds(tr)[0], EchoTrainLength=1, FlipAngle="90"),
        MREchoSequence=_seq(EffectiveEchoTime=te),
        PixelValueTransformationSequence=_seq(RescaleIntercept="0", RescaleSlope="1", RescaleType="US"))
    if ti is not None:
        shared.MRModifierSequence = _seq(InversionRecovery="YES", InversionTimes=[ti], FlowCompensation="NONE",
                                         T2Preparation="NO", SpatialPresaturation="NONE", PartialFourier="NO")
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([  # in stored order; In-Stack Position Number is k + 1
        _item(FrameContentSequence=_seq(StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[1, k + 1],
                                        FrameAcquisitionNumber=1, FrameReferenceDateTime=study.date + study.time,
                                        FrameAcquisitionDateTime=study.date + study.time,
                                        FrameAcquisitionDuration=300.0),
              PlanePositionSequence=_seq(ImagePositionPatient=position(k)))
        for k in order])
    ds.PixelData = np.stack([frame(k) for k in order]).tobytes()
    paths.append(out_dir / "IM0001.dcm")
    ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def read_nifti_case(source: Path | str) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The case id and ``{modality: (volume, affine)}`` of a BraTS case folder or an MSD 4D image file.

    Read with the service's scan loader, so the affine is the one every other reader of the project sees.
    """
    from service.core.case_folder import find_case_files, nifti_stem
    from service.core.scan import IMAGE_PART, load_scan

    source = Path(source)
    if source.is_dir():
        case_id, images, _ = find_case_files(source)
        scan = load_scan(images)
    else:
        case_id = nifti_stem(source) or source.name
        scan = load_scan({IMAGE_PART: source})
    return case_id, {m: (scan.image[c], scan.geometry.affine) for c, m in enumerate(MODALITIES)}


def write_dicom_study(case: Mapping[str, tuple[np.ndarray, np.ndarray]] | Path | str, out_dir: Path | str, *,
                      case_id: str | None = None, slice_axis: int = 2, reverse: bool = False, enhanced: bool = False,
                      series_descriptions: Mapping[str, str] | None = None) -> dict[str, list[Path]]:
    """Write a case's four modalities as one DICOM study: ``out_dir/CASE_ID/<modality>/IM0001.dcm ...``.

    Args:
        case: ``{modality: (volume, affine)}`` for the four ``MODALITIES``, or a BraTS case folder or MSD 4D
            image file (read by :func:`read_nifti_case`).
        out_dir: Folder that receives the study folder ``CASE_ID``; an older study folder of that name is
            replaced once the new one is complete.
        case_id: The case id (Patient ID); required with a mapping, else taken from the files.
        slice_axis, reverse, enhanced: As for :func:`write_series`, for every series.
        series_descriptions: Overrides of :data:`SERIES_DESCRIPTIONS` by modality.

    Returns:
        ``{modality: files}`` in ``MODALITIES`` order, series numbers 1 to 4 in that order.
    """
    if not isinstance(case, Mapping):
        found_id, case = read_nifti_case(case)
        case_id = case_id or found_id
    if case_id is None:
        raise ValueError("case_id is required when the volumes are given directly")
    if set(case) != set(MODALITIES):
        raise ValueError(f"expected the modalities {list(MODALITIES)}, got {sorted(case)}")
    descriptions = {**SERIES_DESCRIPTIONS, **(series_descriptions or {})}
    salt = hashlib.sha256("".join(_digest(*case[m]) for m in MODALITIES).encode()).hexdigest()
    study = StudyInfo.for_case(case_id, salt=salt)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / case_id, root / f".{case_id}.{uuid.uuid4().hex}.partial"
    try:
        for number, modality in enumerate(MODALITIES, start=1):
            volume, affine = case[modality]
            write_series(volume, affine, tmp / modality, modality_name=modality,
                         series_description=descriptions[modality], study=study, series_number=number,
                         slice_axis=slice_axis, reverse=reverse, enhanced=enhanced)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {m: sorted((final / m).glob("IM*.dcm")) for m in MODALITIES}
