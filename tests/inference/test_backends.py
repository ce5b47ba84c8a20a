"""The inference backends: ONNX Runtime and OpenVINO read the same file and give the same logits; the choice
``auto``; precision; OpenVINO's static compilation with padded and split batches; thread safety."""

from __future__ import annotations

import platform
import threading

import numpy as np
import onnxruntime as ort
import pytest

from service.inference.backends import AUTO_CPU_PRECISION, BackendOptions, OnnxRuntimeBackend, open_backend
from service.inference.openvino_backend import OpenVinoBackend, cpu_supports_bf16, openvino_available
from service.inference.engine import Engine
from service.inference.model import OnnxModel
from tests.tiny_models import build_model, expected_labels, pointwise_weights, random_weights, scan

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="the openvino package is not installed")
needs_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")


@pytest.fixture(scope="module")
def conv3d(tmp_path_factory):
    """A 3x3x3 convolution with random weights, patch 8x8x8, dynamic sizes in the file."""
    folder = tmp_path_factory.mktemp("backends")
    return build_model(folder, "conv3d", *random_weights(3), patch_size=(8, 8, 8))


def batch(n: int, size=(8, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4, *size)).astype(np.float32)


class TestChoice:
    def test_explicit_onnxruntime(self, conv3d):
        runtime = open_backend(conv3d, BackendOptions(backend="onnxruntime", providers=("CPUExecutionProvider",), threads=1))
        assert isinstance(runtime, OnnxRuntimeBackend)
        assert (runtime.backend, runtime.device, runtime.precision) == ("onnxruntime", "CPU", "fp32")
        assert runtime.provider == "CPUExecutionProvider"

    def test_auto_without_a_gpu(self, conv3d):
        runtime = open_backend(conv3d, BackendOptions(threads=1))
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if has_cuda and runtime.provider == "CUDAExecutionProvider":
            pytest.skip("a GPU is usable here: auto rightly chose CUDA")
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        if openvino_available() and x86:
            assert isinstance(runtime, OpenVinoBackend) and runtime.provider == "OpenVINO CPU"
            assert runtime.precision == (AUTO_CPU_PRECISION if cpu_supports_bf16() else "fp32")
        else:
            assert runtime.provider == "CPUExecutionProvider" and runtime.precision == "fp32"

    @pytest.mark.parametrize(
        "options, message",
        [
            ({"backend": "tensorrt"}, "backend must be one of auto, onnxruntime, openvino"),
            ({"precision": "int8"}, "precision must be one of auto, fp32, bf16"),
            ({"backend": "onnxruntime", "precision": "bf16"}, "runs fp32 only; set BRATS_BACKEND=openvino"),
        ],
    )
    def test_refusals_say_what_to_set(self, conv3d, options, message):
        with pytest.raises(ValueError, match=message):
            open_backend(conv3d, BackendOptions(**options))


@needs_openvino
class TestOpenVino:
    def test_same_logits_as_onnxruntime(self, conv3d):
        reference = OnnxRuntimeBackend(conv3d, providers=["CPUExecutionProvider"], threads=1)
        runtime = OpenVinoBackend(conv3d, precision="fp32", threads=1, patch_size=(8, 8, 8))
        x = batch(1)
        expected = reference(x)
        got = runtime(x)
        assert got.dtype == np.float32 and got.shape == expected.shape == (1, 3, 8, 8, 8)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("n", [1, 2, 3, 5])
    def test_batches_are_padded_or_split_to_the_compiled_batch(self, conv3d, n):
        reference = OnnxRuntimeBackend(conv3d, providers=["CPUExecutionProvider"], threads=1)
        runtime = OpenVinoBackend(
            conv3d, precision="fp32", threads=1, patch_size=(8, 8, 8), batch_size=2, in_channels=4
        )
        assert runtime.static
        x = batch(n, seed=n)
        got = runtime(x)
        assert got.shape == (n, 3, 8, 8, 8)
        np.testing.assert_allclose(got, reference(x), rtol=1e-4, atol=1e-4)

    def test_other_window_sizes_run_on_a_dynamic_compilation(self, conv3d):
        reference = OnnxRuntimeBackend(conv3d, providers=["CPUExecutionProvider"], threads=1)
        runtime = OpenVinoBackend(conv3d, precision="fp32", threads=1, patch_size=(8, 8, 8))
        x = batch(2, size=(5, 6, 7))
        np.testing.assert_allclose(runtime(x), reference(x), rtol=1e-4, atol=1e-4)

    def test_results_are_copies(self, conv3d):
        runtime = OpenVinoBackend(conv3d, precision="fp32", threads=1, patch_size=(8, 8, 8))
        first = runtime(batch(1, seed=1))
        kept = first.copy()
        runtime(batch(1, seed=2))  # the request reuses its output memory
        np.testing.assert_array_equal(first, kept)

    def test_threads_each_get_their_own_request(self, conv3d):
        runtime = OpenVinoBackend(conv3d, precision="fp32", threads=1, patch_size=(8, 8, 8))
        inputs = [batch(1, seed=s) for s in range(4)]
        expected = [runtime(x) for x in inputs]
        results: dict[int, list[np.ndarray]] = {}

        def work(i: int) -> None:
            results[i] = [runtime(inputs[i]) for _ in range(20)]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for i in range(4):
            for out in results[i]:
                np.testing.assert_array_equal(out, expected[i])

    def test_reads_the_card_in_the_onnx_metadata(self, conv3d):
        reference = OnnxRuntimeBackend(conv3d, providers=["CPUExecutionProvider"], threads=1)
        runtime = OpenVinoBackend(conv3d, precision="fp32", threads=1)
        assert runtime.metadata and runtime.metadata == reference.metadata
        assert runtime.inputs == reference.inputs and runtime.outputs[0].shape[:2] == (None, 3)

    def test_model_and_engine_give_the_oracle_labels(self, tmp_path):
        path = build_model(tmp_path, "point3d", *pointwise_weights(), patch_size=(4, 4, 4))
        model = OnnxModel(path, BackendOptions(backend="openvino", precision="fp32", threads=1))
        assert (model.backend, model.device, model.precision, model.provider) == (
            "openvino", "CPU", "fp32", "OpenVINO CPU"
        )
        result = Engine([model]).segment(scan(), tta=True)
        np.testing.assert_array_equal(result.labels, expected_labels())

    @needs_bf16
    def test_bf16_is_close_to_fp32(self, conv3d):
        fp32 = OpenVinoBackend(conv3d, precision="fp32", threads=1, patch_size=(8, 8, 8))
        bf16 = OpenVinoBackend(conv3d, precision="bf16", threads=1, patch_size=(8, 8, 8))
        assert bf16.precision == "bf16"
        x = batch(1)
        a, b = fp32(x), bf16(x)
        assert not np.array_equal(a, b)  # really another precision
        scale = float(np.abs(a).max())
        assert float(np.abs(a - b).max()) < 0.05 * scale

    def test_unreadable_file_is_a_value_error(self, tmp_path):
        path = tmp_path / "broken.onnx"
        path.write_bytes(b"not a model")
        with pytest.raises(ValueError, match="OpenVINO cannot read the model"):
            OpenVinoBackend(path)


def test_one_default_for_the_cudnn_search_everywhere():
    """The service's settings, the options they make, and the options of `training evaluate` agree."""
    from service.inference import backends
    from service.settings import Settings
    from training.evaluate import CARD_BACKEND

    defaults = {
        "settings": Settings.model_fields["cudnn_conv_algo_search"].default,
        "service options": Settings().backend_options().cudnn_conv_algo_search,
        "BackendOptions": backends.BackendOptions().cudnn_conv_algo_search,
        "evaluate": CARD_BACKEND.cudnn_conv_algo_search,
    }
    assert set(defaults.values()) == {backends.DEFAULT_CUDNN_CONV_ALGO_SEARCH}, defaults


def test_settings_become_backend_options_whole():
    """Every backend setting reaches BackendOptions under its own name."""
    from service.settings import Settings

    settings = Settings(backend="onnxruntime", precision="fp32", providers=["CPUExecutionProvider"], threads=3,
                        batch_size=2, cudnn_conv_algo_search="EXHAUSTIVE", gpu_mem_limit_bytes=1 << 30)
    options = settings.backend_options()
    assert options == BackendOptions(backend="onnxruntime", precision="fp32", providers=("CPUExecutionProvider",),
                                     threads=3, batch_size=2, cudnn_conv_algo_search="EXHAUSTIVE",
                                     gpu_mem_limit_bytes=1 << 30)
    for name in ("backend", "precision", "threads", "batch_size", "cudnn_conv_algo_search", "gpu_mem_limit_bytes"):
        assert getattr(options, name) == getattr(settings, name)


@pytest.mark.parametrize("field, value, message", [
    ("threads", 0, "threads must be at least 1"),
    ("batch_size", 0, "batch_size must be at least 1"),
    ("cudnn_conv_algo_search", "FASTEST", "cudnn_conv_algo_search must be one of"),
])
def test_backend_options_refuse_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        BackendOptions(**{field: value})
