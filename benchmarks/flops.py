"""Floating-point operations of a network, counted analytically from its graph for one input shape.

One multiply-add counts as 2 FLOPs; only the dense operations are counted (convolutions, transposed
convolutions, matrix products), as in every published FLOP figure of a CNN. Bias additions, normalisations,
activations, concatenations and additions of skip connections are not (they are memory-bound and small).

- ``Convolution`` / ``GroupConvolution``: ``2 * prod(output shape) * Cin_per_group * prod(kernel)``;
- ``ConvolutionBackpropData`` (transposed convolution) / ``GroupConvolutionBackpropData``:
  ``2 * N * Cin * prod(input spatial) * Cout_per_group * prod(kernel)`` (every input voxel scatters into
  ``Cout_per_group * prod(kernel)`` outputs);
- ``MatMul`` (and ONNX ``Gemm``): ``2 * prod(output shape) * K``, ``K`` the contracted size.

:func:`count_flops` walks the OpenVINO graph (``read_model``, reshaped to the input shape,
``get_ordered_ops()``); :func:`count_flops_onnx` walks the ONNX graph with ONNX shape inference, for machines
without OpenVINO and as a cross-check.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Sequence

COUNTED_OV = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul")


def _flops_ov_op(kind: str, inputs: list[list[int]], output: list[int], attributes: dict) -> int:
    """FLOPs of one OpenVINO operation given its static input and output shapes."""
    if kind == "Convolution":  # weights (Cout, Cin, *k)
        weights = inputs[1]
        return 2 * math.prod(output) * weights[1] * math.prod(weights[2:])
    if kind == "GroupConvolution":  # weights (G, Cout/G, Cin/G, *k)
        weights = inputs[1]
        return 2 * math.prod(output) * weights[2] * math.prod(weights[3:])
    if kind == "ConvolutionBackpropData":  # data (N, Cin, *s), weights (Cin, Cout, *k)
        data, weights = inputs[0], inputs[1]
        return 2 * data[0] * data[1] * math.prod(data[2:]) * weights[1] * math.prod(weights[2:])
    if kind == "GroupConvolutionBackpropData":  # weights (G, Cin/G, Cout/G, *k)
        data, weights = inputs[0], inputs[1]
        return 2 * data[0] * data[1] * math.prod(data[2:]) * weights[2] * math.prod(weights[3:])
    if kind == "MatMul":
        a = list(inputs[0])
        if len(a) == 1:
            k = a[0]
        else:
            k = a[-2] if attributes.get("transpose_a") else a[-1]
        return 2 * math.prod(output) * k
    raise ValueError(f"not a counted operation: {kind}")


def count_flops(onnx_path: str | Path, input_shape: Sequence[int]) -> dict:
    """FLOPs of one forward pass of ``onnx_path`` on an input of ``input_shape``, from the OpenVINO graph.

    Returns:
        ``{"flops": total, "by_op": {type: flops}, "ops": {type: count}, "method": ...}``.
    """
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    model.reshape({model.inputs[0]: ov.PartialShape([int(s) for s in input_shape])})
    by_op: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in COUNTED_OV:
            continue
        inputs = [list(op.input(i).get_shape()) for i in range(op.get_input_size())]
        output = list(op.output(0).get_shape())
        attributes = op.get_attributes() if kind == "MatMul" else {}
        by_op[kind] += _flops_ov_op(kind, inputs, output, attributes)
        ops[kind] += 1
    return {
        "flops": int(sum(by_op.values())),
        "by_op": dict(by_op),
        "ops": dict(ops),
        "method": "OpenVINO graph (read_model, reshape, get_ordered_ops)",
    }


def count_flops_onnx(onnx_path: str | Path, input_shape: Sequence[int]) -> dict:
    """The same count from the ONNX graph (``Conv``, ``ConvTranspose``, ``MatMul``, ``Gemm``), with the input
    fixed to ``input_shape`` and ONNX shape inference."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(onnx_path))
    graph = model.graph
    initializers = {init.name: list(init.dims) for init in graph.initializer}
    graph_input = next(i for i in graph.input if i.name not in initializers)
    dims = graph_input.type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ValueError(f"{onnx_path}: input has rank {len(dims)}, got shape {list(input_shape)}")
    for dim, size in zip(dims, input_shape):
        dim.Clear()
        dim.dim_value = int(size)
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    shapes = dict(initializers)
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            shapes[value.name] = [d.dim_value for d in tensor.shape.dim]
    for node in graph.node:  # Identity of an initializer (deduplicated weights)
        if node.op_type == "Identity" and node.input[0] in shapes:
            shapes.setdefault(node.output[0], shapes[node.input[0]])

    by_op: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        group = int(attrs.get("group", 1))
        x, w, out = shapes[node.input[0]], shapes[node.input[1]], shapes[node.output[0]]
        if node.op_type == "Conv":  # w (Cout, Cin/G, *k)
            flops = 2 * math.prod(out) * w[1] * math.prod(w[2:])
        elif node.op_type == "ConvTranspose":  # w (Cin, Cout/G, *k)
            flops = 2 * x[0] * x[1] * math.prod(x[2:]) * w[1] * math.prod(w[2:])
        elif node.op_type == "Gemm":
            flops = 2 * math.prod(out) * (x[0] if attrs.get("transA") else x[-1])
        else:
            flops = 2 * math.prod(out) * (x[-1] if len(x) > 1 else x[0])
        kind = {"Conv": "Convolution" if group == 1 else "GroupConvolution",
                "ConvTranspose": "ConvolutionBackpropData"}.get(node.op_type, "MatMul")
        by_op[kind] += flops
        ops[kind] += 1
    return {
        "flops": int(sum(by_op.values())),
        "by_op": dict(by_op),
        "ops": dict(ops),
        "method": "ONNX graph (shape inference)",
    }


def network_flops(onnx_path: str | Path, input_shape: Sequence[int]) -> dict:
    """:func:`count_flops` where OpenVINO is installed, else :func:`count_flops_onnx`."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return count_flops_onnx(onnx_path, input_shape)
    return count_flops(onnx_path, input_shape)
