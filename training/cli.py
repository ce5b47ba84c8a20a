"""``python -m training``: synthesise data, preprocess, train, export, evaluate and learn postprocessing.

Every command stops on bad input with one line naming the case or file and the problem (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.inference.backends import BackendOptions

DEFAULTS_3D = {"patch_size": (128, 128, 128), "channels": (16, 32, 64, 128, 256)}


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 128,128,128, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 128,128,128, got {text!r}")
    return values


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,1,1, got {text!r}") from None
    if len(values) != 3 or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected three positive numbers like 1,1,1, got {text!r}")
    return values


def git_commit() -> str:
    """The commit the code runs from (with ``-dirty`` when the tree has changes), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        type=str.upper, help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write synthetic BraTS-like cases (BraTS 2020 or MSD layout)")
    p.add_argument("out", type=Path, help="folder to write into (the layout's top folder is created inside)")
    p.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    p.add_argument("--seed", type=int, default=0, help="base seed; case i uses a seed derived from it (default 0)")
    p.add_argument("--start-index", type=int, default=1, help="number of the first case, BraTS20_Training_NNN (default 1)")
    p.add_argument("--layout", choices=("brats2020", "msd"), default="brats2020", help="on-disk layout (default brats2020)")
    p.add_argument("--size", type=_ints, default=(240, 240, 155), help="grid size X,Y,Z (default 240,240,155)")
    p.add_argument("--spacing", type=_floats, default=(1.0, 1.0, 1.0), help="voxel size in mm (default 1,1,1)")
    p.add_argument("--format", choices=("nifti", "dicom", "both"), default="nifti",
                   help="nifti: the cases only (default); dicom or both: the cases (they hold the labels) and a "
                        "DICOM MR study per case in OUT/dicom/CASE_ID/<modality>/")

    p = sub.add_parser("preprocess", help="crop, normalise and cache cases for training")
    p.add_argument("data", type=Path, help="a BraTS 2020 or MSD Task01 folder (or a folder holding one)")
    p.add_argument("cache", type=Path, help="cache folder to write")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")

    p = sub.add_parser("train", help="train a network on a preprocessed cache")
    p.add_argument("--cache", type=Path, required=True, help="folder written by `preprocess`")
    p.add_argument("--out", type=Path, required=True, help="run folder for checkpoints and log.csv")
    p.add_argument("--arch", choices=("unet", "resunet"), default="unet", help="network (default unet)")
    p.add_argument("--spatial-dims", type=int, choices=(2, 3), default=3, help="2D (axial slices) or 3D (default 3)")
    p.add_argument("--channels", type=_ints, default=DEFAULTS_3D["channels"],
                   help="widths per level (default 16,32,64,128,256)")
    p.add_argument("--patch-size", type=_ints, default=None, help="patch size (default 128,128,128; 2D: 192,192)")
    p.add_argument("--batch-size", type=int, default=2, help="patches per step, per process (default 2)")
    p.add_argument("--epochs", type=int, default=300, help="epochs (default 300)")
    p.add_argument("--iterations", type=int, default=250, help="steps per epoch (default 250)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW weight decay (default 1e-5)")
    p.add_argument("--schedule", choices=("poly", "cosine"), default="poly", help="learning-rate schedule (default poly)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision (default auto: bf16 on GPUs that have it, else fp16; bf16 on CPUs with "
                        "AMX, else off); fp16 only on CUDA")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out for validation (default 0.2)")
    p.add_argument("--val-interval", type=int, default=10, help="validate every N epochs and after the last (default 10)")
    p.add_argument("--val-max-cases", type=int, default=0, help="validate on at most N held-out cases (default 0: all)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in validation (default 0.5)")
    p.add_argument("--no-augment", action="store_true", help="turn data augmentation off")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoint_last.pt")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after N epochs of this call, for time-limited jobs; continue with --resume")

    p = sub.add_parser("export", help="export a checkpoint to ONNX with its model card")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint_best.pt or checkpoint_last.pt")
    p.add_argument("--name", required=True, help="model name: writes MODELS_DIR/NAME.onnx and NAME.json")
    p.add_argument("--models-dir", type=Path, default=Path("models"), help="output folder (default models)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default 17)")

    p = sub.add_parser("evaluate", help="Dice and HD95 of ONNX model(s) on labelled cases, through ONNX Runtime")
    p.add_argument("--model", type=Path, action="append", required=True,
                   help="NAME.onnx (repeat for an ensemble)")
    p.add_argument("--data", type=Path, required=True, help="folder of labelled cases (BraTS 2020 or MSD layout)")
    p.add_argument("--out", type=Path, required=True, help="folder for cases.csv and summary.json")
    p.add_argument("--max-cases", type=int, default=0, help="evaluate at most N cases (0: all)")
    _add_inference_options(p)
    p.add_argument("--update-card", action="store_true",
                   help="write the result into the model card's `validation` (single model only)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="score the raw labels, without the postprocessing rules of the model cards")

    p = sub.add_parser(
        "learn-postprocessing",
        help="learn connected-component and ET->NCR rules on validation cases, write them into the model card",
        description="Segment the validation cases with postprocessing off, then decide for WT, TC and ET in turn "
                    "whether keeping only the largest component or removing components below a size (ml) raises "
                    "that region's mean Dice, and the ET volume below which all ET becomes NCR; the rules go into "
                    "the card's `postprocessing` (NAME.json; the ONNX file is unchanged). The service and "
                    "`evaluate` apply them.",
    )
    p.add_argument("--model", type=Path, required=True, help="NAME.onnx; its NAME.json gets `postprocessing`")
    p.add_argument("--data", type=Path, required=True, help="folder of labelled cases (BraTS 2020 or MSD layout)")
    p.add_argument("--split", type=Path, default=None,
                   help="split.json of the training run: learn on its `validation` cases (default: every "
                        "labelled case in --data)")
    _add_inference_options(p)
    return parser


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    """How `evaluate` and `learn-postprocessing` run the models: the service's engine and backends."""
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per network call (default 1)")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    p.add_argument("--backend", choices=["onnxruntime", "openvino"], default="onnxruntime",
                   help="what runs the models (default onnxruntime, what model cards record)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 needs --backend openvino on a CPU with AMX or AVX512-BF16 (default fp32)")


def _backend_options(args: argparse.Namespace) -> BackendOptions:
    """The backend options of `evaluate` and `learn-postprocessing`, built once from their command line."""
    from service.inference.backends import BackendOptions

    return BackendOptions(backend=args.backend, precision=args.precision, threads=args.threads,
                          batch_size=args.batch_size)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = "python -m training " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        return COMMANDS[args.command](args, command)
    except KeyboardInterrupt:
        print("interrupted; completed outputs are kept, partial ones were not written", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, FloatingPointError) as exc:  # RuntimeError: export parity, DDP
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


def _synth(args, command: str) -> int:
    from training.data.synthetic import generate_dataset

    if args.cases < 1:
        raise ValueError(f"--cases must be at least 1, got {args.cases}")
    if len(args.size) != 3:
        raise ValueError(f"--size needs three values X,Y,Z, got {list(args.size)}")
    paths = generate_dataset(args.out, args.cases, seed=args.seed, layout=args.layout, size=args.size,
                             spacing=args.spacing, start_index=args.start_index, progress=True)
    print(f"wrote {len(paths)} synthetic cases under {args.out}")
    if args.format != "nifti":
        from training.data.synthetic.dicom_study import write_dicom_study

        for path in paths:
            write_dicom_study(path, args.out / "dicom")
        print(f"wrote {len(paths)} DICOM studies under {args.out / 'dicom'}")
    return 0


def _preprocess(args, command: str) -> int:
    from training.data.cache import preprocess_dataset
    from training.data.provenance import carry_marker
    from service.core.datasets import find_cases

    from training.data.manifest import write_cache_kinds

    cases = find_cases(args.data)
    carry_marker(args.data, args.cache)
    written = preprocess_dataset(cases, args.cache, progress=True, workers=args.workers)
    kinds = write_cache_kinds(args.data, args.cache)
    print(f"cached {len(written)} cases in {args.cache}" + (f" ({len(set(kinds.values()))} case kinds, for a "
          "stratified validation split)" if kinds else ""))
    return 0


def _train(args, command: str) -> int:
    from training.data.provenance import is_synthetic_cache
    from training.train import TrainConfig, train

    patch = args.patch_size or ((128, 128, 128) if args.spatial_dims == 3 else (192, 192))
    synthetic = is_synthetic_cache(args.cache)
    config = TrainConfig(
        cache=str(args.cache), out=str(args.out), architecture=args.arch, spatial_dims=args.spatial_dims,
        channels=args.channels, patch_size=patch, batch_size=args.batch_size, epochs=args.epochs,
        iterations=args.iterations, lr=args.lr, schedule=args.schedule, amp=args.amp,
        val_fraction=args.val_fraction, val_interval=args.val_interval, val_max_cases=args.val_max_cases,
        overlap=args.overlap, augment=not args.no_augment, workers=args.workers, seed=args.seed,
        device=args.device, synthetic=synthetic, weight_decay=args.weight_decay, git_commit=git_commit(),
        data_description=("synthetic BraTS-like cases (python -m training synth)" if synthetic
                          else f"cases preprocessed in {args.cache}"),
    )
    out = train(config, resume=args.resume, command=command, stop_after=args.stop_after)
    print(f"checkpoints and log.csv in {out}")
    return 0


def _export(args, command: str) -> int:
    from training.export import card_for, export_onnx
    from training.networks import build_network, count_parameters
    from training.train import load_checkpoint

    state = load_checkpoint(args.checkpoint)
    config = state["config"]
    network = state["network"]
    model = build_network(network["architecture"], **network["kwargs"])
    model.load_state_dict(state["model"])
    training = {
        "data": config["data_description"],
        "synthetic": bool(config["synthetic"]),
        "epochs": state["epoch"],
        "iterations_per_epoch": config["iterations"],
        "batch_size": config["batch_size"],
        "world_size": state.get("world_size", 1),
        "best_validation_dice_mean": round(float(state["best_dice"]), 4),
        "command": state["command"],
        "git_commit": config.get("git_commit") or "unknown",
        "export_command": command,
        "export_git_commit": git_commit(),
    }
    if config["synthetic"]:
        training["note"] = ("Trained only on synthetic BraTS-like data generated by this project. "
                            "A demonstration model: not for clinical use.")
    card = card_for(args.name, network["architecture"], network["kwargs"], config["spatial_dims"],
                    tuple(config["patch_size"]), count_parameters(model), training, args.opset)
    args.models_dir.mkdir(parents=True, exist_ok=True)
    card = export_onnx(model, args.models_dir / f"{args.name}.onnx", card=card, opset=args.opset)
    print(f"wrote {args.models_dir / (args.name + '.onnx')} (sha256 {card.sha256[:12]}) and its card")
    return 0


def _evaluate(args, command: str) -> int:
    from training.evaluate import card_validation, evaluate
    from training.export import update_card

    if args.max_cases < 0:
        raise ValueError(f"--max-cases must be 0 or more, got {args.max_cases}")
    if args.update_card and len(args.model) != 1:
        raise ValueError("--update-card takes exactly one --model (an ensemble has no card of its own)")
    if args.update_card and (args.backend, args.precision) != ("onnxruntime", "fp32"):
        raise ValueError("--update-card records ONNX Runtime fp32 figures; leave out --backend and --precision")
    summary = evaluate(args.model, args.data, args.out, options=_backend_options(args), tta=args.tta,
                       overlap=args.overlap, max_cases=args.max_cases, postprocess=not args.no_postprocess)
    print(json.dumps({k: summary[k] for k in ("cases", "dice", "hd95_mm", "seconds_per_case", "postprocess")}))
    if args.update_card:
        update_card(args.model[0], validation=card_validation(summary))
        print(f"validation written into the card of {args.model[0]}")
    return 0


def _learn_postprocessing(args, command: str) -> int:
    from training.postprocessing import describe, learn_for_model

    _, learned = learn_for_model(args.model, args.data, split=args.split, options=_backend_options(args),
                                 tta=args.tta, overlap=args.overlap, command=command)
    before = " ".join(f"{r} {v:.4f}" for r, v in learned.dice_before.items())
    after = " ".join(f"{r} {v:.4f}" for r, v in learned.dice_after.items())
    print(f"learned on {learned.cases} cases: {describe(learned.rules)}")
    print(f"mean Dice before: {before}; after: {after}")
    print(f"postprocessing written into {args.model.with_suffix('.json')}")
    return 0


COMMANDS = {"synth": _synth, "preprocess": _preprocess, "train": _train, "export": _export, "evaluate": _evaluate,
            "learn-postprocessing": _learn_postprocessing}
