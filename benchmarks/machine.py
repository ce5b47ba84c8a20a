"""What a benchmark ran on: the machine (CPU, flags, cores, memory, GPU, load) and the library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = (
    "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "torch", "monai", "onnx", "scipy", "nibabel",
    "fastapi", "uvicorn", "httpx",
)
CPU_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
)
"""/proc/cpuinfo flags that decide which kernels the runtimes can use."""


def cpu_info() -> dict[str, Any]:
    """CPU model name and which of :data:`CPU_FLAGS` it has (from ``/proc/cpuinfo``; Linux)."""
    model = None
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or "unknown", "flags": {flag: flag in flags for flag in CPU_FLAGS}}


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), which is what the thread pools should use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gpu_info() -> dict[str, Any] | None:
    """The CUDA GPU torch sees (name, memory, capability), or ``None``."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "memory_bytes": int(props.total_memory),
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
    }


def machine_info() -> dict[str, Any]:
    """Everything about the machine a reader needs to interpret the figures."""
    import onnxruntime as ort

    info: dict[str, Any] = {
        "cpu": cpu_info(),
        "cores_usable": usable_cores(),
        "cpus_online": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "gpu": gpu_info(),
        "onnxruntime_providers": ort.get_available_providers(),
        "os": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "ld_preload": os.environ.get("LD_PRELOAD"),
    }
    try:
        import openvino as ov

        info["openvino_cpu_capabilities"] = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # not installed, or no CPU plugin on this platform
        info["openvino_cpu_capabilities"] = None
    return info


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name != "onnxruntime-gpu":
                versions[name] = "not installed"
    return versions
