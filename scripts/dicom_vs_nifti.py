"""Segment one case through the NIfTI path and through the DICOM path, and compare (docs/dicom.md).

``python scripts/dicom_vs_nifti.py DATA [--model models/resunet.onnx]`` where ``DATA`` was written by
``python -m training synth DATA --cases 1 --format dicom``: prints whether both paths give the same labels on
the same grid, the volumes, and the DICOM path's timings (reading the instances, inference, writing the SEG).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from service.core.labels import MODALITIES
from service.core.series_rules import load_rules
from service.inference.engine import Engine
from service.inference.model import OnnxModel
from service.inference.pipeline import segment_dicom, segment_files
from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/dicom_vs_nifti.py", description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="output folder of `python -m training synth ... --format dicom`")
    parser.add_argument("--model", type=Path, default=Path("models/resunet.onnx"))
    args = parser.parse_args(argv)
    cases = sorted(p for p in (args.data / "MICCAI_BraTS2020_TrainingData").glob("BraTS20_*") if p.is_dir())
    if not cases or not (args.data / "dicom" / cases[0].name).is_dir():
        print(f"error: {args.data} holds no case written with --format dicom", file=sys.stderr)
        return 2
    case = cases[0]
    engine = Engine([OnnxModel(args.model, Settings().backend_options())])
    files = {m: next(case.glob(f"{case.name}_{m}.nii*")) for m in MODALITIES}
    start = time.perf_counter()
    nifti = segment_files(files, engine, encode=False)
    nifti_s = time.perf_counter() - start
    instances = sorted((args.data / "dicom" / case.name).rglob("*.dcm"))
    start = time.perf_counter()
    dicom = segment_dicom(instances, engine, load_rules(None), encode="dicom-seg", model=args.model.stem,
                          software_version="check")
    dicom_s = time.perf_counter() - start
    same = np.array_equal(nifti.labels, dicom.labels) and np.allclose(nifti.geometry.affine, dicom.geometry.affine,
                                                                       atol=1e-4)
    print(f"case {case.name}, {len(instances)} DICOM instances, model {args.model.stem} on {engine.models[0].provider}")
    print(f"same labels on the same grid: {same}")
    print(f"volumes ml: NIfTI {nifti.volumes_ml} / DICOM {dicom.volumes_ml}")
    print(f"whole call: NIfTI path {nifti_s:.2f} s, DICOM path {dicom_s:.2f} s; DICOM timings ms "
          f"{ {k: round(v) for k, v in dicom.timings_ms.items()} } (postprocess includes writing the SEG, "
          f"{len(dicom.mask)} bytes)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
