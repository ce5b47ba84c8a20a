"""The OpenVINO backend: exported networks on x86 CPUs, in fp32 or in bf16 where the CPU has it.

OpenVINO runs 3D convolutions several times faster than ONNX Runtime's CPU provider.
:func:`service.inference.backends.open_backend` picks it for ``auto`` on an x86 CPU when the package is
installed.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from service.inference.backends import PRECISIONS, Port, check_threads

logger = logging.getLogger(__name__)


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
            check_threads(threads)
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
