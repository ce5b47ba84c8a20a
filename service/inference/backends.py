"""Inference backends: what runs an exported network on a batch of windows.

Two implementations read the same ``NAME.onnx`` file:

- :class:`OnnxRuntimeBackend`: ONNX Runtime, on CUDA when this build has it and a GPU is usable, else on its
  CPU execution provider. fp32.
- :class:`~service.inference.openvino_backend.OpenVinoBackend`: OpenVINO on the CPU (the ``openvino`` package,
  x86 CPUs). It runs 3D convolutions several times faster than ONNX Runtime's CPU provider, and in bf16 on
  CPUs that have it (AMX or AVX512-BF16).

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
from dataclasses import dataclass
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
class BackendOptions:
    """How exported networks run, built once (from :class:`~service.settings.Settings` or a command line) and
    passed whole to :func:`open_backend`. Each field has the name of its setting (``BRATS_<FIELD>``).

    Attributes:
        backend: ``auto``, ``onnxruntime`` or ``openvino`` (see the module docstring).
        precision: ``auto``, ``fp32`` or ``bf16`` (OpenVINO on a CPU with bf16 only).
        providers: ONNX Runtime execution providers in order of preference; ``None``: CUDA when this build
            has it, else the CPU. Naming one that the build lacks is an error.
        threads: intra-op threads per model; ``None`` leaves the backend's default (all cores).
        batch_size: windows per network call (OpenVINO compiles for it).
        cudnn_conv_algo_search: the cuDNN convolution search on CUDA (:data:`CUDNN_CONV_ALGO_SEARCH`).
        gpu_mem_limit_bytes: cap of ONNX Runtime's CUDA memory arena per model; ``None``: no cap.
    """

    backend: str = "auto"
    precision: str = "auto"
    providers: tuple[str, ...] | None = None
    threads: int | None = None
    batch_size: int = 1
    cudnn_conv_algo_search: str = DEFAULT_CUDNN_CONV_ALGO_SEARCH
    gpu_mem_limit_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.precision not in ("auto", *PRECISIONS):
            raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.threads is not None:
            check_threads(self.threads)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.cudnn_conv_algo_search not in CUDNN_CONV_ALGO_SEARCH:
            raise ValueError(
                f"cudnn_conv_algo_search must be one of {list(CUDNN_CONV_ALGO_SEARCH)}, got "
                f"{self.cudnn_conv_algo_search!r}"
            )
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))


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
    gpu_mem_limit_bytes: int | None = None,
) -> list[str | tuple[str, dict[str, str]]]:
    """ONNX Runtime ``providers`` argument: ``wanted`` in order, those not ``available`` left out.

    CUDA gets its options: the cuDNN convolution algorithm search, and an arena that grows by what is
    asked for (``kSameAsRequested``) rather than doubling, so that large 3D activations do not reserve
    twice their size, capped at ``gpu_mem_limit_bytes`` when given.
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
            if gpu_mem_limit_bytes is not None:
                options["gpu_mem_limit"] = str(int(gpu_mem_limit_bytes))
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
        check_threads(intra_op_threads)
        options.intra_op_num_threads = int(intra_op_threads)
    return options


def check_threads(threads: int) -> None:
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
        cudnn_conv_algo_search, gpu_mem_limit_bytes: CUDA options (see :func:`provider_list`).

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
        gpu_mem_limit_bytes: int | None = None,
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
            wanted, available, cudnn_conv_algo_search=cudnn_conv_algo_search, gpu_mem_limit_bytes=gpu_mem_limit_bytes
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


# ---------------------------------------------------------------------------------------------- choice
def open_backend(
    path: str | Path,
    options: BackendOptions = BackendOptions(),
    *,
    patch_size: Sequence[int] | None = None,
    in_channels: int | None = None,
) -> Backend:
    """Open ``path`` with ``options``, resolving ``auto`` backend and precision (see the module docstring).
    ``patch_size`` and ``in_channels`` (from the model card) let OpenVINO compile for fixed windows.

    Raises:
        ValueError: a backend or precision this machine cannot run (bf16 on ONNX Runtime or on a CPU without
            bf16, OpenVINO without the package), or a file the backend cannot load.
    """
    from service.inference.openvino_backend import OpenVinoBackend, cpu_supports_bf16, openvino_available

    backend, precision, providers = options.backend, options.precision, options.providers
    ort_options = dict(
        providers=providers, threads=options.threads, cudnn_conv_algo_search=options.cudnn_conv_algo_search,
        gpu_mem_limit_bytes=options.gpu_mem_limit_bytes,
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
        path, precision=precision, threads=options.threads, patch_size=patch_size, batch_size=options.batch_size,
        in_channels=in_channels,
    )
