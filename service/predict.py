"""``python -m service.predict INPUT OUTPUT``: segment every case of a folder, the model loaded once.

``INPUT`` is any layout :func:`service.core.datasets.find_cases` knows (BraTS 2020/2021/2023, MSD Task01), a
folder of 4D files ``(X, Y, Z, 4)``, or a folder of DICOM studies (:mod:`service.predict_dicom`; with
``--dicom-seg`` each gives ``CASE_seg.dcm``). For each case it writes ``OUTPUT/CASE.nii.gz`` (atomically: a mask
is whole or absent) and a row of ``results.csv`` (``results-partI-of-N.csv`` with ``--num-parts``): the status,
the volume per region and, where the case has a label, Dice and HD95. A case whose mask exists is not
segmented again (rerun to resume; its row is measured from the mask). One case that fails is reported in its row
and the run goes on; the exit status is 0 when every case of the part succeeded, 1 otherwise, 2 for bad
arguments. ``--num-parts N --part-id I`` takes every N-th case from the I-th (Slurm or Kubernetes job arrays).
``--url URL[,URL...]`` sends the cases to running services instead, one at a time per URL, retrying while a
service answers 503 (after its ``Retry-After``). Torch-free: it needs only what the service needs.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from service.core.datasets import Case, DataError, find_cases, read_label, read_scan
from service.core.files import atomic_write
from service.core.geometry import Geometry
from service.core.labels import REGION_NAMES, brats2023_to_brats, to_label_convention
from service.core.nifti import NiftiError, load_label
from service.core.nifti_write import save_mask
from service.core.scan import ScanError
from service.core.scoring import region_metrics, volumes_ml
from service.predict_dicom import DicomStudy, find_studies, output_name, segment_study
from service.settings import DEFAULT_MODELS_DIR

VOLUME_KEYS = ("WT", "TC", "ET", "NCR", "ED")
FIELDS = ("case", "status", "seconds", *(f"{k}_ml" for k in VOLUME_KEYS), *(f"dice_{r}" for r in REGION_NAMES),
          *(f"hd95_{r}" for r in REGION_NAMES), "error")
RETRY_LIMIT_S = 3600.0
"""Longest a case waits in total for a busy service (503) before it counts as failed."""


class UsageError(ValueError):
    """Bad arguments (exit status 2)."""


@dataclass(frozen=True)
class Outcome:
    labels: np.ndarray  # BraTS 2020 values on the case's grid
    geometry: object
    volumes: dict[str, float]
    metrics: dict | None
    seconds: float


# ------------------------------------------------------------------------------------------- cases
def list_cases(root: Path) -> list[Case | DicomStudy]:
    """The cases of ``root``: a known layout, else every ``.nii``/``.nii.gz`` directly in it as a 4D case, else
    its DICOM studies (:func:`service.predict_dicom.find_studies`)."""
    try:
        return find_cases(root)
    except DataError as err:
        files = sorted(p for p in root.iterdir() if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")))
        if files:
            return [Case(case_id=p.name.removesuffix(".gz").removesuffix(".nii"), image4d=p) for p in files]
        studies = find_studies(root)
        if not studies:
            raise UsageError(f"{err}; or give a folder of 4D files (X, Y, Z, 4), or of DICOM studies (subfolders "
                             "or zips)") from None
        return studies


def shard(cases: Sequence[Case | DicomStudy], num_parts: int, part_id: int) -> list[Case | DicomStudy]:
    """Every ``num_parts``-th case from the ``part_id``-th, by case id: the parts cover each case exactly once."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise UsageError(f"--part-id must be in 0..{num_parts - 1} and --num-parts at least 1")
    return sorted(cases, key=lambda c: c.case_id)[part_id::num_parts]


def _measure(labels: np.ndarray, zooms, case: Case, seconds: float, geometry) -> Outcome:
    """The volumes of ``labels`` and, where the case has a label (read alone, not the images), their scores."""
    truth = read_label(case)
    metrics = None if truth is None else region_metrics(labels, truth[0], zooms)
    return Outcome(labels, geometry, volumes_ml(labels, zooms), metrics, seconds)


# ------------------------------------------------------------------------------------------- segmenters
class LocalSegmenter:
    """The model (or ensemble) loaded once in this process, run through the service's pipeline."""

    def __init__(self, args: argparse.Namespace) -> None:
        from service.catalogue import ENSEMBLE
        from service.inference.engine import Engine
        from service.inference.model import load_models
        from service.settings import Settings

        settings = Settings(models_dir=args.models_dir, threads=args.threads, backend=args.backend,
                            precision=args.precision)
        models = load_models(settings.models_dir, settings.backend_options())
        if args.model == ENSEMBLE:
            chosen = list(models.values())
        elif args.model in models:
            chosen = [models[args.model]]
        else:
            raise UsageError(f"--model {args.model!r} is not in {settings.models_dir}; choose one of "
                             f"{', '.join(models)} or {ENSEMBLE}")
        self.engine = Engine(chosen, overlap=settings.overlap, batch_size=settings.batch_size)
        self.tta, self.postprocess = args.tta, not args.no_postprocess
        self.workers = 1

    def __call__(self, case: Case, worker: int) -> Outcome:
        from service.inference.pipeline import segment_scan

        start = time.perf_counter()
        scan = read_scan(case)
        outcome = segment_scan(scan, self.engine, tta=self.tta, postprocess=self.postprocess)
        return Outcome(outcome.labels, scan.geometry, outcome.volumes_ml, outcome.metrics,
                       time.perf_counter() - start)


class RemoteSegmenter:
    """Running services: one case at a time per URL; a busy service (503) is asked again after its Retry-After."""

    def __init__(self, args: argparse.Namespace) -> None:
        from service.client import SegmentationClient

        self.urls = [u.strip() for u in args.url.split(",") if u.strip()]
        if not self.urls:
            raise UsageError("--url needs at least one URL")
        key = args.api_key or os.environ.get("BRATS_API_KEY") or None
        self.clients = [SegmentationClient(url, api_key=key, progress=False) for url in self.urls]
        self.model, self.tta, self.postprocess = args.model, args.tta, not args.no_postprocess
        self.workers = len(self.urls)

    def __call__(self, case: Case, worker: int) -> Outcome:
        from service.client import segment_when_free

        client = self.clients[worker % len(self.clients)]
        parts = {"paths": dict(case.images)} if case.images is not None else {"image": case.image4d}
        start = time.perf_counter()
        result = segment_when_free(client, patience_s=RETRY_LIMIT_S, **parts, model=self.model, tta=self.tta,
                                   postprocess=self.postprocess)
        mask, geometry = _decode(result.mask)
        return _measure(mask, geometry.zooms, case, time.perf_counter() - start, geometry)

    def close(self) -> None:
        for client in self.clients:
            client.close()


def _decode(data: bytes) -> tuple[np.ndarray, Geometry]:
    """The labels and geometry of a mask a service answered (``.nii.gz`` bytes), decoded in memory."""
    import gzip

    import nibabel as nib

    image = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    return np.asarray(image.dataobj, dtype=np.uint8), Geometry.from_header(image.header)


# ------------------------------------------------------------------------------------------- the run
def _row(case: Case, status: str, outcome: Outcome | None = None, error: str = "") -> dict:
    row = {field: "" for field in FIELDS}
    row.update(case=case.case_id, status=status, error=error)
    if outcome is not None:
        row["seconds"] = round(outcome.seconds, 2)
        row.update({f"{k}_ml": round(outcome.volumes[k], 3) for k in VOLUME_KEYS})
        if outcome.metrics is not None:
            for r in REGION_NAMES:
                row[f"dice_{r}"] = round(outcome.metrics["dice"][r], 5)
                hd = outcome.metrics["hd95_mm"][r]
                row[f"hd95_{r}"] = "" if hd is None else round(hd, 3)
    return row


def _write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["case"]))
    atomic_write(path, buffer.getvalue().encode())


def _done(case: Case, mask_path: Path, convention: str) -> Outcome:
    """A case segmented by an earlier run: its row measured from the mask on disk."""
    labels, geometry = load_label(mask_path, valid=(0, 1, 2, 3, 4))
    if convention == "brats2023":
        labels = brats2023_to_brats(labels)
    return _measure(labels, geometry.zooms, case, 0.0, geometry)


def run(args: argparse.Namespace, segmenter_factory: Callable[[argparse.Namespace], object]) -> int:
    from tqdm import tqdm

    cases = shard(list_cases(args.input), args.num_parts, args.part_id)
    args.output.mkdir(parents=True, exist_ok=True)
    name = "results.csv" if args.num_parts == 1 else f"results-part{args.part_id}-of-{args.num_parts}.csv"
    results = args.output / name
    def target(case) -> Path:
        return args.output / (output_name(case.case_id, args.dicom_seg) if isinstance(case, DicomStudy)
                              else f"{case.case_id}.nii.gz")

    todo = [c for c in cases if not target(c).exists()]
    rows = []
    for case in cases:
        if case not in todo:
            if target(case).suffix == ".dcm":  # a DICOM Segmentation: its volumes are in the earlier row
                rows.append(_row(case, "skipped (done before)"))
                continue
            try:
                rows.append(_row(case, "skipped (done before)", _done(case, target(case), args.label_convention)))
            except (DataError, ScanError, NiftiError) as err:
                rows.append(_row(case, "failed", error=f"the existing mask cannot be read: {err}"))
    segmenter = segmenter_factory(args) if todo else None
    bar = tqdm(total=len(todo), desc=f"segment (part {args.part_id + 1}/{args.num_parts})", unit="case",
               disable=args.quiet, dynamic_ncols=True)

    def one(index_case: tuple[int, Case]) -> dict:
        index, case = index_case
        try:
            if isinstance(case, DicomStudy):
                remote = getattr(segmenter, "clients", None)
                outcome = segment_study(case, target(case), dicom_seg=args.dicom_seg, model=args.model,
                                        engine=getattr(segmenter, "engine", None), tta=args.tta,
                                        client=remote[index % len(remote)] if remote else None,
                                        postprocess=not args.no_postprocess)
                return _row(case, "ok", outcome)
            outcome = segmenter(case, index % segmenter.workers)
            labels = to_label_convention(outcome.labels, args.label_convention)
            save_mask(labels, outcome.geometry, args.output / f"{case.case_id}.nii.gz")
            return _row(case, "ok", outcome)
        except Exception as err:  # noqa: BLE001 - one failing case is reported and the run goes on
            return _row(case, "failed", error=str(err).replace("\n", " ")[:500])

    try:
        if todo:
            with ThreadPoolExecutor(max_workers=segmenter.workers) as pool:
                for row in pool.map(one, enumerate(todo)):
                    rows.append(row)
                    bar.update(1)
                    bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows))
                    _write_csv(results, rows)  # a run stopped midway keeps the rows of its finished cases
    finally:
        bar.close()
        if hasattr(segmenter, "close"):
            segmenter.close()
    _write_csv(results, rows)
    failed = [r for r in rows if r["status"] == "failed"]
    scored = [r for r in rows if r["dice_WT"] != ""]
    segmented = sum(r["status"] == "ok" for r in rows)
    print(f"{len(cases)} case(s) in this part: {segmented} segmented, {len(cases) - len(todo)} already done, "
          f"{len(failed)} failed; masks and {name} in {args.output}")
    if scored:
        means = ", ".join(f"{r} {np.mean([float(x[f'dice_{r}']) for x in scored]):.3f}" for r in REGION_NAMES)
        print(f"mean Dice over {len(scored)} labelled case(s): {means}")
    for row in failed:
        print(f"failed: {row['case']}: {row['error']}", file=sys.stderr)
    return 0 if not failed else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.predict", description=__doc__.splitlines()[0])
    p.add_argument("input", type=Path, help="a dataset folder (BraTS 2020/2021/2023, MSD) or a folder of 4D files")
    p.add_argument("output", type=Path, help="where the masks and results.csv go (created if missing)")
    p.add_argument("--model", default="resunet", help="model name in --models-dir, or ensemble (default resunet)")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="folder of NAME.onnx + NAME.json (default $BRATS_MODELS_DIR, else models/)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation by mirroring (8x slower)")
    p.add_argument("--no-postprocess", action="store_true", help="the raw masks, without the card's rules")
    p.add_argument("--label-convention", choices=("brats2020", "brats2023"), default="brats2020",
                   help="values of the written masks: brats2020 (ET = 4, default) or brats2023 (ET = 3)")
    p.add_argument("--dicom-seg", action="store_true",
                   help="DICOM studies only: write CASE_seg.dcm, a DICOM Segmentation, instead of CASE.nii.gz")
    p.add_argument("--num-parts", type=int, default=1, help="split the cases into this many parts (default 1)")
    p.add_argument("--part-id", type=int, default=0, help="the part to run, 0..num-parts-1 (default 0)")
    p.add_argument("--url", default=None, help="URL[,URL...] of running services to send the cases to")
    p.add_argument("--api-key", default=None, help="for --url (default: $BRATS_API_KEY)")
    p.add_argument("--threads", type=int, default=None, help="inference threads in this process (default: all)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "openvino"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if not args.input.is_dir():
            raise UsageError(f"{args.input} is not a folder")
        if args.models_dir is None:  # BRATS_MODELS_DIR as for the service, else models/ of the project
            args.models_dir = Path(os.environ.get("BRATS_MODELS_DIR") or DEFAULT_MODELS_DIR)
        factory = RemoteSegmenter if args.url else LocalSegmenter
        if args.dicom_seg and not all(isinstance(c, DicomStudy) for c in list_cases(args.input)):
            raise UsageError("--dicom-seg needs DICOM studies as input (a DICOM Segmentation refers to its images)")
        return run(args, factory)
    except (UsageError, DataError) as err:
        print(f"python -m service.predict: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # models that cannot be loaded
        print(f"python -m service.predict: {err}", file=sys.stderr)
        return 2


def entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    entry()
