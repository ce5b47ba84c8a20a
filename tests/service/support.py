"""Helpers for the service tests: tiny real ONNX models with cards, NIfTI test volumes, and a real
``python -m service`` process on a free port.

The models are one pointwise Conv each (:mod:`tests.tiny_models`), so their segmentation of
:func:`tumour_scan` is known exactly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np

from service.core.labels import MODALITIES
from service.launcher import ServiceProcess, clean_env, settings_env, start_service
from tests import tiny_models
from tests.tiny_models import expected_labels, pointwise_weights  # noqa: F401  (expected_labels: re-exported)
from tests.tiny_models import scan as tumour_scan  # noqa: F401  (re-exported for the service tests)

PROJECT_ROOT = Path(__file__).resolve().parents[2]

SPACING = (1.0, 1.5, 2.0)


# ------------------------------------------------------------------------------------------------ data
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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    update = {"architecture": architecture}
    return tiny_models.build_model(
        folder, name, *pointwise_weights(gain, bias, spatial_dims), patch_size=patch_size or (8,) * spatial_dims,
        card_updates=update, metadata_updates=update,
    )


def build_models(folder, *, with_2d: bool = False) -> Path:
    """``unet`` and ``resunet`` (3D), and ``unet2d`` when asked, in ``folder``; returns ``folder``."""
    folder = Path(folder)
    build_model(folder, "unet", architecture="unet")
    build_model(folder, "resunet", architecture="resunet", gain=8.0)
    if with_2d:
        build_model(folder, "unet2d", spatial_dims=2, architecture="unet")
    return folder


# ---------------------------------------------------------------------------------------------- server
Server = ServiceProcess
"""A running ``python -m service`` (:class:`service.launcher.ServiceProcess`)."""


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any ``BRATS_*`` variable: ONNX Runtime on the CPU (the same
    numbers on every host; tests of the other backends set ``BRATS_BACKEND`` themselves), one thread per model."""
    return clean_env({
        "BRATS_BACKEND": "onnxruntime",
        "BRATS_PROVIDERS": "CPUExecutionProvider",
        "BRATS_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        **(extra or {}),
    })


def start_server(
    models_dir,
    log_dir,
    *,
    settings: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    args: list[str] | None = None,
    timeout: float = 60.0,
) -> Server:
    """Start the service (:func:`service.launcher.start_service`) and wait until the models are loaded or
    failed to load (``/readyz`` no longer says they are loading).

    Args:
        models_dir: ``BRATS_MODELS_DIR``.
        log_dir: where ``server-N.log`` goes.
        settings: more settings, by field name (``{"api_keys": ["k1"], "max_queue": 0}``).
        env: more raw environment variables.
        args: more command line arguments.

    Raises:
        RuntimeError: with the log, if the process exits or does not answer within ``timeout`` seconds.
    """
    full_env = base_env({"BRATS_MODELS_DIR": str(models_dir), **settings_env(settings or {}), **(env or {})})
    log_path = Path(tempfile.mkstemp(prefix="server-", suffix=".log", dir=log_dir)[1])
    return start_service(log_path, env=full_env, args=args or [], wait_for="loaded", timeout_s=timeout)
