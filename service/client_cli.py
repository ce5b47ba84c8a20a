"""The command line of the client, ``python -m service.client INPUT [options]``.

Finds the four modalities of a BraTS case folder (or takes a 4D file, or the DICOM files of a folder or a zip),
sends them to a running service with :class:`service.client.SegmentationClient`, writes the mask next to the
input (``CASE_pred.nii.gz`` inside a case folder, ``NAME_pred.nii.gz`` beside a 4D file or a zip; with
``--dicom-seg``, ``NAME_seg.dcm``) or to ``--out`` and prints the summary. Exit status: 0
done, 1 the service refused or failed (its problem ``detail`` is printed), 2 bad command-line input. The API
key comes from ``--api-key`` or the ``BRATS_API_KEY`` environment variable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from service.client import DEFAULT_TIMEOUT_S, DEFAULT_URL, SegmentationClient, ServiceError
from service.core.case_folder import CaseFolderError, find_case_files, nifti_stem

__all__ = ["InputError", "format_summary", "main", "run"]


class InputError(ValueError):
    """Bad command-line input (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit status 2
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m service.client",
        description="Segment a BraTS case folder, a 4D NIfTI file or a DICOM study (a folder of DICOM files, or a "
        "zip) with a running segmentation service.",
        epilog="Exit status: 0 done, 1 the service refused or failed, 2 bad command-line input.",
    )
    p.add_argument("input", type=Path, help="a BraTS case folder (CASE_{flair,t1,t1ce,t2}.nii[.gz]), a 4D file, or a "
                   "DICOM study: a folder of DICOM files (any depth) or a .zip of them")
    p.add_argument("--url", default=DEFAULT_URL, help=f"service root (default {DEFAULT_URL})")
    p.add_argument("--model", help="model name from GET /models, or 'ensemble' (default: the service's default)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation by mirroring (8 flips for 3D models, 4 for 2D: that much slower)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="the raw mask, without the postprocessing rules of the model's card")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--label", type=Path, help="ground-truth segmentation to score the mask against")
    group.add_argument("--score", action="store_true", help="score against the case folder's CASE_seg file")
    p.add_argument("--out", type=Path, help="where to write the mask (a file, or a folder for the default name)")
    p.add_argument("--dicom-seg", action="store_true",
                   help="DICOM input only: get the mask as a DICOM Segmentation (NAME_seg.dcm) instead of .nii.gz")
    p.add_argument("--api-key", help="API key (default: the BRATS_API_KEY environment variable)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for the answer")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a short text")
    p.add_argument("--no-progress", action="store_true", help="no upload progress bar")
    return p


@dataclass(frozen=True)
class _Job:
    paths: dict[str, Path] | None
    image: Path | None
    label: Path | None
    out: Path
    dicom: tuple[Path, ...] | None = None


def _dicom_files(folder: Path) -> list[Path]:
    """The DICOM files under ``folder`` (any depth): files with the ``DICM`` marker of DICOM Part 10."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            with open(path, "rb") as f:
                if f.read(132)[128:] == b"DICM":
                    found.append(path)
    return found


def _dicom_job(args: argparse.Namespace, files: list[Path], name: str, folder: Path) -> _Job:
    suffix = "_seg.dcm" if args.dicom_seg else "_pred.nii.gz"
    out = folder / f"{name}{suffix}"
    if args.out is not None:
        out = args.out / out.name if args.out.is_dir() else args.out
    if args.score:
        raise InputError("--score needs a BraTS case folder; with DICOM input, give the label with --label")
    return _Job(paths=None, image=None, label=args.label, out=out, dicom=tuple(files))


def _job(args: argparse.Namespace) -> _Job:
    """Resolve the command line into files to send and where the mask goes (:class:`InputError` if bad)."""
    source: Path = args.input
    if source.is_file() and source.name.lower().endswith(".zip"):
        return _dicom_job(args, [source], source.name[: -len(".zip")], source.parent)
    if args.dicom_seg and not (source.is_dir() and _dicom_files(source)):
        raise InputError("--dicom-seg needs DICOM input: a folder of DICOM files or a .zip of them")
    if source.is_dir():
        try:
            case, paths, seg = find_case_files(source)
        except CaseFolderError as err:
            dicom = _dicom_files(source)
            if dicom:
                return _dicom_job(args, dicom, source.name, source)
            raise InputError(f"{err}; nor does it hold DICOM files") from None
        image, default_out = None, source / f"{case}_pred.nii.gz"
        if args.score:
            if seg is None:
                raise InputError(f"--score needs {case}_seg.nii[.gz] in {source}; there is none")
            args.label = seg
    elif source.is_file():
        stem = nifti_stem(source)
        if stem is None:
            raise InputError(f"{source} is neither a case folder nor a .nii/.nii.gz file")
        if args.score:
            raise InputError("--score needs a case folder; with a 4D file, give the label with --label")
        paths, image, default_out = None, source, source.with_name(f"{stem}_pred.nii.gz")
    else:
        raise InputError(f"{source} does not exist")
    label: Path | None = args.label
    if label is not None and not label.is_file():
        raise InputError(f"the label file {label} does not exist")

    out: Path = default_out
    if args.out is not None:
        out = args.out / default_out.name if args.out.is_dir() else args.out
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: the folder {out.parent} does not exist")
    inputs = [*(paths or {}).values(), *([image] if image else []), *([label] if label else [])]
    if any(out.resolve() == p.resolve() for p in inputs):
        raise InputError(f"the output {out} is one of the inputs; choose another --out")
    return _Job(paths=paths, image=image, label=label, out=out)


def _fmt(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_summary(summary: Mapping[str, Any], *, tta: bool = False) -> str:
    """A few lines for a person: model, geometry, volumes, scores when present, timings."""
    lines = [
        f"model     {summary.get('model')} ({summary.get('model_sha256')}) on {summary.get('provider')}"
        + (", TTA" if tta else "")
    ]
    shape, spacing = summary.get("shape"), summary.get("spacing_mm")
    if shape:
        lines.append(
            "volume    " + "x".join(str(s) for s in shape)
            + (" voxels of " + "x".join(f"{s:g}" for s in spacing) + " mm" if spacing else "")
        )
    series = summary.get("series") or {}
    if series:
        lines.append("series    " + "  ".join(f"{k} {v!r}" for k, v in series.items()))
    volumes = summary.get("volumes_ml") or {}
    if volumes:
        lines.append("ml        " + "  ".join(f"{k} {_fmt(v, 2)}" for k, v in volumes.items()))
    for key, title, digits in (("dice", "dice", 3), ("hd95_mm", "hd95 mm", 2)):
        scores = summary.get(key)
        if scores:
            lines.append(f"{title:<10}" + "  ".join(f"{k} {_fmt(v, digits)}" for k, v in scores.items()))
    timing = summary.get("timing_ms") or {}
    if timing:
        steps = ", ".join(f"{k} {v:.0f}" for k, v in timing.items() if k != "total" and v is not None)
        total = timing.get("total")
        lines.append(f"time ms   {_fmt(total, 0)}" + (f" ({steps})" if steps else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 done, 1 service error, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        job = _job(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("BRATS_API_KEY") or None
    progress = False if args.no_progress else None
    try:
        with SegmentationClient(args.url, api_key=api_key, timeout=args.timeout, progress=progress) as client:
            result = client.segment(job.paths, image=job.image, dicom=job.dicom, label=job.label, model=args.model,
                                    tta=args.tta, postprocess=not args.no_postprocess,
                                    format="dicom-seg" if args.dicom_seg else "nifti")
    except ServiceError as err:
        status = f"{err.status} " if err.status else ""
        retry = f" (retry after {err.retry_after} s)" if err.retry_after else ""
        where = f" (request id {err.request_id})" if err.request_id else ""
        print(f"error: {status}{err.detail}{retry}{where}", file=sys.stderr)
        return 1
    try:
        result.save(job.out)
    except OSError as err:
        print(f"error: cannot write {job.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**result.summary, "mask_path": str(job.out)}, indent=2))
    else:
        print(format_summary(result.summary, tta=args.tta))
        print(f"mask      {job.out}")
    return 0


def run() -> NoReturn:
    """:func:`main` as a program: exit with its status (130 on Ctrl-C)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
