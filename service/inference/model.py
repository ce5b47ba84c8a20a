"""An exported model: ``NAME.onnx`` with its card ``NAME.json``, checked against each other and opened on a backend.

Loading checks the card against the ONNX file (sha256, the card copy in its metadata, input rank and
channels) so that a model is never served with the wrong assumptions. A backend
(:mod:`service.inference.backends`: ONNX Runtime or OpenVINO) runs it; :class:`service.inference.engine.Engine`
segments scans with one model or several.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from service.inference.backends import Backend, BackendOptions, open_backend
from service.inference.card import ModelCard, card_path, file_sha256, read_card

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


class OnnxModel:
    """One exported network, its validated card and the backend that runs it.

    Args:
        path: ``NAME.onnx``; its card ``NAME.json`` must lie beside it.
        options: how it runs (:class:`~service.inference.backends.BackendOptions`; default: ``auto`` backend
            and precision, all cores, one window per call).

    Raises:
        ValueError: naming the file, if the model or its card is missing or invalid, the card has no sha256
            (export the model again), the card's sha256 or its copy in the ONNX metadata disagree with the
            file, the network's input or output does not have the card's ``in_channels``, ``spatial_dims``
            (and ``patch_size``, where the dims are fixed), or the backend cannot run it.
    """

    def __init__(self, path: str | Path, options: BackendOptions = BackendOptions()) -> None:
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
                self.path, options, patch_size=self.card.patch_size, in_channels=self.card.in_channels
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


def load_model(path: str | Path, options: BackendOptions = BackendOptions()) -> OnnxModel:
    """One :class:`OnnxModel` run with ``options``, whose card's ``name`` must be its file's ``NAME``.

    Raises:
        ValueError: :class:`OnnxModel`'s checks fail, or the card's ``name`` is not the file's ``NAME``.
    """
    path = Path(path)
    model = OnnxModel(path, options)
    if model.name != path.stem:
        raise ValueError(f"{card_path(path)}: card name {model.name!r} differs from the file name {path.stem!r}")
    return model


def load_models(models_dir: str | Path, options: BackendOptions = BackendOptions()) -> dict[str, OnnxModel]:
    """Load every ``NAME.onnx`` in ``models_dir`` (:func:`load_model`) with ``options``, keyed by name, sorted;
    all or nothing.

    Raises:
        ValueError: the folder is missing or holds no ``.onnx`` file; a model lacks its ``NAME.json`` or
            fails :class:`OnnxModel`'s checks; a card's ``name`` is not its file's ``NAME``.
    """
    models = (load_model(path, options) for path in model_paths(models_dir))
    return {model.name: model for model in models}
