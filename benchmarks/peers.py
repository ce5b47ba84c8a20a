"""The peers the engine is measured against: the same network in PyTorch eager, driven by the project's
sliding window or by MONAI's ``sliding_window_inference``.

The PyTorch network is rebuilt from the model card (``build_network(card["architecture"], **card["network"])``)
and given the ONNX file's weights. ONNX initializer names are the state-dict keys, except tensors the
exporter deduplicated (two parameters with equal values stored once): those appear as the output of an
``Identity`` node, or only as an input of the node that uses them, whose name carries the module path
(``/encoder.0/shortcut/norm/InstanceNormalization`` takes ``encoder.0.shortcut.norm.{weight,bias}`` as its
inputs 1 and 2). :func:`onnx_weights` recovers them from the graph; loading is ``strict``.

Devices are explicit: every function takes a ``torch.device``; nothing moves to a GPU unless asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

PARAMETER_INPUT = {"weight": 1, "bias": 2}
"""Input index of a module's parameter in the ONNX node that uses it (Conv, ConvTranspose,
InstanceNormalization, BatchNormalization: ``X, W/scale, B``)."""


def _module_path(node_name: str) -> str:
    """``/encoder.0/shortcut/norm/InstanceNormalization`` -> ``encoder.0.shortcut.norm``."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def onnx_weights(onnx_path: str | Path, keys: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of ``keys`` (state-dict names) from the ONNX file.

    Returns:
        ``(weights, recovered)``: every key's array, and for each key that is not an initializer of its own
        name, where it was found (``"Identity of NAME"`` or ``"input i of NODE"``).

    Raises:
        KeyError: a key found nowhere in the graph.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    values: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    origin: dict[str, str] = {}
    for node in graph.node:  # topological order: an Identity of an Identity resolves too
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
            origin[node.output[0]] = f"Identity of {node.input[0]}"
        elif node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                    origin[node.output[0]] = f"Constant {node.name}"
    by_module: dict[str, list] = {}
    for node in graph.node:
        by_module.setdefault(_module_path(node.name), []).append(node)

    weights: dict[str, np.ndarray] = {}
    recovered: dict[str, str] = {}
    for key in keys:
        if key in values:
            weights[key] = values[key]
            if key in origin:
                recovered[key] = origin[key]
            continue
        module, _, param = key.rpartition(".")
        index = PARAMETER_INPUT.get(param)
        found = None
        for node in by_module.get(module, []):
            if index is not None and len(node.input) > index and node.input[index] in values:
                found = node
                break
        if found is None:
            raise KeyError(f"{onnx_path}: {key} is neither an initializer nor an input of a node of {module}")
        weights[key] = values[found.input[index]]
        recovered[key] = f"input {index} of {found.name}"
    return weights, recovered


def torch_network(onnx_path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The network of ``NAME.onnx`` in PyTorch, rebuilt from ``NAME.json`` with the ONNX weights, in eval mode
    on ``device``.

    Returns:
        ``(network, info)``; ``info`` has ``parameters`` and ``recovered`` (see :func:`onnx_weights`).
    """
    from training.networks.registry import build_network

    onnx_path = Path(onnx_path)
    card = json.loads(onnx_path.with_suffix(".json").read_text())
    network = build_network(card["architecture"], **dict(card["network"]))
    keys = list(network.state_dict().keys())
    weights, recovered = onnx_weights(onnx_path, keys)
    state = {key: torch.from_numpy(np.array(weights[key], copy=True)) for key in keys}
    network.load_state_dict(state, strict=True)
    network.eval().to(device)
    info = {"parameters": int(sum(p.numel() for p in network.parameters())), "recovered": recovered}
    return network, info


class TorchPredictor:
    """numpy batch ``(B, C, *patch)`` -> numpy logits, the network on ``device`` in fp32 (the project's
    sliding window calls it). Counts its windows."""

    def __init__(self, network: torch.nn.Module, device: torch.device) -> None:
        self.network = network
        self.device = device
        self.windows = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.windows += batch.shape[0]
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return self.network(x).float().cpu().numpy()


class CountingNetwork(torch.nn.Module):
    """The network, counting the windows MONAI feeds it."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return self.network(x)


def monai_probabilities(
    network: torch.nn.Module,
    data: np.ndarray,
    patch_size: Sequence[int],
    device: torch.device,
    *,
    overlap: float = 0.5,
    roi_weight_map: np.ndarray | None = None,
) -> np.ndarray:
    """Sigmoid probabilities ``(K, *spatial)`` float32 of ``data (C, *spatial)`` with MONAI's
    ``sliding_window_inference`` (batch of 1 window, Gaussian blending, sigma 1/8 of the window), everything on
    ``device``: what a MONAI user writes.

    ``roi_weight_map`` ``(*patch)``: blend with these weights instead of MONAI's Gaussian (which MONAI clamps
    to at least 1e-3); given the project's :func:`~service.inference.tiling.gaussian_weight`, and on a volume
    where both place the windows alike, MONAI computes what the engine computes."""
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(data[None], dtype=np.float32)).to(device)
        weights = None
        if roi_weight_map is not None:
            weights = torch.from_numpy(np.array(roi_weight_map, dtype=np.float32)[None, None]).to(device)
        logits = sliding_window_inference(
            x,
            roi_size=tuple(int(p) for p in patch_size),
            sw_batch_size=1,
            predictor=network,
            overlap=overlap,
            mode="gaussian",
            sigma_scale=0.125,
            roi_weight_map=weights,
        )
        probs = torch.sigmoid(logits)[0]
        return probs.float().cpu().numpy()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on the CPU), so that a timer stops after the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
