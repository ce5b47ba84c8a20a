"""Inference backends: what runs an exported network on a batch of windows.

Two implementations read the same ``NAME.onnx`` file:

- :class:`OnnxRuntimeBackend`: ONNX Runtime, on CUDA when this build has it and a GPU is usable, else on its
  CPU execution provider. fp32.
- :class:`OpenVinoBackend`: OpenVINO on the CPU (the ``openvino`` package, x86 CPUs). It runs 3D convolutions
  several times faster than ONNX Runtime's CPU provider, and in bf16 on CPUs that have it (AMX or
  AVX512-BF16).

:func:`open_backend` picks one: ``auto`` means CUDA through ONNX Runtime when a GPU is usable, else OpenVINO on
an x86 CPU when the package is installed, else ONNX Runtime on the CPU. Precision ``auto`` means
:data:`AUTO_CPU_PRECISION` on OpenVINO when the CPU supports bf16 (else fp32), and fp32 on ONNX Runtime.

Each backend exposes the same small surface: ``__call__(batch) -> logits``, what it really runs on
(``backend``, ``device``, ``precision``, ``provider``), the model's ONNX metadata and its input and output
signatures, so that :class:`~service.inference.model.OnnxModel` checks every model the same way.
"""

from __future__ import annotations

import logging
import platform
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Protocol, Sequence

import numpy as np
import onnxruntime as ort

logger = logging.getLogger(__name__)

BackendName = Literal["auto", "onnxruntime", "openvino"]
Precision = Literal["auto", "fp32", "bf16"]
BACKENDS: tuple[str, ...] = ("onnxruntime", "openvino")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")

AUTO_CPU_PRECISION = "bf16"
"""What ``precision=auto`` means on a CPU with bf16 support (OpenVINO): chosen from the benchmark, where bf16
kept Dice within 0.005 of fp32 on the synthetic validation cases (README, "Performance")."""

DEFAULT_PROVIDERS: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
CUDNN_CONV_ALGO_SEARCH: tuple[str, ...] = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
DEFAULT_CUDNN_CONV_ALGO_SEARCH = "HEURISTIC"
"""The one default of the cuDNN search, for the service's settings, ``evaluate`` and every backend."""
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class Port:
    """A network input or output: name, shape (``None`` where the size is not fixed) and element type."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


class Backend(Protocol):
    """What :class:`~service.inference.model.OnnxModel` needs of a backend."""

    backend: str
    device: str
    precision: str

    @property
    def provider(self) -> str: ...

    @property
    def metadata(self) -> dict[str, str]: ...

    @property
    def inputs(self) -> list[Port]: ...

    @property
    def outputs(self) -> list[Port]: ...

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


# ------------------------------------------------------------------------------------------ ONNX Runtime
def provider_list(
    wanted: Sequence[str],
    available: Sequence[str],
    *,
    cudnn_conv_algo_search: str = DEFAULT_CUDNN_CONV_ALGO_SEARCH,
    gpu_mem_limit: int | None = None,
) -> list[str | tuple[str, dict[str, str]]]:
    """ONNX Runtime ``providers`` argument: ``wanted`` in order, those not ``available`` left out.

    CUDA gets its options: the cuDNN convolution algorithm search, and an arena that grows by what is
    asked for (``kSameAsRequested``) rather than doubling, so that large 3D activations do not reserve
    twice their size, capped at ``gpu_mem_limit`` bytes when given.
    """
    if cudnn_conv_algo_search not in CUDNN_CONV_ALGO_SEARCH:
        raise ValueError(
            f"cudnn_conv_algo_search must be one of {list(CUDNN_CONV_ALGO_SEARCH)}, got {cudnn_conv_algo_search!r}"
        )
    providers: list[str | tuple[str, dict[str, str]]] = []
    for name in wanted:
        if name not in available:
            continue
        if name == CUDA:
            options = {"cudnn_conv_algo_search": cudnn_conv_algo_search, "arena_extend_strategy": "kSameAsRequested"}
            if gpu_mem_limit is not None:
                options["gpu_mem_limit"] = str(int(gpu_mem_limit))
            providers.append((name, options))
        else:
            providers.append(name)
    return providers


def session_options(intra_op_threads: int | None = None) -> ort.SessionOptions:
    """Session options set on purpose: all graph optimisations, sequential execution, optional thread count."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if intra_op_threads is not None:
        _check_threads(intra_op_threads)
        options.intra_op_num_threads = int(intra_op_threads)
    return options


def _check_threads(threads: int) -> None:
    if threads < 1:
        raise ValueError(f"threads must be at least 1 (or None for the backend's default), got {threads}")


def _ort_type(type_name: str) -> str:
    return {"tensor(float)": "float32"}.get(type_name, type_name)


class OnnxRuntimeBackend:
    """An ONNX Runtime session (CUDA or CPU execution provider), fp32.

    Args:
        path: the ``.onnx`` file.
        providers: execution providers in order of preference; default CUDA then CPU, whichever this build
            has. Naming one that it lacks is an error.
        threads: intra-op threads; ``None`` leaves ONNX Runtime's default (all cores).
        cudnn_conv_algo_search, gpu_mem_limit: CUDA options (see :func:`provider_list`).

    Raises:
        ValueError: a named provider is missing, or ONNX Runtime cannot load the file.
    """

    backend = "onnxruntime"
    precision = "fp32"

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        cudnn_conv_algo_search: str = DEFAULT_CUDNN_CONV_ALGO_SEARCH,
        gpu_mem_limit: int | None = None,
    ) -> None:
        available = ort.get_available_providers()
        if providers is None:
            wanted = list(DEFAULT_PROVIDERS)
        else:
            wanted = list(providers)
            missing = [p for p in wanted if p not in available]
            if missing:
                raise ValueError(f"execution providers {missing} are not available; this build has {available}")
        chosen = provider_list(
            wanted, available, cudnn_conv_algo_search=cudnn_conv_algo_search, gpu_mem_limit=gpu_mem_limit
        )
        if not chosen:
            raise ValueError(f"none of the execution providers {wanted} is available; this build has {available}")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options(threads), providers=chosen)
        except Exception as exc:  # ONNX Runtime raises its own types for corrupt or unsupported files
            raise ValueError(f"{path}: ONNX Runtime cannot load the model: {exc}") from exc
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    @property
    def provider(self) -> str:
        """The execution provider the session really uses (ONNX Runtime may fall back to the CPU)."""
        return self.session.get_providers()[0]

    @property
    def device(self) -> str:
        return "GPU" if self.provider == CUDA else "CPU"

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def inputs(self) -> list[Port]:
        return [_ort_port(arg) for arg in self.session.get_inputs()]

    @property
    def outputs(self) -> list[Port]:
        return [_ort_port(arg) for arg in self.session.get_outputs()]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run([self._output], {self._input: batch})
        return logits


def _ort_port(arg) -> Port:
    return Port(arg.name, tuple(d if isinstance(d, int) else None for d in arg.shape), _ort_type(arg.type))


# -------------------------------------------------------------------------------------------- OpenVINO
@lru_cache(maxsize=1)
def openvino_available() -> bool:
    """Whether the ``openvino`` package imports and offers a CPU device."""
    try:
        import openvino as ov

        return "CPU" in ov.Core().available_devices
    except Exception:  # not installed, or no usable runtime on this platform
        return False


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """Whether OpenVINO can run bf16 natively on this CPU (AMX or AVX512-BF16)."""
    if not openvino_available():
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _ov_dims(shape) -> tuple[int | None, ...]:
    return tuple(d.get_length() if d.is_static else None for d in shape)


class OpenVinoBackend:
    """An OpenVINO model compiled for the CPU in fp32 or bf16.

    The network is compiled for windows of ``patch_size`` in batches of ``batch_size`` (static shapes run
    faster); a smaller batch is padded, a larger one split, and a window of any other size runs on a second,
    dynamic compilation made the first time it is needed. Each calling thread has its own infer request, so
    concurrent inferences are safe.

    Args:
        path: the ``.onnx`` file.
        precision: ``fp32`` or ``bf16`` (bf16 only where :func:`cpu_supports_bf16`).
        threads: inference threads; ``None`` leaves OpenVINO's default (all cores).
        patch_size: the window the network is compiled for (the card's ``patch_size``); ``None``: dynamic.
        batch_size: windows per call it is compiled for.
        in_channels: input channels (the card's), where the file leaves them open.

    Raises:
        ValueError: OpenVINO is missing, bf16 is asked of a CPU without it, or OpenVINO cannot read the file.
    """

    backend = "openvino"
    device = "CPU"

    def __init__(
        self,
        path: str | Path,
        *,
        precision: str = "fp32",
        threads: int | None = None,
        patch_size: Sequence[int] | None = None,
        batch_size: int = 1,
        in_channels: int | None = None,
    ) -> None:
        if not openvino_available():
            raise ValueError(
                "the openvino backend needs the openvino package on an x86 CPU (pip install openvino); "
                "or set BRATS_BACKEND=onnxruntime"
            )
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if precision == "bf16" and not cpu_supports_bf16():
            raise ValueError("this CPU has no native bf16 (AMX or AVX512-BF16); set BRATS_PRECISION=fp32")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        import openvino as ov

        self._ov = ov
        self.precision = precision
        self.batch_size = int(batch_size)
        self._config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",  # AMX CPUs default to bf16
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads is not None:
            _check_threads(threads)
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._core = ov.Core()
        try:
            self._model = self._core.read_model(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: OpenVINO cannot read the model: {exc}") from exc
        self._inputs = [Port(p.get_any_name(), _ov_dims(p.get_partial_shape()), _ov_type(p)) for p in self._model.inputs]
        self._outputs = [
            Port(p.get_any_name(), _ov_dims(p.get_partial_shape()), _ov_type(p)) for p in self._model.outputs
        ]
        self._metadata = _ov_metadata(self._model)
        self._patch = tuple(int(p) for p in patch_size) if patch_size is not None else None
        self._static = None
        self._dynamic = None
        self._local = threading.local()
        self._lock = threading.Lock()
        if self._patch is not None and len(self._inputs) == 1 and len(self._inputs[0].shape) == 2 + len(self._patch):
            static = self._model.clone()
            channels = self._inputs[0].shape[1] or in_channels
            if channels is not None:
                static.reshape({static.inputs[0]: ov.PartialShape([self.batch_size, channels, *self._patch])})
                self._static = self._compile(static)
        if self._static is None:
            self._dynamic = self._compile(self._model)

    @property
    def static(self) -> bool:
        """Whether the network is compiled for fixed windows (``patch_size``, ``batch_size``)."""
        return self._static is not None

    def _compile(self, model):
        try:
            return self._core.compile_model(model, "CPU", self._config)
        except Exception as exc:
            raise ValueError(f"OpenVINO cannot compile the model for the CPU: {exc}") from exc

    @property
    def provider(self) -> str:
        return "OpenVINO CPU"

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    @property
    def inputs(self) -> list[Port]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[Port]:
        return list(self._outputs)

    def _request(self, kind: str):
        requests = self._local.__dict__.setdefault("requests", {})
        if kind not in requests:
            if kind == "dynamic" and self._dynamic is None:
                with self._lock:
                    if self._dynamic is None:
                        self._dynamic = self._compile(self._model)
            requests[kind] = (self._static if kind == "static" else self._dynamic).create_infer_request()
        return requests[kind]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self._static is None or tuple(batch.shape[2:]) != self._patch:
            return self._run(self._request("dynamic"), batch)
        request = self._request("static")
        n = self.batch_size
        if batch.shape[0] == n:
            return self._run(request, batch)
        parts = []
        for first in range(0, batch.shape[0], n):
            chunk = batch[first : first + n]
            if chunk.shape[0] < n:  # pad the last chunk to the compiled batch
                padded = np.zeros((n, *chunk.shape[1:]), dtype=chunk.dtype)
                padded[: chunk.shape[0]] = chunk
                parts.append(self._run(request, padded)[: chunk.shape[0]])
            else:
                parts.append(self._run(request, chunk))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @staticmethod
    def _run(request, batch: np.ndarray) -> np.ndarray:
        request.infer({0: batch})
        return np.array(request.get_output_tensor(0).data)  # a copy: the request reuses its output memory


def _ov_type(port) -> str:
    name = port.get_element_type().get_type_name()
    return {"f32": "float32"}.get(name, name)


def _ov_metadata(model) -> dict[str, str]:
    """The ONNX ``metadata_props`` as OpenVINO keeps them (runtime info ``framework``)."""
    try:
        info = model.get_rt_info()
        if "framework" not in info:
            return {}
        framework = info["framework"]
        framework = framework.astype(dict) if hasattr(framework, "astype") else framework
        return {str(k): (v.astype(str) if hasattr(v, "astype") else str(v)) for k, v in dict(framework).items()}
    except Exception:  # no metadata the way this OpenVINO version keeps it: the card file is checked anyway
        return {}


# ---------------------------------------------------------------------------------------------- choice
def open_backend(
    path: str | Path,
    *,
    backend: str = "auto",
    precision: str = "auto",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    cudnn_conv_algo_search: str = DEFAULT_CUDNN_CONV_ALGO_SEARCH,
    gpu_mem_limit: int | None = None,
    patch_size: Sequence[int] | None = None,
    batch_size: int = 1,
    in_channels: int | None = None,
) -> Backend:
    """Open ``path`` on the backend and precision asked for, resolving ``auto`` (see the module docstring).

    Raises:
        ValueError: an unknown backend or precision, or one this machine cannot run (bf16 on ONNX Runtime or
            on a CPU without bf16, OpenVINO without the package), or a file the backend cannot load.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    ort_options = dict(
        providers=providers, threads=threads, cudnn_conv_algo_search=cudnn_conv_algo_search, gpu_mem_limit=gpu_mem_limit
    )
    if backend == "onnxruntime":
        if precision == "bf16":
            raise ValueError("the onnxruntime backend runs fp32 only; set BRATS_BACKEND=openvino for bf16")
        return OnnxRuntimeBackend(path, **ort_options)
    if backend == "auto":
        wants_cuda = CUDA in ort.get_available_providers() and (providers is None or CUDA in providers)
        if wants_cuda:
            session = OnnxRuntimeBackend(path, **ort_options)
            if session.provider == CUDA and precision != "bf16":
                return session
            del session  # no usable GPU: ONNX Runtime fell back to its CPU provider
        if not (openvino_available() and platform.machine().lower() in ("x86_64", "amd64")):
            if precision == "bf16":
                raise ValueError("bf16 needs the openvino backend on an x86 CPU; set BRATS_PRECISION=fp32")
            cpu_only = [p for p in (providers or DEFAULT_PROVIDERS) if p != CUDA] or [CPU]
            return OnnxRuntimeBackend(path, **{**ort_options, "providers": cpu_only})
    if precision == "auto":
        precision = AUTO_CPU_PRECISION if cpu_supports_bf16() else "fp32"
    return OpenVinoBackend(
        path, precision=precision, threads=threads, patch_size=patch_size, batch_size=batch_size, in_channels=in_channels
    )
