"""Query and response models of ``POST /segment`` (SPEC section 2), as the OpenAPI document shows them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.labels import LABELS

__all__ = [
    "BRATS_LABELS",
    "PacsQuery",
    "PacsSegmentResponse",
    "RegionDice",
    "RegionHD95",
    "SegmentQuery",
    "SegmentResponse",
    "SegmentSummary",
    "StoredSeg",
    "Timings",
    "Volumes",
]

BRATS_LABELS: dict[str, str] = {str(value): name for value, name in LABELS.items()}
"""The ``labels`` field of every response: ``{"0": "background", "1": "NCR/NET", "2": "ED", "4": "ET"}``."""


class SegmentQuery(BaseModel):
    """Query parameters of ``POST /segment``; unknown parameters are refused (422), so a typo never passes."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        max_length=200,
        description="A model name listed by GET /models, or `ensemble` (the average of all loaded models). "
        "Default: the configured default model.",
    )
    format: Literal["json", "nifti", "dicom-seg"] = Field(
        "json", description="`json`: the summary with the mask in base64; `nifti`: the mask as .nii.gz; "
        "`dicom-seg` (DICOM input only): a DICOM Segmentation referencing the T1ce series."
    )
    tta: bool = Field(
        False, description="Test-time augmentation: average the predictions over mirrored inputs (8 for 3D models)."
    )
    postprocess: bool = Field(
        True,
        description="Apply the postprocessing learned on validation that the model card holds (`postprocessing` in "
        "GET /models); `false`: the raw mask. A model without rules returns the raw mask either way.",
    )


class Volumes(BaseModel):
    """Volumes in millilitres of the predicted regions (WT, TC, ET) and labels (NCR = 1, ED = 2)."""

    WT: float
    TC: float
    ET: float
    NCR: float
    ED: float


class RegionDice(BaseModel):
    """Dice per region against the uploaded label (1.0 when both masks are empty, 0.0 when one is)."""

    WT: float
    TC: float
    ET: float


class RegionHD95(BaseModel):
    """95th-percentile Hausdorff distance in mm per region; ``null`` when exactly one mask is empty."""

    WT: float | None
    TC: float | None
    ET: float | None


class Timings(BaseModel):
    """Milliseconds spent, measured by the server.

    ``decode``: reading and checking the NIfTI parts; ``preprocess``: crop and normalisation;
    ``inference``: the networks (sliding window, TTA, ensemble averaging); ``postprocess``: labels,
    postprocessing rules, metrics and encoding the mask; ``total``: the whole request from the start of its handling (upload reception
    and waiting in the inference queue included) to the reply.
    """

    decode: float
    preprocess: float
    inference: float
    postprocess: float
    total: float


class SegmentSummary(BaseModel):
    """The result of a segmentation without the mask: the header ``X-Segment-Summary`` of ``format=nifti``."""

    model_config = ConfigDict(protected_namespaces=())

    model: str = Field(description="The model that segmented: a name from GET /models, or `ensemble`.")
    model_sha256: str = Field(
        description="First 12 hex digits of the ONNX file's sha256; for an ensemble, the members' joined by `+`."
    )
    provider: str = Field(description="ONNX Runtime execution provider, e.g. CPUExecutionProvider.")
    shape: tuple[int, int, int] = Field(description="Shape (X, Y, Z) of the input and of the mask.")
    spacing_mm: tuple[float, float, float] = Field(description="Voxel sizes in mm from the input's header.")
    labels: dict[str, str] = Field(default_factory=lambda: dict(BRATS_LABELS), description="Mask values.")
    volumes_ml: Volumes
    dice: RegionDice | None = Field(description="Against the uploaded `label`; null without one.")
    hd95_mm: RegionHD95 | None = Field(description="Against the uploaded `label`; null without one.")
    postprocessed: bool = Field(
        description="Whether the model card's postprocessing rules were applied to the mask (false when "
        "postprocess=false or the model has none)."
    )
    timing_ms: Timings
    series: dict[str, str] | None = Field(
        default=None, description="DICOM input only: the SeriesDescription of the series used for each modality "
        "(the mask lies on the grid of the t1ce series)."
    )


class SegmentResponse(SegmentSummary):
    """Response of ``POST /segment`` with ``format=json``."""

    mask: str = Field(
        description="Base64 of the mask as .nii.gz: uint8 labels 0/1/2/4 on the input's geometry, no free text."
    )


class PacsQuery(BaseModel):
    """Query parameters of ``POST /dicomweb/studies/{study}/segment``; unknown parameters are refused (422)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = SegmentQuery.model_fields["model"]
    tta: bool = SegmentQuery.model_fields["tta"]
    postprocess: bool = SegmentQuery.model_fields["postprocess"]


class StoredSeg(BaseModel):
    """The DICOM Segmentation stored in the study on the PACS."""

    series_instance_uid: str
    sop_instance_uid: str


class PacsSegmentResponse(SegmentSummary):
    """Response of ``POST /dicomweb/studies/{study}/segment``: the summary, the series used and the SEG stored."""

    stored: StoredSeg
