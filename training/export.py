"""Export a trained network to ONNX with its model card, checked against eager PyTorch.

``export_onnx`` writes ``NAME.onnx`` (card in ``metadata_props``) and ``NAME.json`` beside it (the same
card plus the file's sha256). Files appear only complete: each is written to a temporary file in the
target folder and renamed over the target, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.core.files import atomic_path
from service.inference.card import ModelCard, card_path, file_sha256, read_card, write_card

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
MIN_OPSET = 17


class ExportError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model; the message says what to check next."""


def card_for(
    model_name: str,
    architecture: str,
    network: dict,
    spatial_dims: int,
    patch_size: Sequence[int],
    parameters: int,
    training: dict,
    opset: int = MIN_OPSET,
) -> ModelCard:
    """A validated card (``sha256`` still ``None``, ``created`` now in UTC) for :func:`export_onnx`.

    Args:
        model_name: file stem, ``models/NAME.onnx``.
        architecture: registry name, ``"unet"`` or ``"resunet"``.
        network: keyword arguments that rebuild the network with ``build_network(architecture, **network)``.
        spatial_dims: 2 or 3.
        patch_size: training patch, ``spatial_dims`` sizes.
        parameters: parameter count.
        training: provenance (data, epochs, command, git commit; say so if the data were synthetic).
        opset: ONNX opset the file will be exported with.
    """
    return ModelCard(
        name=model_name,
        architecture=architecture,
        spatial_dims=spatial_dims,
        patch_size=tuple(patch_size),
        network=dict(network),
        opset=opset,
        parameters=int(parameters),
        training=dict(training),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def default_check_shape(patch_size: Sequence[int], divisor: int) -> tuple[int, ...]:
    """The patch with its last axis one ``divisor`` shorter (or longer, if that would leave nothing): non-cubic."""
    *head, last = (int(s) for s in patch_size)
    last = last - divisor if last - divisor >= divisor else last + divisor
    return (*head, last)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    card: ModelCard,
    opset: int = MIN_OPSET,
    check_shape: Sequence[int] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-5,
) -> ModelCard:
    """Export ``model`` to ``path`` (``NAME.onnx``), check it with ONNX Runtime, write the card beside it.

    The graph takes ``"image"`` ``(B, C, *S)`` float32 and returns ``"logits"`` ``(B, 3, *S)``, with the
    batch and every spatial axis dynamic. Before anything is written to ``path``, ONNX Runtime (CPU) and
    eager PyTorch run the same random batch of 2 of spatial size ``check_shape``; the largest absolute logit
    difference must be ``<= atol + rtol * max|logit|``. With random weights logits are of order 1 and this is
    an absolute 1e-4; a trained network reaches logits of tens, and float32 convolutions summed in another
    order then differ by a few 1e-4 everywhere (the error follows the scale of the activations, not of each
    logit). The figures measured are recorded in the card (``training.onnx_parity``).

    Args:
        model: float32 network; put in eval mode for the export, its mode is restored afterwards.
        path: target ``.onnx`` file in an existing folder; the card goes to ``path`` with ``.json``.
        card: the model card (e.g. from :func:`card_for`); its ``sha256`` is filled in here.
        opset: ONNX opset, at least 17.
        check_shape: spatial size of the parity check; by default the card's patch made non-cubic
            (:func:`default_check_shape`), which needs the model's ``size_divisor``.
        atol: absolute tolerance on logits.
        rtol: tolerance relative to the largest PyTorch logit.

    Returns:
        The card as written, with ``opset`` and ``sha256`` filled in.

    Raises:
        ValueError: bad arguments (path, opset, card not matching the model, non-float32 weights).
        ExportError: ONNX Runtime and PyTorch disagree beyond the tolerance.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"export path must end with .onnx, got {path}")
    if not path.parent.is_dir():
        raise ValueError(f"export folder {path.parent} does not exist; create it first")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    _check_model_matches_card(model, card)
    card = card.model_copy(update={"opset": opset, "sha256": None})
    shape = _parity_shape(model, card, check_shape)
    input_shape = (1, card.in_channels, *card.patch_size)

    with atomic_path(path) as tmp, _eval_mode(model):  # renamed over ``path`` only if everything succeeds
        _torch_export(model, torch.zeros(input_shape), tmp, opset, card.spatial_dims)
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        diff, scale, ok = _parity(model, tmp, (2, card.in_channels, *shape), atol=atol, rtol=rtol)
        if not ok:
            raise ExportError(
                f"the ONNX graph differs from PyTorch by {diff:.3g} (> atol {atol:g} + rtol {rtol:g} x max|logit| "
                f"{scale:.3g}) on a batch of 2 of size "
                f"{shape}; check the network for operations that behave differently in eval mode or when traced "
                "(Python control flow on tensor values, state changed inside forward), or report it with the "
                "model's config; nothing was written"
            )
        log.info("exported %s: ONNX Runtime vs PyTorch max abs logit difference %.3g on %s", path, diff, shape)
        parity = {"input": [2, card.in_channels, *shape], "max_abs_logit_difference": float(f"{diff:.3g}"),
                  "max_abs_logit": round(scale, 3), "atol": atol, "rtol": rtol, "runtime": f"onnxruntime {ort.__version__}"}
        card = card.model_copy(update={"training": {**card.training, "onnx_parity": parity}})
        _set_metadata(proto, card)
        onnx.save(proto, str(tmp))
        card = card.model_copy(update={"sha256": file_sha256(tmp)})
    write_card(card, card_path(path))
    return card


def update_card(onnx_path: str | Path, **fields) -> ModelCard:
    """Change card fields (e.g. ``validation``) in both the ONNX ``metadata_props`` and ``NAME.json``.

    The card is read from the ONNX metadata, updated, validated, written back into the ONNX file
    (temporary file + rename), and the JSON card is rewritten with the new file's sha256. The JSON card's
    ``postprocessing`` (written there alone by ``learn-postprocessing``) is kept unless ``fields`` sets it.
    """
    onnx_path = Path(onnx_path)
    if "sha256" in fields:
        raise ValueError("sha256 is computed from the ONNX file and cannot be set")
    proto = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        card = ModelCard.from_metadata(props)
    except ValueError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"{onnx_path}: no valid model card in the ONNX metadata ({detail}), so export_onnx did not write it; "
            "export the checkpoint again with `python -m training export`"
        ) from None
    json_card = card_path(onnx_path)
    if "postprocessing" not in fields and json_card.is_file():
        try:
            fields["postprocessing"] = read_card(json_card).postprocessing
        except ValueError as exc:  # rewritten from the metadata below, as before
            log.warning("%s; its postprocessing (if any) is not carried over", str(exc).splitlines()[0])
    card = ModelCard.model_validate({**card.model_dump(), **fields, "sha256": None})
    with atomic_path(onnx_path) as tmp:
        _set_metadata(proto, card)
        onnx.save(proto, str(tmp))
        card = card.model_copy(update={"sha256": file_sha256(tmp)})
    write_card(card, card_path(onnx_path))
    return card


def _check_model_matches_card(model: nn.Module, card: ModelCard) -> None:
    for attr in ("spatial_dims", "in_channels"):
        if hasattr(model, attr) and getattr(model, attr) != getattr(card, attr):
            raise ValueError(f"card says {attr}={getattr(card, attr)}, the model has {getattr(model, attr)}")
    if hasattr(model, "config") and card.network and model.config() != {**model.config(), **card.network}:
        raise ValueError(f"card network {card.network} does not describe the model {model.config()}")
    if hasattr(model, "architecture") and model.architecture != card.architecture:
        raise ValueError(f"card architecture {card.architecture!r} but the model is {model.architecture!r}")
    bad = sorted({str(t.dtype) for t in [*model.parameters(), *model.buffers()] if t.dtype != torch.float32})
    if bad:
        raise ValueError(f"export needs float32 weights, the model has {bad}; call model.float() first")


def _parity_shape(model: nn.Module, card: ModelCard, check_shape: Sequence[int] | None) -> tuple[int, ...]:
    if check_shape is not None:
        shape = tuple(int(s) for s in check_shape)
        if len(shape) != card.spatial_dims:
            raise ValueError(f"check_shape {shape} must have {card.spatial_dims} sizes")
        return shape
    divisor = getattr(model, "size_divisor", None)
    if divisor is None:
        raise ValueError("the model has no size_divisor; pass check_shape (a valid non-cubic spatial size)")
    return default_check_shape(card.patch_size, divisor)


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path, opset: int, spatial_dims: int) -> None:
    spatial = {2 + i: "XYZ"[i] for i in range(spatial_dims)}
    dynamic_axes = {INPUT_NAME: {0: "batch", **spatial}, OUTPUT_NAME: {0: "batch", **spatial}}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of dynamo=True; its warnings are expected here.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            export_params=True,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
        )


def _set_metadata(proto: onnx.ModelProto, card: ModelCard) -> None:
    meta = card.to_metadata()
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in meta and p.key not in ModelCard.model_fields]
    del proto.metadata_props[:]
    for key, value in [*keep, *meta.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _parity(model: nn.Module, onnx_file: Path, shape: tuple[int, ...], *, atol: float, rtol: float
            ) -> tuple[float, float, bool]:
    """Largest absolute logit difference, largest absolute logit, and whether all agree within tolerance."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    if got.shape != expected.shape:
        raise ExportError(
            f"ONNX Runtime returned logits of shape {got.shape}, PyTorch {expected.shape}, for input {tuple(shape)}: "
            "tracing froze a size that should follow the input; check the network's forward for sizes computed "
            "in Python from the input, or report it with the model's config; nothing was written"
        )
    diff = np.abs(got - expected)
    scale = float(np.max(np.abs(expected)))
    ok = bool(np.max(diff) <= atol + rtol * scale)  # False for NaN too
    return float(np.max(diff)), scale, ok


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
