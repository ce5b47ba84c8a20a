"""Service configuration: one pydantic-settings class read from ``BRATS_*`` environment variables.

Every field has a default that lets ``python -m service`` start with no configuration at all, on the
models shipped in ``models/`` at the project root. Field docstrings are the reference the README is
written from. Lists (``BRATS_API_KEYS``, ``BRATS_PROVIDERS``) are comma-separated.

Nothing is read at import time: :func:`get_settings` reads the environment once, on first use, and tests
build :class:`Settings` directly (``create_app(Settings(models_dir=...))``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.inference.backends import DEFAULT_CUDNN_CONV_ALGO_SEARCH, BackendOptions

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = PROJECT_ROOT / "models"


def _split_list(value: object) -> object:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; an empty string is an empty list; lists pass through."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Configuration of the segmentation service (environment variable ``BRATS_<FIELD NAME>``)."""

    model_config = SettingsConfigDict(
        env_prefix="BRATS_", extra="ignore", validate_default=True, use_attribute_docstrings=True, populate_by_name=True
    )

    models_dir: Path = DEFAULT_MODELS_DIR
    """Folder of ``NAME.onnx`` models with their ``NAME.json`` cards (default: ``models/`` of the project)."""

    default_model: str | None = None
    """Model used when a request names none; default ``resunet`` if loaded, else the first name in order."""

    require_models: bool = False
    """Refuse to start (one-line error, exit status 2) when the models cannot be loaded. When false the
    service starts anyway and ``/readyz`` answers 503 with the reason."""

    host: str = "127.0.0.1"
    """Interface to listen on (``0.0.0.0`` in a container)."""

    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port to listen on."""

    max_upload_bytes: int = Field(default=1 << 30, ge=1)
    """Largest accepted upload in bytes, all parts together (default 1 GiB); more is refused with 413."""

    max_voxels: int = Field(default=64 * 2**20, ge=1)
    """Largest volume, in voxels per volume as its header claims (default 64 Mi); more is refused with 413
    before anything is inflated."""

    backend: Literal["auto", "onnxruntime", "openvino"] = "auto"
    """What runs the models: ``onnxruntime`` (CUDA when a GPU is usable, else its CPU provider), ``openvino``
    (x86 CPUs, several times faster there), or ``auto``: CUDA through ONNX Runtime when a GPU is usable, else
    OpenVINO when installed on an x86 CPU, else ONNX Runtime on the CPU. ``GET /models`` shows the choice."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``fp32``, or ``bf16`` (OpenVINO on a CPU with AMX or AVX512-BF16 only); ``auto``: bf16 where the CPU has
    it and OpenVINO runs, else fp32."""

    providers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """ONNX Runtime execution providers in order of preference, e.g. ``CPUExecutionProvider``; empty means
    CUDA when this build has it, else the CPU."""

    threads: int | None = Field(default=None, ge=1)
    """ONNX Runtime intra-op threads per model; unset leaves ONNX Runtime's default (all cores)."""

    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = DEFAULT_CUDNN_CONV_ALGO_SEARCH
    """cuDNN convolution algorithm search on CUDA (``EXHAUSTIVE`` benchmarks on the first request)."""

    gpu_mem_limit_bytes: int | None = Field(default=None, ge=1)
    """Cap of ONNX Runtime's CUDA memory arena per model, in bytes; unset: no cap (CUDA only)."""

    overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    """Sliding-window overlap between neighbouring tiles, in [0, 1)."""

    batch_size: int = Field(default=1, ge=1)
    """Tiles (3D models) or slices (2D models) per network call."""

    max_concurrent: int = Field(default=1, ge=1)
    """Inferences that run at the same time; each holds a whole volume and its probabilities in memory."""

    max_queue: int = Field(default=4, ge=0)
    """Requests that may wait for an inference slot; one more is answered 503 with ``Retry-After``."""

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Accepted values of the ``X-API-Key`` header, comma-separated; empty turns API keys off.
    When set, ``POST /segment`` needs a key."""

    protect_metadata: bool = False
    """With API keys set, ``GET /models`` and ``GET /metrics`` need a key too. ``/healthz``, ``/readyz``,
    ``/docs`` and ``/openapi.json`` never do."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Logging level of the service and of uvicorn."""

    tmp_dir: Path | None = None
    """Where uploads are spooled while a request runs (removed when it ends); default the system temp."""

    idle_timeout_s: float = Field(
        default=60.0, gt=0, validation_alias=AliasChoices("BRATS_IDLE_TIMEOUT_S", "BRATS_REQUEST_TIMEOUT_S")
    )
    """Longest wait for the next chunk of a request body, in seconds; a stalled client is cut off (408).
    ``BRATS_REQUEST_TIMEOUT_S`` is read too, as an older name of this setting."""

    upload_timeout_s: float = Field(default=600.0, gt=0)
    """Longest time for a whole request body, in seconds (default 10 min: 1 GiB at about 2 MB/s); a client
    that trickles its upload more slowly is cut off (408)."""

    max_dicom_instances: int = Field(default=5000, ge=1)
    """Most DICOM instances (files and zip members) in one request; more is refused with 413."""

    max_dicom_bytes: int = Field(default=4 << 30, ge=1)
    """Most bytes the zips of one request may inflate to (default 4 GiB); more is refused with 413."""

    series_rules: Path | None = None
    """JSON file of the rules that tell FLAIR, T1, T1ce and T2 series apart by SeriesDescription; unset: the
    built-in rules (docs/dicom.md)."""

    dicomweb_url: str | None = None
    """DICOMweb root of the PACS for ``/dicomweb/studies/{uid}/segment``, e.g. ``http://orthanc:8042/dicom-web``;
    unset turns that route off (503)."""

    dicomweb_username: str | None = None
    """User name for the PACS (HTTP basic authentication); unset: none."""

    dicomweb_password: SecretStr | None = None
    """Password for the PACS, with ``BRATS_DICOMWEB_USERNAME``."""

    dicomweb_timeout_s: float = Field(default=60.0, gt=0)
    """Longest wait for one answer of the PACS, in seconds (502 after it)."""

    @field_validator("series_rules")
    @classmethod
    def _rules_readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            from service.core.series_rules import load_rules

            load_rules(value)  # a bad file stops the service at start, with its reason
        return value

    @field_validator("api_keys", "providers", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("tmp_dir")
    @classmethod
    def _writable_folder(cls, value: Path | None) -> Path | None:
        if value is not None and not (value.is_dir() and os.access(value, os.W_OK | os.X_OK)):
            raise ValueError(f"{value} is not a writable folder; create it or point BRATS_TMP_DIR elsewhere")
        return value

    @field_validator("default_model", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value


    def backend_options(self) -> BackendOptions:
        """How the models run: the backend settings, passed whole to every model."""
        return BackendOptions(
            backend=self.backend,
            precision=self.precision,
            providers=tuple(self.providers) or None,
            threads=self.threads,
            batch_size=self.batch_size,
            cudnn_conv_algo_search=self.cudnn_conv_algo_search,
            gpu_mem_limit_bytes=self.gpu_mem_limit_bytes,
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings from the environment, read once (``get_settings.cache_clear()`` to read again)."""
    return Settings()
