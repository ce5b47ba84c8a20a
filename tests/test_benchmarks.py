"""``python -m benchmarks``: the FLOP count against hand counts, the weights taken from an ONNX graph, and one
real ``--quick`` run of every section (about half a minute on two cores) checked for plausible, consistent
figures and fp32 rows that agree with ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.flops import count_flops, count_flops_onnx
from benchmarks.harness import FP32_FRACTION_ABOVE, FP32_MAX_ABS
from benchmarks.peers import onnx_weights, torch_network
from benchmarks.suite import SECTION_TITLES, SECTIONS, parse_args

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODELS = PROJECT_ROOT / "models"

# A tiny 3D network on a (1, 4, 8, 8, 8) input, FLOPs counted by hand (one multiply-add = 2 FLOPs):
#   conv 4->8, 3x3x3, pad 1:        output 8 x 8^3 voxels, 4 x 27 products each: 2 * 4096 * 108   = 884,736
#   grouped conv 8->8, 1x1x1, G=2:  output 8 x 8^3 voxels, 4 products each:      2 * 4096 * 4     =  32,768
#   transposed conv 8->4, 2x2x2/2:  8 x 8^3 input values, each into 4 x 8 outputs: 2 * 4096 * 32  = 262,144
TINY_CONV_FLOPS = 884_736 + 32_768 + 262_144
# MatMul (2, 3, 16) x (16, 5): 2 * 3 * 5 outputs, 16 products each: 2 * 30 * 16 = 960
TINY_MATMUL_FLOPS = 960


def _weights(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def tiny_conv_model(path: Path) -> Path:
    inits = [
        numpy_helper.from_array(_weights(8, 4, 3, 3, 3), "conv.weight"),
        numpy_helper.from_array(_weights(8), "conv.bias"),
        numpy_helper.from_array(_weights(8, 4, 1, 1, 1, seed=1), "group.weight"),
        numpy_helper.from_array(_weights(8, 4, 2, 2, 2, seed=2), "up.weight"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c1"], name="/conv/Conv", kernel_shape=[3, 3, 3],
                         pads=[1, 1, 1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/act/Relu"),
        helper.make_node("Conv", ["r1", "group.weight"], ["c2"], name="/group/Conv", kernel_shape=[1, 1, 1], group=2),
        helper.make_node("ConvTranspose", ["c2", "up.weight"], ["y"], name="/up/ConvTranspose",
                         kernel_shape=[2, 2, 2], strides=[2, 2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "X", "Y", "Z"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "X2", "Y2", "Z2"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def tiny_matmul_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")], "tiny_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5])],
        [numpy_helper.from_array(_weights(16, 5), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


# ------------------------------------------------------------------------------------------ FLOPs
def test_onnx_graph_count_equals_the_hand_count(tmp_path):
    counted = count_flops_onnx(tiny_conv_model(tmp_path / "tiny.onnx"), [1, 4, 8, 8, 8])
    assert counted["flops"] == TINY_CONV_FLOPS
    assert counted["by_op"] == {"Convolution": 884_736, "GroupConvolution": 32_768, "ConvolutionBackpropData": 262_144}
    assert count_flops_onnx(tiny_matmul_model(tmp_path / "mm.onnx"), [2, 3, 16])["flops"] == TINY_MATMUL_FLOPS


def test_openvino_graph_count_equals_the_hand_count(tmp_path):
    pytest.importorskip("openvino")
    counted = count_flops(tiny_conv_model(tmp_path / "tiny.onnx"), [1, 4, 8, 8, 8])
    assert counted["flops"] == TINY_CONV_FLOPS
    assert counted["ops"] == {"Convolution": 1, "GroupConvolution": 1, "ConvolutionBackpropData": 1}
    assert count_flops(tiny_matmul_model(tmp_path / "mm.onnx"), [2, 3, 16])["flops"] == TINY_MATMUL_FLOPS
    # twice the batch, twice the work
    assert count_flops(tmp_path / "tiny.onnx", [2, 4, 8, 8, 8])["flops"] == 2 * TINY_CONV_FLOPS


# ------------------------------------------------------------------------------------------ weights
def test_weights_found_as_node_inputs_by_module_path(tmp_path):
    path = tiny_conv_model(tmp_path / "tiny.onnx")
    model = onnx.load(path)
    # rename the transposed convolution's weight as an exporter does when it deduplicates a tensor
    for init in model.graph.initializer:
        if init.name == "up.weight":
            init.name = "onnx::ConvTranspose_42"
    model.graph.node[3].input[1] = "onnx::ConvTranspose_42"
    onnx.save(model, path)
    weights, recovered = onnx_weights(path, ["conv.weight", "conv.bias", "up.weight"])
    assert recovered == {"up.weight": "input 1 of /up/ConvTranspose"}
    np.testing.assert_array_equal(weights["up.weight"], _weights(8, 4, 2, 2, 2, seed=2))
    with pytest.raises(KeyError, match="group.bias"):
        onnx_weights(path, ["group.bias"])


def test_shipped_resunet_loads_strictly_with_the_deduplicated_tensors(tmp_path):
    import torch

    network, info = torch_network(MODELS / "resunet.onnx", torch.device("cpu"))
    assert any("shortcut.norm" in key for key in info["recovered"])
    assert info["parameters"] == json.loads((MODELS / "resunet.json").read_text())["parameters"]


def test_sections_are_parsed_and_checked():
    assert parse_args(["--sections", "peak,flops", "load"]).sections == ["peak", "flops", "load"]
    assert parse_args([]).sections == list(SECTIONS)
    with pytest.raises(SystemExit):
        parse_args(["--sections", "nonsense"])


# ------------------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    return proc, out


def test_quick_run_succeeds_and_writes_both_files(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "bench.json").read_text())
    assert set(results["sections"]) == set(SECTIONS)
    assert results["failures"] == []
    markdown = (out / "bench.md").read_text()
    assert markdown in proc.stdout  # the tables are printed too
    for title in SECTION_TITLES.values():
        assert f"## {title}" in markdown
    assert "python -m benchmarks --quick" in markdown
    assert results["versions"]["onnxruntime"] and results["machine"]["cores_usable"] >= 1
    assert "[" in proc.stderr and "rep 1/2" in proc.stderr  # progress lines


def test_quick_run_figures_are_plausible_and_consistent(quick_run):
    _, out = quick_run
    sections = json.loads((out / "bench.json").read_text())["sections"]
    peak = sections["peak"]
    assert all(r["ms"] > 0 and r["gflops"] > 0 for r in peak["rows"])
    assert peak["peak_gflops"]["cpu/fp32"] == max(r["gflops"] for r in peak["rows"] if r["precision"] == "fp32"
                                                  and r["device"] == "cpu")

    flops = sections["flops"]["models"]
    for name, model in sections["engine"]["models"].items():
        assert model["flops_per_window"] == flops[name]["flops_per_window"] == flops[name]["onnx_graph_flops"]
        rows = {r["id"]: r for r in model["rows"]}
        assert {"a", "d", "e"} <= set(rows)
        monai = rows["e"]["ms"]
        for r in rows.values():
            assert r["ms"] > 0 and all(t > 0 for t in r["times_ms"]) and r["windows"] >= 1
            assert r["ms"] == pytest.approx(float(np.median(r["times_ms"])))
            assert r["speedup_vs_monai"] == pytest.approx(monai / r["ms"])
            assert r["gflops"] == pytest.approx(r["windows"] * model["flops_per_window"] / r["ms"] * 1e-6)
        # the fp32 rows agree with ONNX Runtime
        for r in rows.values():
            if r["precision"] == "fp32" and r["check"] == "fp32":
                assert r["max_abs_diff"] <= FP32_MAX_ABS
                assert r["fraction_above_tolerance"] <= FP32_FRACTION_ABOVE
                assert min(r["dice"].values()) >= 0.999
        assert model["torch_vs_onnxruntime_logits"]["cpu"]["relative"] < 1e-3
        # MONAI given the engine's windows and weights computes what the engine computes
        same = model["monai_same_windows"]
        assert same["max_abs_diff"] <= FP32_MAX_ABS and same["fraction_above_tolerance"] <= FP32_FRACTION_ABOVE

    e2e = sections["e2e"]["formats"]
    for fmt in ("json", "nifti"):
        f = e2e[fmt]
        assert f["latency_ms"] >= f["timing_ms"]["inference"] > 0
        assert 0 < f["outside_share"] < 1
        assert sum(f["parts_ms"].values()) == pytest.approx(f["latency_ms"], rel=0.25)

    memory = {r["model"]: r for r in sections["memory"]["rows"]}
    assert set(memory) == {"unet", "resunet", "ensemble"}
    for r in memory.values():
        assert r["peak_rss"] >= r["rss_after_startup"] > 50 * 2**20

    levels = sections["load"]["levels"]
    assert [lv["clients"] for lv in levels] == [1, 2, 4]
    for lv in levels:
        assert lv["ok"] == lv["requests"] and not lv["errors"]
        assert lv["throughput_rps"] == pytest.approx(lv["ok"] / lv["wall_s"])
        assert 0 < lv["p50_ms"] <= lv["p95_ms"]

    scaling = sections["scaling"]["rows"]
    default = next(r for r in scaling if r["default"])
    assert {r["group"] for r in scaling} == {"brain size", "overlap", "window batch"}
    for r in scaling:
        assert r["ms"] > 0 and r["windows"] >= 1
        assert r["relative_to_default"] == pytest.approx(r["ms"] / default["ms"])
        if r["shape"] == default["shape"] and not r["default"]:
            assert "dice" in r

    width = sections["width"]["rows"]
    assert {r["network"] for r in width} == {"resunet (shipped)", "resunet, wide (random weights)"}
    wide = {r["gflop_per_window"] for r in width if "wide" in r["network"]}
    shipped = {r["gflop_per_window"] for r in width if "shipped" in r["network"]}
    assert min(wide) > 3 * max(shipped)  # twice the channels: about four times the work per window
    for r in width:
        assert r["ms"] > 0 and r["gflops"] == pytest.approx(r["gflop_per_window"] / r["ms"] * 1e3)
        assert r["pct_of_peak"] == pytest.approx(100 * r["gflops"] / peak["peak_gflops"][f"cpu/{r['precision']}"])
