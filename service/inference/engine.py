"""The segmentation engine: preprocess, sliding window, sigmoid, ensemble, TTA and postprocessing.

It runs exported models (:class:`service.inference.model.OnnxModel`, ``NAME.onnx`` with its card).

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
from typing import Sequence

import numpy as np

from service.core.labels import regions_to_labels
from service.core.postprocess import PostprocessingRules, apply_postprocessing, voxel_volume_ml
from service.core.preprocess import preprocess, uncrop
from service.inference.model import OnnxModel
from service.inference.tiling import sliding_window

logger = logging.getLogger(__name__)


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
