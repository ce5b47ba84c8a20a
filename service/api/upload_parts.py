"""The part rules of ``POST /segment``: which form parts a request may hold, checked as each part begins."""

from __future__ import annotations

import re
from collections.abc import Mapping

from service.api.errors import ProblemError
from service.core.labels import MODALITIES
from service.core.scan import IMAGE_PART, KNOWN_PARTS, LABEL_PART

__all__ = ["DICOM_PART", "EXPECTED_PARTS", "UPLOAD_PARTS", "begin_part", "check_complete", "part_rule_error"]

DICOM_PART = "dicom"
"""A repeatable part: a DICOM file or a zip of DICOM files."""
UPLOAD_PARTS: tuple[str, ...] = (*KNOWN_PARTS, DICOM_PART)
_MAX_NAME_SHOWN = 40

EXPECTED_PARTS = (
    f"send either four parts named {', '.join(MODALITIES[:-1])} and {MODALITIES[-1]} (3D volumes of one shape "
    f"and affine) or one part named {IMAGE_PART} (a 4D volume (X, Y, Z, 4), channels in the order "
    f"{', '.join(MODALITIES)}), and optionally one part named {LABEL_PART} (a 3D ground truth with labels "
    "0, 1, 2, 4); each part a .nii or .nii.gz file; or, for a DICOM study, any number of parts named "
    f"{DICOM_PART} (each a DICOM file or a zip of DICOM files) and optionally the {LABEL_PART}"
)
"""What a client must send; the ``detail`` of every part-rule error ends with it."""

def part_rule_error(problem: str) -> ProblemError:
    """A 400 problem for a broken part rule, the rules restated after what broke them."""
    return ProblemError(400, "Invalid upload", f"{problem}; {EXPECTED_PARTS}")


_PLAIN_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{_MAX_NAME_SHOWN}}}")


def _shown(name: str) -> str:
    """A client-chosen part name for an error detail: quoted when it is a short plain token (``seg``,
    ``FLAIR``), else not shown at all, since a damaged header can run the part name into the file name, which
    may carry patient data."""
    return repr(name) if _PLAIN_NAME.fullmatch(name) else "with a name that is not a plain word"


def begin_part(raw: bytes | None, received: Mapping[str, object], dicom_parts: int = 0, *,
               max_dicom_parts: int = 5000) -> str:
    """The name of a new part, checked against the part rules given the parts ``received`` so far and the
    number of ``dicom`` parts already received."""
    if raw is None:
        raise ProblemError(400, "Invalid upload",
                           "every part needs a Content-Disposition: form-data header with a name; " + EXPECTED_PARTS)
    name = raw.decode("utf-8", errors="replace")
    if name not in UPLOAD_PARTS:
        raise part_rule_error(f"unknown part {_shown(name)}")
    nifti = [m for m in (*MODALITIES, IMAGE_PART) if m in received]
    if name == DICOM_PART:
        if nifti:
            raise part_rule_error(f"part 'dicom' was sent together with NIfTI parts ({', '.join(nifti)})")
        if dicom_parts >= max_dicom_parts:
            raise ProblemError(413, "Too Many Parts",
                               f"more than {max_dicom_parts} dicom parts; send the series as zips instead")
        return name
    if name in received:
        raise part_rule_error(f"part {name!r} was sent more than once")
    if name != LABEL_PART and dicom_parts:
        raise part_rule_error(f"part {name!r} was sent together with dicom parts")
    modalities = [m for m in MODALITIES if m in received]
    if name == IMAGE_PART and modalities:
        raise part_rule_error(f"part 'image' was sent together with modality parts ({', '.join(modalities)})")
    if name in MODALITIES and IMAGE_PART in received:
        raise part_rule_error(f"modality part {name!r} was sent together with part 'image'")
    return name


def check_complete(received: Mapping[str, object], dicom_parts: int = 0) -> None:
    """Raise the 400 problem of a body that ended without a whole scan."""
    if IMAGE_PART in received or dicom_parts:
        return
    missing = [m for m in MODALITIES if m not in received]
    if len(missing) == len(MODALITIES):
        raise part_rule_error("no image parts were sent")
    if missing:
        raise part_rule_error(f"missing part{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
