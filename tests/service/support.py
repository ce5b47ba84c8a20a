"""Helpers for the service tests: tiny real ONNX models with cards, NIfTI test volumes, and a real
``python -m service`` process on a free port.

The models are one pointwise Conv each, so their segmentation of :func:`tumour_scan` is known exactly:
after the z-scoring of the brain, the WT logit is ``gain * z(FLAIR) + bias``, TC ``gain * z(T1ce) + bias`` and
ET ``gain * z(T2) + bias``, positive exactly where that channel is bright (10 against a brain of 1).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import httpx
import nibabel as nib
import numpy as np

from service.core.labels import MODALITIES
from service.inference.card import ModelCard, card_path, file_sha256, write_card

PROJECT_ROOT = Path(__file__).resolve().parents[2]

FLAIR, T1, T1CE, T2 = range(4)
SHAPE = (12, 10, 9)
BRAIN = (slice(2, 10), slice(1, 9), slice(1, 8))
WT_BOX = (slice(4, 9), slice(2, 7), slice(2, 7))
TC_BOX = (slice(5, 8), slice(3, 6), slice(3, 6))
ET_BOX = (slice(6, 8), slice(4, 6), slice(4, 5))
SPACING = (1.0, 1.5, 2.0)


# ------------------------------------------------------------------------------------------------ data
def tumour_scan() -> np.ndarray:
    """A raw scan ``(4, 12, 10, 9)`` float32: brain 1, tumour 10 in FLAIR (WT box), T1ce (TC box), T2 (ET box)."""
    image = np.zeros((4, *SHAPE), dtype=np.float32)
    image[(slice(None), *BRAIN)] = 1.0
    image[(FLAIR, *WT_BOX)] = 10.0
    image[(T1CE, *TC_BOX)] = 10.0
    image[(T2, *ET_BOX)] = 10.0
    image[T1] *= 3.0
    return image


def expected_labels() -> np.ndarray:
    """The BraTS labels every test model predicts for :func:`tumour_scan` (ED 2, NCR 1, ET 4)."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[WT_BOX] = 2
    labels[TC_BOX] = 1
    labels[ET_BOX] = 4
    return labels


def affine_for(spacing=SPACING, origin=(-10.0, 20.0, 5.0)) -> np.ndarray:
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = origin
    return affine


def write_nifti(path, data: np.ndarray, affine: np.ndarray | None = None, *, dtype=None) -> Path:
    """Write ``data`` as NIfTI-1 (``.nii`` or ``.nii.gz`` by suffix) with ``affine`` (default :func:`affine_for`)."""
    path = Path(path)
    data = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
    img = nib.Nifti1Image(data, affine_for() if affine is None else affine)
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    nib.save(img, path)
    return path


def write_case(
    folder, image: np.ndarray | None = None, label: np.ndarray | None = None, *, gz: bool = True, affine=None
) -> dict[str, Path]:
    """Write the four modalities (and ``label``) of ``image (4, X, Y, Z)`` as 3D files; returns part -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = tumour_scan() if image is None else image
    suffix = ".nii.gz" if gz else ".nii"
    parts = {m: write_nifti(folder / f"{m}{suffix}", image[i], affine) for i, m in enumerate(MODALITIES)}
    if label is not None:
        parts["label"] = write_nifti(folder / f"label{suffix}", label, affine, dtype=np.uint8)
    return parts


def write_image4d(path, image: np.ndarray | None = None, affine=None) -> Path:
    """Write ``image (4, X, Y, Z)`` as one 4D file ``(X, Y, Z, 4)``."""
    image = tumour_scan() if image is None else image
    return write_nifti(path, np.moveaxis(image, 0, -1), affine)


# ---------------------------------------------------------------------------------------------- models
def build_model(
    folder,
    name: str,
    *,
    spatial_dims: int = 3,
    architecture: str = "unet",
    patch_size: tuple[int, ...] | None = None,
    gain: float = 10.0,
    bias: float = -1.0,
) -> Path:
    """Write ``folder/name.onnx`` (one pointwise Conv, dynamic batch and spatial sizes) and its card."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weight = np.zeros((3, 4) + (1,) * spatial_dims, dtype=np.float32)
    for region, channel in enumerate((FLAIR, T1CE, T2)):
        weight[(region, channel) + (0,) * spatial_dims] = gain
    bias_arr = np.full(3, bias, dtype=np.float32)
    axes = ["X", "Y", "Z"][:spatial_dims]
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4, *axes])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, *axes])
    node = helper.make_node("Conv", ["image", "W", "B"], ["logits"])
    graph = helper.make_graph(
        [node], name, [inp], [out],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias_arr, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = ModelCard(
        name=name,
        architecture=architecture,
        spatial_dims=spatial_dims,
        patch_size=tuple(patch_size or (8,) * spatial_dims),
        opset=17,
        parameters=int(weight.size + bias_arr.size),
        training={"data": "none: a hand-made test convolution, not trained"},
        created="2024-01-01T00:00:00Z",
    )
    helper.set_model_props(model, card.to_metadata())
    onnx.checker.check_model(model)
    path = folder / f"{name}.onnx"
    onnx.save(model, path)
    write_card(card.model_copy(update={"sha256": file_sha256(path)}), card_path(path))
    return path


def build_models(folder, *, with_2d: bool = False) -> Path:
    """``unet`` and ``resunet`` (3D), and ``unet2d`` when asked, in ``folder``; returns ``folder``."""
    folder = Path(folder)
    build_model(folder, "unet", architecture="unet")
    build_model(folder, "resunet", architecture="resunet", gain=8.0)
    if with_2d:
        build_model(folder, "unet2d", spatial_dims=2, architecture="unet")
    return folder


# ---------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_env(settings: Mapping[str, object]) -> dict[str, str]:
    """``{"api_keys": ["a", "b"], "max_queue": 2}`` -> ``{"BRATS_API_KEYS": "a,b", "BRATS_MAX_QUEUE": "2"}``."""
    env = {}
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"BRATS_{key.upper()}"] = str(value)
    return env


@dataclass
class Server:
    """A running ``python -m service``: its base ``url``, process and log file."""

    url: str
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def logs(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, **kwargs)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any ``BRATS_*`` variable, CPU only, one thread per model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRATS_")}
    env.update(
        {
            "BRATS_PROVIDERS": "CPUExecutionProvider",
            "BRATS_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])),
        }
    )
    env.update(extra or {})
    return env


def start_server(
    models_dir,
    log_dir,
    *,
    settings: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    args: list[str] | None = None,
    timeout: float = 60.0,
) -> Server:
    """Start ``python -m service --host 127.0.0.1 --port <free>``; wait until ``/healthz`` answers and the
    models are loaded (or failed to load: ``/readyz`` no longer says they are loading).

    Args:
        models_dir: ``BRATS_MODELS_DIR``.
        log_dir: where ``server-<port>.log`` goes.
        settings: more settings, by field name (``{"api_keys": ["k1"], "max_queue": 0}``).
        env: more raw environment variables.
        args: more command line arguments.

    Raises:
        RuntimeError: with the log, if the process exits or does not answer within ``timeout`` seconds.
    """
    port = free_port()
    full_env = base_env({"BRATS_MODELS_DIR": str(models_dir), **settings_env(settings or {}), **(env or {})})
    log_path = Path(log_dir) / f"server-{port}.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), *(args or [])],
        env=full_env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path, env=full_env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with status {process.returncode}:\n{server.logs()}")
        try:
            if httpx.get(server.url + "/healthz", timeout=1.0).status_code == 200:
                ready = httpx.get(server.url + "/readyz", timeout=1.0)
                if ready.status_code == 200 or "still loading" not in ready.text:
                    return server  # loaded, or given up with a reason that tests may check
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"the service did not finish starting within {timeout} s:\n{server.logs()}")
