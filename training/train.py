"""Training loop: patches from the preprocessed cache, Dice + BCE on regions, sliding-window validation.

Runs on one device, or on several processes under ``torchrun`` (DistributedDataParallel; NCCL on CUDA,
gloo on CPU). Rank 0 validates, logs and writes checkpoints; every epoch ends with a checkpoint so that
``--resume`` continues where a run stopped.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from service.core.labels import MODALITIES, REGION_NAMES, labels_to_regions, regions_to_labels
from service.core.scoring import dice
from service.inference.card import OutputSpec
from service.inference.engine import Engine
from training.data.augment import Augmenter
from training.data.cache import load_cached
from training.data.manifest import read_cache_kinds
from training.data.split import split_cases
from training.data.sampler import PatchSampler
from training.losses import dice_bce_loss
from training.networks import build_network

log = logging.getLogger(__name__)

CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"


@dataclass
class TrainConfig:
    """Everything a run needs; saved in every checkpoint and in the model card."""

    cache: str
    out: str
    architecture: str = "unet"
    spatial_dims: int = 3
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    patch_size: tuple[int, ...] = (128, 128, 128)
    batch_size: int = 2
    epochs: int = 300
    iterations: int = 250
    lr: float = 1e-3
    weight_decay: float = 1e-5
    schedule: str = "poly"
    amp: str = "auto"
    val_fraction: float = 0.2
    val_interval: int = 10
    val_max_cases: int = 0
    overlap: float = 0.5
    foreground_fraction: float = 1 / 3
    augment: bool = True
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    data_description: str = ""
    synthetic: bool = False
    git_commit: str = ""

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"--patch-size needs {self.spatial_dims} values for a {self.spatial_dims}D model, "
                             f"got {list(self.patch_size)}")
        if self.schedule not in ("poly", "cosine"):
            raise ValueError(f"--schedule must be 'poly' or 'cosine', got {self.schedule!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"--amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"--overlap must be in [0, 1), got {self.overlap}")
        for name in ("batch_size", "epochs", "iterations", "val_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("val_max_cases", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        divisor = 2 ** (len(self.channels) - 1)
        if any(p % divisor for p in self.patch_size):
            raise ValueError(f"--patch-size {list(self.patch_size)} must be a multiple of {divisor} on every axis "
                             f"for {len(self.channels)} levels (--channels)")

    @property
    def network_kwargs(self) -> dict:
        return {"spatial_dims": self.spatial_dims, "in_channels": 4, "out_channels": 3, "channels": list(self.channels)}


# --------------------------------------------------------------------------------------------- set-up


@dataclass
class Runtime:
    """Where and how this process computes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def _init_runtime(config: TrainConfig) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and device.index is None:  # one GPU per process under torchrun
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world_size > 1 and not dist.is_initialized():
        # Rank 0 validates while the others wait at a barrier: allow for a long validation.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=3))
    return Runtime(device=device, rank=rank, world_size=world_size, amp_dtype=_amp_dtype(config.amp, device))


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision where the device supports it: bf16 on CUDA (fp16 on old GPUs) and on AMX CPUs."""
    if amp == "off":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA device; on a CPU use --amp bf16 or off")
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if amx else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _PatchStream(torch.utils.data.IterableDataset):
    """Endless (image, regions) patches for one epoch, seeded by (seed, rank, epoch, worker)."""

    def __init__(self, cases, config: TrainConfig, seed: int) -> None:
        self.cases, self.config, self.seed = cases, config, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        seed = self.seed * 100 + (info.id if info else 0)
        sampler = PatchSampler(self.cases, patch_size=self.config.patch_size,
                               foreground_fraction=self.config.foreground_fraction, seed=seed)
        augment = Augmenter(spatial_dims=self.config.spatial_dims, seed=seed + 1) if self.config.augment else None
        for image, label in sampler:
            if augment is not None:
                image, label = augment(image, label)
            yield (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                   torch.from_numpy(labels_to_regions(label).astype(np.float32)))


def _lr_factor(schedule: str, step: int, total: int) -> float:
    progress = min(step / max(total, 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** 0.9


# --------------------------------------------------------------------------------------------- validation


class TorchModel:
    """A network in the shape of the service's ``OnnxModel``, so validation runs through the shared Engine."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, runtime: Runtime) -> None:
        self.model, self.runtime = model, runtime
        self.spatial_dims = config.spatial_dims
        self.sha256 = ""
        self.card = SimpleNamespace(name=config.architecture, in_channels=4, modalities=MODALITIES,
                                    output=OutputSpec(), patch_size=tuple(config.patch_size))

    @torch.no_grad()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.runtime.autocast():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch)).to(self.runtime.device))
        return out.float().cpu().numpy()


def validate(model: torch.nn.Module, cases, config: TrainConfig, runtime: Runtime) -> dict[str, float]:
    """Mean Dice per region over cached ``cases`` through the sliding window, as inference sees them."""
    model.eval()
    engine = Engine([TorchModel(model, config, runtime)], overlap=config.overlap, batch_size=2)
    scores = {name: [] for name in REGION_NAMES}
    for case in cases:
        probs = engine.probabilities(np.asarray(case.image, dtype=np.float32))
        pred = labels_to_regions(regions_to_labels(probs))
        truth = labels_to_regions(np.asarray(case.label))
        for i, name in enumerate(REGION_NAMES):
            scores[name].append(dice(pred[i], truth[i]))
    model.train()
    return {name: float(np.mean(values)) for name, values in scores.items()}


# --------------------------------------------------------------------------------------------- the loop


def train(config: TrainConfig, *, resume: bool = False, command: str = "", stop_after: int | None = None) -> Path:
    """Train a network; returns the run folder holding checkpoints and ``log.csv``.

    Args:
        config: the run's settings.
        resume: continue the run in ``config.out`` from its last checkpoint.
        command: the command line, recorded in checkpoints and so in the model card.
        stop_after: stop after this many epochs of this call (for time-limited jobs; ``resume`` continues).
    """
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after must be at least 1, got {stop_after}")
    runtime = _init_runtime(config)
    out = Path(config.out)
    try:
        result = _train(config, runtime, out, resume=resume, command=command, stop_after=stop_after)
        if runtime.world_size > 1:
            dist.barrier()  # no rank tears its connections down while another still uses them
        return result
    finally:
        if runtime.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, runtime: Runtime, out: Path, *, resume: bool, command: str,
           stop_after: int | None) -> Path:
    _seed_everything(config.seed)
    cases = load_cached(config.cache)
    if not cases:
        raise ValueError(f"{config.cache}: no preprocessed cases; run `python -m training preprocess` first")
    by_id = {case.case_id: case for case in cases}
    labelled = [cid for cid, case in by_id.items() if case.label is not None]
    if not labelled:
        raise ValueError(f"{config.cache}: no case has a label; training needs labelled cases")
    if resume and (out / "split.json").is_file():  # the split a run started with stays its split
        split = json.loads((out / "split.json").read_text())
        train_ids, val_ids = split["train"], split["validation"]
        missing = sorted(set(train_ids + val_ids) - set(labelled))
        if missing:
            raise ValueError(f"{config.cache} lacks cases this run was trained on ({', '.join(missing[:5])}); "
                             "resume with the cache the run started with")
    else:
        train_ids, val_ids = split_cases(labelled, config.val_fraction, config.seed,
                                         kinds=read_cache_kinds(config.cache))
        if config.val_max_cases:
            val_ids = val_ids[: config.val_max_cases]
    train_cases = [by_id[i] for i in train_ids]
    val_cases = [by_id[i] for i in val_ids]

    model = build_network(config.architecture, **config.network_kwargs).to(runtime.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * config.iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(config.schedule, s, total_steps))
    scaler = torch.amp.GradScaler(enabled=runtime.amp_dtype == torch.float16 and runtime.device.type == "cuda")

    start_epoch, best = 0, -1.0
    if resume:
        state = load_checkpoint(out / CHECKPOINT_LAST, map_location=runtime.device)
        changed = config_changes(state["config"], config)
        if changed:
            raise ValueError(f"{out / CHECKPOINT_LAST} was trained with other settings ({'; '.join(changed)}); "
                             "resume with the options the run started with")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best = state["epoch"], state["best_dice"]
        if start_epoch >= config.epochs:
            log.info("run already finished %d epochs", start_epoch)
    elif (out / CHECKPOINT_LAST).exists():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    net = model
    if runtime.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)

    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "split.json").write_text(json.dumps({"train": train_ids, "validation": val_ids}, indent=1) + "\n")
        log.info("training %s on %d cases, validating on %d, %s, amp=%s, world size %d", config.architecture,
                 len(train_ids), len(val_ids), runtime.device, runtime.amp_dtype, runtime.world_size)
    log_path = out / "log.csv"
    fields = ["epoch", "train_loss", "lr", "seconds"] + [f"val_dice_{n}" for n in REGION_NAMES]

    last_epoch = config.epochs if stop_after is None else min(config.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, last_epoch):
        started = time.perf_counter()
        stream = _PatchStream(train_cases, config, seed=(config.seed * 1000 + epoch) * 64 + runtime.rank)
        loader = torch.utils.data.DataLoader(stream, batch_size=config.batch_size, num_workers=config.workers,
                                             pin_memory=runtime.device.type == "cuda")
        batches = iter(loader)
        losses = []
        bar = tqdm(range(config.iterations), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not runtime.is_main, dynamic_ncols=True)
        for _ in bar:
            image, target = next(batches)
            image, target = image.to(runtime.device, non_blocking=True), target.to(runtime.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with runtime.autocast():
                logits = net(image)
            loss = dice_bce_loss(logits, target)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"epoch {epoch + 1}: the loss became {value}; lower --lr or use --amp off")
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(value)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        del batches, loader

        row = {"epoch": epoch + 1, "train_loss": round(float(np.mean(losses)), 5),
               "lr": f"{scheduler.get_last_lr()[0]:.3g}", "seconds": round(time.perf_counter() - started, 1)}
        if runtime.is_main:
            is_last = epoch + 1 == config.epochs
            if val_cases and ((epoch + 1) % config.val_interval == 0 or is_last):
                dice = validate(model, val_cases, config, runtime)
                row.update({f"val_dice_{n}": round(v, 4) for n, v in dice.items()})
                mean = float(np.mean(list(dice.values())))
                if mean > best:
                    best = mean
                    save_checkpoint(out / CHECKPOINT_BEST, model, optimizer, scheduler, scaler, epoch + 1, best, config, command, runtime)
            _append_csv(log_path, fields, row)
            save_checkpoint(out / CHECKPOINT_LAST, model, optimizer, scheduler, scaler, epoch + 1, best, config, command, runtime)
            tqdm.write(" ".join(f"{k}={v}" for k, v in row.items()))
        if runtime.world_size > 1:
            dist.barrier()

    if runtime.world_size > 1:
        _check_ranks_agree(model)
    if runtime.is_main and last_epoch == config.epochs and not (out / CHECKPOINT_BEST).exists():  # no validation cases: the last is the best
        (out / CHECKPOINT_BEST).write_bytes((out / CHECKPOINT_LAST).read_bytes())
    return out


# Settings that may differ when a run is resumed: where things are, how fast, and how long.
RESUMABLE_CHANGES = {"cache", "out", "device", "workers", "val_interval", "git_commit", "epochs"}


def config_changes(saved: dict, config: TrainConfig) -> list[str]:
    """The settings (other than :data:`RESUMABLE_CHANGES`) that differ between a checkpoint and ``config``."""
    current = asdict(config)
    changes = []
    for key, value in current.items():
        old = saved.get(key)
        if key in RESUMABLE_CHANGES:
            continue
        if (list(old) if isinstance(old, (list, tuple)) else old) != (list(value) if isinstance(value, (list, tuple)) else value):
            changes.append(f"{key} {old} -> {value}")
    return changes


def _check_ranks_agree(model: torch.nn.Module) -> None:
    """DistributedDataParallel keeps replicas identical; a divergence would be a bug worth stopping on."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).cpu()
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.allclose(low, high, rtol=1e-9, atol=0):
        raise RuntimeError(f"replicas diverged across ranks (parameter checksums {low.item()} .. {high.item()})")


def _append_csv(path: Path, fields: list[str], row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def save_checkpoint(path: Path, model, optimizer, scheduler, scaler, epoch: int, best: float,
                    config: TrainConfig, command: str, runtime: Runtime) -> None:
    """Write a checkpoint atomically (temporary file, then rename)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best_dice": best,
        "config": asdict(config),
        "network": {"architecture": config.architecture, "kwargs": config.network_kwargs},
        "command": command,
        "world_size": runtime.world_size,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; a clear error if it is missing or foreign."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no checkpoint there; train first or point to checkpoint_last.pt/checkpoint_best.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise ValueError(f"{path}: not a readable checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or "network" not in state or "model" not in state:
        raise ValueError(f"{path}: not a checkpoint written by this trainer")
    return state
