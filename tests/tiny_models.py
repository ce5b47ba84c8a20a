"""Tiny real ONNX models and the scan they segment exactly, shared by the engine and service tests.

Each model is one Conv whose logits are fixed functions of the (z-scored) input: with
:func:`pointwise_weights` the WT logit is ``gain * z(FLAIR) + bias``, TC ``gain * z(T1ce) + bias`` and ET
``gain * z(T2) + bias``, positive exactly where that channel is bright (10 against a brain of 1).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.inference.card import ModelCard, card_path, file_sha256, write_card

FLAIR, T1, T1CE, T2 = range(4)
SHAPE = (12, 10, 9)
BRAIN = (slice(2, 10), slice(1, 9), slice(1, 8))  # the brain box: crop of shape (8, 8, 7)
WT_BOX = (slice(4, 9), slice(2, 7), slice(2, 7))
TC_BOX = (slice(5, 8), slice(3, 6), slice(3, 6))
ET_BOX = (slice(6, 8), slice(4, 6), slice(4, 5))


def scan() -> np.ndarray:
    """A raw scan (4, 12, 10, 9): brain intensity 1, tumour regions 10 in FLAIR (WT), T1ce (TC) and T2 (ET).

    One corner voxel of the brain box is background, so that the crop holds a zero voxel too.
    """
    image = np.zeros((4, *SHAPE), dtype=np.float32)
    image[(slice(None), *BRAIN)] = 1.0
    image[:, 2, 1, 1] = 0.0
    image[(FLAIR, *WT_BOX)] = 10.0
    image[(T1CE, *TC_BOX)] = 10.0
    image[(T2, *ET_BOX)] = 10.0
    image[T1] *= 3.0  # a channel no model looks at
    return image


def expected_labels() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[WT_BOX] = 2
    labels[TC_BOX] = 1
    labels[ET_BOX] = 4
    return labels


def pointwise_weights(gain: float = 10.0, bias: float = -1.0, spatial_dims: int = 3):
    """WT, TC, ET logits = gain * z(FLAIR), z(T1ce), z(T2) + bias: positive in the tumour boxes only.

    After z-scoring, tumour voxels (10) lie above the brain mean and healthy ones (1) below; the background
    stays 0, so its logit is ``bias`` < 0.
    """
    weight = np.zeros((3, 4) + (1,) * spatial_dims, dtype=np.float32)
    for region, channel in enumerate((FLAIR, T1CE, T2)):
        weight[(region, channel) + (0,) * spatial_dims] = gain
    return weight, np.full(3, bias, dtype=np.float32)


def random_weights(spatial_dims: int, seed: int = 0):
    """A 3^d kernel with no symmetry, so a transposed or flipped axis would show."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(3, 4) + (3,) * spatial_dims).astype(np.float32)
    return weight, rng.normal(size=3).astype(np.float32)


def build_model(
    folder,
    name: str,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    patch_size,
    card_updates: dict | None = None,
    metadata_updates: dict | None = None,
    metadata_extra: dict[str, str] | None = None,
    metadata: bool = True,
    input_channels: int | str = "C",
):
    """Write ``folder/name.onnx`` (one Conv, "same" zero padding, dynamic N and spatial dims) and its card."""
    spatial_dims = weight.ndim - 2
    axes = ["X", "Y", "Z"][:spatial_dims]
    pad = [k // 2 for k in weight.shape[2:]]
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", input_channels, *axes])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, *axes])
    node = helper.make_node("Conv", ["image", "W", "B"], ["logits"], pads=pad + pad)
    graph = helper.make_graph(
        [node], name, [inp], [out],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = ModelCard(
        name=name,
        architecture="unet",
        spatial_dims=spatial_dims,
        patch_size=tuple(patch_size),
        opset=17,
        parameters=int(weight.size + bias.size),
        training={"data": "none: a hand-made test convolution, not trained"},
        created="2024-01-01T00:00:00Z",
    )
    if metadata:
        embedded = card.model_copy(update=metadata_updates or {})
        helper.set_model_props(model, {**embedded.to_metadata(), **(metadata_extra or {})})
    onnx.checker.check_model(model)
    path = folder / f"{name}.onnx"
    onnx.save(model, path)
    card = card.model_copy(update={"sha256": file_sha256(path), **(card_updates or {})})
    write_card(card, card_path(path))
    return path
