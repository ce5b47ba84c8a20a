"""Exported models and the segmentation engine: preprocess, sliding window, sigmoid, ensemble and TTA.

A model is ``NAME.onnx`` with its card ``NAME.json`` beside it (:mod:`service.inference.card`). Loading
checks the card against the ONNX file (sha256, the card copy in its metadata, input rank and channels)
so that a model is never served with the wrong assumptions. A backend (:mod:`service.inference.backends`:
ONNX Runtime or OpenVINO) runs it.

2D models are served by the same sliding window as 3D ones, over the volume with a patch
``(px, py, 1)``: each tile is one axial slice (or an in-plane part of one), the depth axis of size 1 is
dropped before the network and restored after. Tiles along the slice axis do not overlap (a patch of one
voxel steps by one voxel), so ``batch_size`` tiles per call means ``batch_size`` slices per call whenever
the slice fits in one patch; larger slices are tiled in-plane with the usual overlap and Gaussian blend.

Test-time augmentation mirrors the input, predicts, mirrors the prediction back and averages. A 3D model
gets the 8 combinations of flips along the three axes (SPEC). A 2D model gets only the 4 combinations of the
two in-plane axes: it sees each slice on its own, so a flip along the slice axis gives back the prediction
without it (up to rounding), and the average over 8 would equal the average over these 4 at twice the cost.
In an ensemble each model gets its own flips.

Postprocessing learned on validation (the card's ``postprocessing``, :mod:`service.core.postprocess`) is
applied to the labels unless the caller turns it off; it needs the scan's voxel sizes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from service.core.labels import regions_to_labels
from service.core.postprocess import PostprocessingRules, apply_postprocessing, voxel_volume_ml
from service.core.preprocess import preprocess, uncrop
from service.inference.backends import (  # noqa: F401  (provider_list, session_options: part of this API)
    CUDNN_CONV_ALGO_SEARCH,
    DEFAULT_CUDNN_CONV_ALGO_SEARCH,
    DEFAULT_PROVIDERS,
    Backend,
    open_backend,
    provider_list,
    session_options,
)
from service.inference.card import ModelCard, card_path, file_sha256, read_card
from service.inference.tiling import sliding_window

logger = logging.getLogger(__name__)

# Card fields that change what inference does; these must agree between NAME.json and the ONNX metadata.
INFERENCE_FIELDS: tuple[str, ...] = (
    "architecture",
    "spatial_dims",
    "in_channels",
    "modalities",
    "patch_size",
    "network",
    "output",
    "normalization",
)


def sigmoid(x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Numerically stable logistic function: ``1 / (1 + e^-x)`` for ``x >= 0``, ``e^x / (1 + e^x)`` below.

    Never overflows (only ``exp(-|x|)`` in ``(0, 1]`` is computed).

    Args:
        x: logits, any shape.
        out: optional float32 array of the same shape to write into (may be ``x`` itself).

    Returns:
        float32 probabilities, ``out`` if given, else a new array.
    """
    x = np.asarray(x, dtype=np.float32)
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    elif out.shape != x.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {x.shape}, got {out.dtype} {out.shape}")
    negative = x < 0
    e = np.abs(x)
    np.negative(e, out=e)
    np.exp(e, out=e)  # e = exp(-|x|)
    np.add(e, 1.0, out=out)  # x may be out: its sign is kept in `negative`
    np.divide(e, out, out=e, where=negative)  # e^x / (1 + e^x) where x < 0
    np.reciprocal(out, out=out)  # 1 / (1 + e^-x)
    np.copyto(out, e, where=negative)
    return out


class OnnxModel:
    """One exported network, its validated card and the backend that runs it.

    Args:
        path: ``NAME.onnx``; its card ``NAME.json`` must lie beside it.
        backend: ``auto``, ``onnxruntime`` or ``openvino`` (see :func:`~service.inference.backends.open_backend`).
        precision: ``auto``, ``fp32`` or ``bf16`` (OpenVINO on a CPU with bf16 only).
        providers: ONNX Runtime execution providers in order of preference; default CUDA then CPU, whichever
            this build has. Naming one that it lacks is an error.
        intra_op_threads: threads per operator; ``None`` leaves the backend's default (all cores).
        cudnn_conv_algo_search: ``"HEURISTIC"`` (the default: no benchmark) or ``"EXHAUSTIVE"`` (benchmark
            once per input shape; the patch and batch are fixed, so this is paid on the first call), for CUDA.
        gpu_mem_limit: cap of the CUDA memory arena in bytes (``None``: no cap).
        batch_size: windows per call the backend prepares for (OpenVINO compiles for it).

    Raises:
        ValueError: naming the file, if the model or its card is missing or invalid, the card has no sha256
            (export the model again), the card's sha256 or its copy in the ONNX metadata disagree with the
            file, the network's input or output does not have the card's ``in_channels``, ``spatial_dims``
            (and ``patch_size``, where the dims are fixed), or the backend cannot run it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        backend: str = "auto",
        precision: str = "auto",
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = DEFAULT_CUDNN_CONV_ALGO_SEARCH,
        gpu_mem_limit: int | None = None,
        batch_size: int = 1,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: ONNX model not found")
        self.card: ModelCard = read_card(card_path(self.path))
        self.sha256 = file_sha256(self.path)
        if self.card.sha256 is None:
            raise ValueError(
                f"{self.path}: {card_path(self.path).name} has no sha256, so the file cannot be checked against "
                "its card; export the model again"
            )
        if self.card.sha256 != self.sha256:
            raise ValueError(
                f"{self.path}: sha256 {self.sha256[:12]} does not match {card_path(self.path).name} "
                f"({self.card.sha256[:12]}); the file changed after export, export it again"
            )
        try:
            self.runtime: Backend = open_backend(
                self.path,
                backend=backend,
                precision=precision,
                providers=providers,
                threads=intra_op_threads,
                cudnn_conv_algo_search=cudnn_conv_algo_search,
                gpu_mem_limit=gpu_mem_limit,
                patch_size=self.card.patch_size,
                batch_size=batch_size,
                in_channels=self.card.in_channels,
            )
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if message.startswith(str(self.path)) else f"{self.path}: {message}") from exc
        self._check_metadata()
        self._check_signature()
        logger.info(
            "loaded model %s (%s) on %s, %s", self.name, self.sha256[:12], self.provider, self.runtime.precision
        )

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def provider(self) -> str:
        """What really runs the model: the ONNX Runtime execution provider (it may fall back to the CPU), or
        ``OpenVINO CPU``."""
        return self.runtime.provider

    @property
    def backend(self) -> str:
        """``onnxruntime`` or ``openvino``."""
        return self.runtime.backend

    @property
    def device(self) -> str:
        """``CPU`` or ``GPU``."""
        return self.runtime.device

    @property
    def precision(self) -> str:
        """``fp32`` or ``bf16``: the precision the network really runs in."""
        return self.runtime.precision

    @property
    def spatial_dims(self) -> int:
        return self.card.spatial_dims

    def _check_metadata(self) -> None:
        props = self.runtime.metadata
        if not any(key in ModelCard.model_fields for key in props):
            logger.warning("%s: no model card in the ONNX metadata; trusting %s", self.path, card_path(self.path).name)
            return
        try:
            embedded = ModelCard.from_metadata(props)
        except ValueError as exc:
            raise ValueError(f"{self.path}: invalid model card in the ONNX metadata: {exc}") from None
        differ = [f for f in INFERENCE_FIELDS if getattr(embedded, f) != getattr(self.card, f)]
        if differ:
            raise ValueError(
                f"{self.path}: {card_path(self.path).name} disagrees with the card in the ONNX metadata on {differ}"
            )

    def _check_signature(self) -> None:
        card = self.card
        rank = 2 + card.spatial_dims
        inputs, outputs = self.runtime.inputs, self.runtime.outputs
        if len(inputs) != 1:
            raise ValueError(f"{self.path}: expected one input, the network has {[i.name for i in inputs]}")
        checks = [
            ("input", inputs[0], card.in_channels, card.patch_size),
            ("output", outputs[0], len(card.output.channels), card.patch_size),
        ]
        for what, port, channels, patch in checks:
            shape = list(port.shape)
            if port.dtype != "float32":
                raise ValueError(f"{self.path}: {what} {port.name!r} must be float32, it is {port.dtype}")
            if len(shape) != rank:
                raise ValueError(
                    f"{self.path}: {what} {port.name!r} has shape {shape}, but the card says spatial_dims "
                    f"{card.spatial_dims}, i.e. (N, C, {', '.join('XYZ'[: card.spatial_dims])})"
                )
            if shape[1] is not None and shape[1] != channels:
                raise ValueError(
                    f"{self.path}: {what} {port.name!r} has {shape[1]} channels, the card says {channels}"
                )
            fixed = [(s, p) for s, p in zip(shape[2:], patch) if s is not None]
            if any(s != p for s, p in fixed):
                raise ValueError(
                    f"{self.path}: {what} {port.name!r} has fixed spatial size {shape[2:]}, "
                    f"the card's patch_size is {list(patch)}"
                )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch.

        Args:
            batch: ``(B, C, *patch)`` with ``C == card.in_channels`` and ``card.spatial_dims`` spatial axes.

        Returns:
            float32 logits ``(B, 3, *patch)`` (WT, TC, ET).
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 2 + self.spatial_dims or batch.shape[1] != self.card.in_channels:
            raise ValueError(
                f"model {self.name} expects a batch (B, {self.card.in_channels}, "
                f"{', '.join('XYZ'[: self.spatial_dims])}), got shape {batch.shape}"
            )
        return self.runtime(batch)

    def __repr__(self) -> str:
        return (
            f"OnnxModel({self.name!r}, {self.card.architecture}, {self.spatial_dims}D, {self.provider}, "
            f"{self.precision})"
        )


def model_paths(models_dir: str | Path) -> list[Path]:
    """The ``NAME.onnx`` files of ``models_dir``, sorted.

    Raises:
        ValueError: the folder is missing or holds no ``.onnx`` file.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise ValueError(f"models folder {models_dir} does not exist or is not a folder")
    paths = sorted(models_dir.glob("*.onnx"))
    if not paths:
        raise ValueError(f"models folder {models_dir} holds no NAME.onnx models")
    return paths


def load_model(path: str | Path, **options: Any) -> OnnxModel:
    """One :class:`OnnxModel` (``options`` are its keyword arguments), whose card's ``name`` must be its file's
    ``NAME``.

    Raises:
        ValueError: :class:`OnnxModel`'s checks fail, or the card's ``name`` is not the file's ``NAME``.
    """
    path = Path(path)
    model = OnnxModel(path, **options)
    if model.name != path.stem:
        raise ValueError(f"{card_path(path)}: card name {model.name!r} differs from the file name {path.stem!r}")
    return model


def load_models(models_dir: str | Path, **options: Any) -> dict[str, OnnxModel]:
    """Load every ``NAME.onnx`` in ``models_dir`` (:func:`load_model`, which takes ``options``), keyed by name,
    sorted; all or nothing.

    Raises:
        ValueError: the folder is missing or holds no ``.onnx`` file; a model lacks its ``NAME.json`` or
            fails :class:`OnnxModel`'s checks; a card's ``name`` is not its file's ``NAME``.
    """
    models = (load_model(path, **options) for path in model_paths(models_dir))
    return {model.name: model for model in models}


class InferenceCancelled(RuntimeError):
    """The caller set the cancel event of :meth:`Engine.segment` (e.g. its client went away): the inference
    stopped before its next network call."""


@dataclass(frozen=True)
class Segmentation:
    """Result of :meth:`Engine.segment`.

    Attributes:
        labels: ``(X, Y, Z)`` uint8 BraTS labels {0, 1, 2, 4} on the input's full grid.
        timings_ms: ``preprocess``, ``inference`` (networks, sigmoid, averaging) and ``postprocess``
            (labels, postprocessing rules, uncrop) in milliseconds.
        probabilities: ``(3, X, Y, Z)`` float32 WT, TC, ET probabilities on the full grid (0 outside the
            brain box), when asked for; never postprocessed.
        postprocessed: whether the card's postprocessing rules were applied to ``labels``.
    """

    labels: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)
    probabilities: np.ndarray | None = None
    postprocessed: bool = False


def _subsets(axes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(subset for n in range(len(axes) + 1) for subset in combinations(axes, n))


FLIPS: tuple[tuple[int, ...], ...] = _subsets((0, 1, 2))
"""The 8 mirrorings of a volume for a 3D model: every subset of the three spatial axes."""

FLIPS_2D: tuple[tuple[int, ...], ...] = _subsets((0, 1))
"""The 4 mirrorings for a 2D (slice-wise) model: every subset of the two in-plane axes (X, Y)."""


def tta_flips(spatial_dims: int) -> tuple[tuple[int, ...], ...]:
    """The flips that test-time augmentation averages over for a model of ``spatial_dims`` (2 or 3)."""
    if spatial_dims == 3:
        return FLIPS
    if spatial_dims == 2:
        return FLIPS_2D
    raise ValueError(f"expected spatial_dims 2 or 3, got {spatial_dims}")


class Engine:
    """Segments raw scans with one model or the average of several (an ensemble).

    Args:
        models: one or more models with the same input channels and output threshold.
        overlap: sliding-window overlap, in ``[0, 1)``.
        batch_size: tiles (3D) or slices (2D) per network call.

    Attributes:
        postprocessing: the rules :meth:`segment` applies, from the models' cards: a single model's
            ``postprocessing`` when it has rules that can change a mask; for an ensemble, the rules only if
            every member's card has exactly the same ones (rules learned on one model's errors do not hold
            for an average of several), else none. ``None``: the labels are returned as made.
    """

    def __init__(self, models: Sequence[OnnxModel], *, overlap: float = 0.5, batch_size: int = 1) -> None:
        self.models = tuple(models)
        if not self.models:
            raise ValueError("an Engine needs at least one model")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        first = self.models[0].card
        for model in self.models[1:]:
            card = model.card
            if (card.in_channels, card.modalities) != (first.in_channels, first.modalities):
                raise ValueError(f"models {first.name} and {card.name} expect different input channels")
            if card.output != first.output:
                raise ValueError(
                    f"models {first.name} and {card.name} differ in their output ({card.output} vs {first.output})"
                )
        self.overlap = float(overlap)
        self.batch_size = int(batch_size)
        self.in_channels = first.in_channels
        self.threshold = first.output.threshold
        self.postprocessing = _shared_rules(self.models)

    @property
    def model_sha256(self) -> str:
        """First 12 hex digits of each model's sha256, joined by ``+`` (SPEC, ``POST /segment``)."""
        return "+".join(model.sha256[:12] for model in self.models)

    def segment(
        self,
        image: np.ndarray,
        *,
        tta: bool = False,
        probabilities: bool = False,
        cancel: threading.Event | None = None,
        postprocess: bool = True,
        spacing: Sequence[float] | None = None,
    ) -> Segmentation:
        """Segment one raw scan.

        Args:
            image: ``(C, X, Y, Z)`` raw intensities in MODALITIES order (not normalised; read, never written).
            tta: also average over mirrored inputs (:func:`tta_flips`: 8 for a 3D model, 4 in-plane for 2D).
            probabilities: return the averaged probabilities too.
            cancel: when set (from another thread), the inference stops before its next network call.
            postprocess: apply :attr:`postprocessing` (if any) to the labels; ``False``: the raw labels.
            spacing: the scan's voxel sizes in mm (X, Y, Z); needed when rules are applied.

        Returns:
            :class:`Segmentation` with labels on the full grid, zero outside the brain box.

        Raises:
            InferenceCancelled: ``cancel`` was set.
            ValueError: a malformed image, or rules to apply without a valid ``spacing``.
        """
        image = np.asarray(image)
        if image.ndim != 4 or image.shape[0] != self.in_channels or min(image.shape) < 1:
            raise ValueError(
                f"expected an image ({self.in_channels}, X, Y, Z) with every axis at least 1, got shape {image.shape}"
            )
        rules = self.postprocessing if postprocess else None
        if rules is not None and spacing is None:
            raise ValueError(
                f"model {'+'.join(m.card.name for m in self.models)} has postprocessing rules, which need the scan's "
                "voxel sizes: pass spacing=(x, y, z) in mm, or postprocess=False for the raw labels"
            )
        if rules is not None:
            voxel_volume_ml(spacing)  # a bad spacing stops here, not after the inference
        start = time.perf_counter()
        pre = preprocess(image)
        after_pre = time.perf_counter()
        probs = self.probabilities(pre.data, tta=tta, cancel=cancel)
        after_inference = time.perf_counter()
        cropped = regions_to_labels(probs, threshold=self.threshold)
        if rules is not None:  # on the brain box: nothing is connected through the zeros around it
            cropped = apply_postprocessing(cropped, spacing, rules)
        labels = uncrop(cropped, pre.bbox, pre.full_shape, fill=0)
        full_probs = uncrop(probs, pre.bbox, pre.full_shape, fill=0) if probabilities else None
        end = time.perf_counter()
        timings = {
            "preprocess": 1000 * (after_pre - start),
            "inference": 1000 * (after_inference - after_pre),
            "postprocess": 1000 * (end - after_inference),
        }
        return Segmentation(
            labels=labels.astype(np.uint8, copy=False),
            timings_ms=timings,
            probabilities=full_probs,
            postprocessed=rules is not None,
        )

    def probabilities(
        self, data: np.ndarray, *, tta: bool = False, cancel: threading.Event | None = None
    ) -> np.ndarray:
        """Averaged sigmoid probabilities ``(3, *spatial)`` float32 for preprocessed ``data (C, *spatial)``.

        Each model's probabilities are first averaged over its own flips (with ``tta``), then the models are
        averaged with equal weights. ``cancel``: see :meth:`segment`.
        """
        total = np.zeros((3, *data.shape[1:]), dtype=np.float32)
        for model in self.models:
            flips = tta_flips(model.spatial_dims) if tta else ((),)
            for axes in flips:
                spatial_axes = tuple(a + 1 for a in axes)
                view = np.flip(data, spatial_axes) if axes else data
                logits = self._logits(model, view, cancel)
                probs = sigmoid(logits, out=logits)  # in place: the logits are ours and not needed again
                if len(flips) > 1:
                    probs /= len(flips)  # this model's mean over its flips
                total += np.flip(probs, spatial_axes) if axes else probs
                del logits, probs
        total /= len(self.models)
        return total

    def _logits(self, model: OnnxModel, data: np.ndarray, cancel: threading.Event | None) -> np.ndarray:
        predictor = model if cancel is None else _Cancellable(model, cancel)
        if model.spatial_dims == 3:
            return sliding_window(
                data, predictor, patch_size=model.card.patch_size, overlap=self.overlap, batch_size=self.batch_size
            )
        return sliding_window(
            data,
            _SliceWise(predictor),
            patch_size=(*model.card.patch_size, 1),
            overlap=self.overlap,
            batch_size=self.batch_size,
        )


def _shared_rules(models: Sequence[OnnxModel]) -> PostprocessingRules | None:
    """The postprocessing rules every model's card holds alike, if they can change a mask; else ``None``.

    A model without a ``postprocessing`` attribute on its card (e.g. the trainer's validation wrapper)
    counts as having none.
    """
    specs = [getattr(model.card, "postprocessing", None) for model in models]
    if any(spec is None for spec in specs):
        return None
    rules = [spec.rules() for spec in specs]
    if any(other != rules[0] for other in rules[1:]):
        logger.info(
            "models %s have different postprocessing rules: their ensemble applies none",
            ", ".join(model.card.name for model in models),
        )
        return None
    return rules[0] if rules[0].changes_masks else None


class _Cancellable:
    """A model that raises :class:`InferenceCancelled` instead of running once ``cancel`` is set."""

    def __init__(self, model: OnnxModel, cancel: threading.Event) -> None:
        self.model = model
        self.cancel = cancel

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.cancel.is_set():
            raise InferenceCancelled("the inference was cancelled")
        return self.model(batch)


class _SliceWise:
    """Serves a 2D network tiles ``(B, C, px, py, 1)``: drops the depth axis before, restores it after."""

    def __init__(self, model: OnnxModel | _Cancellable) -> None:
        self.model = model

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.model(batch[..., 0])[..., None]
