"""The service measured from outside: a real ``python -m service`` process on a loopback port, real HTTP
clients, and the process's memory from ``/proc/PID/status``.

Each server runs with the default settings except ``BRATS_MODELS_DIR``, ``BRATS_TMP_DIR`` (a folder of this
run) and what a section sets on purpose (``BRATS_MAX_QUEUE`` for the load); the caller's own ``BRATS_*``
variables are not passed on, so that the figures are those of a default installation.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.core.labels import MODALITIES
from service.launcher import LaunchError, ServiceProcess, clean_env, start_service
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 900.0


class ServiceError(RuntimeError):
    """The service could not be started, or answered a request with an error."""


def proc_memory(pid: int) -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            number, unit = rest.split()
            values[key] = int(number) * (1024 if unit.lower() == "kb" else 1)
    return values


class Server:
    """``python -m service`` (:func:`service.launcher.start_service`) with its own upload folder and log.

    Args:
        workdir: a folder of this run (the upload folder and the log go there).
        models_dir: ``BRATS_MODELS_DIR``.
        settings: further ``BRATS_*`` variables.
    """

    def __init__(self, workdir: Path, models_dir: Path, settings: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.spool = Path(tempfile.mkdtemp(prefix="spool-", dir=workdir))
        self.log_path = self.spool.with_name(self.spool.name + ".log")
        self.settings = {"BRATS_MODELS_DIR": str(models_dir), "BRATS_TMP_DIR": str(self.spool), **(settings or {})}
        self.service: ServiceProcess | None = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self._running().url

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def startup_s(self) -> float:
        """Seconds from the start of the process until ``/readyz`` answered 200."""
        return self._running().startup_s

    def _running(self) -> ServiceProcess:
        if self.service is None:
            raise ServiceError("the service has not been started")
        return self.service

    def start(self) -> None:
        """Start it and wait until ``/readyz`` answers 200."""
        try:
            self.service = start_service(self.log_path, env=clean_env(self.settings), timeout_s=READY_TIMEOUT_S)
        except LaunchError as exc:
            raise ServiceError(str(exc)) from None

    def memory(self) -> dict[str, int]:
        return proc_memory(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        return self.service.log_tail(lines) if self.service is not None else "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.service is not None:
            self.service.stop(timeout_s)


@dataclass(frozen=True)
class Parts:
    """The four modality files of one case, written once as ``.nii.gz`` the way the generator writes BraTS
    files, kept as bytes."""

    files: dict[str, bytes]
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def write(cls, image: np.ndarray, affine: np.ndarray, folder: Path, *, dtype=np.int16) -> Parts:
        from service.core.geometry import Geometry
        from service.core.nifti_write import save_image

        folder.mkdir(parents=True, exist_ok=True)
        geometry = Geometry.from_affine(image.shape[1:], affine)
        files = {}
        for index, modality in enumerate(MODALITIES):
            path = folder / f"case_{modality}.nii.gz"
            save_image(image[index], geometry, path, dtype=dtype)
            files[modality] = path.read_bytes()
        return cls(files=files, dtype=np.dtype(dtype).name, shape=tuple(int(s) for s in image.shape[1:]))

    @property
    def bytes(self) -> int:
        return sum(len(data) for data in self.files.values())

    def multipart(self) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [(m, (f"case_{m}.nii.gz", data, "application/gzip")) for m, data in self.files.items()]


@dataclass(frozen=True)
class Answer:
    """One request's outcome: client-side latency (POST to the last byte), the server's ``timing_ms``."""

    latency_ms: float
    timing_ms: dict[str, float]
    status: int
    response_bytes: int


def segment(client: httpx.Client, parts: Parts, *, model: str, fmt: str) -> Answer:
    """POST the case to ``/segment`` and read the whole answer.

    Raises:
        ServiceError: anything but 200.
    """
    started = time.perf_counter()
    response = client.post("/segment", params={"model": model, "format": fmt}, files=parts.multipart())
    content = response.content  # already read in full: httpx reads the body unless streaming
    latency_ms = 1000 * (time.perf_counter() - started)
    if response.status_code != 200:
        raise ServiceError(f"POST /segment model={model} format={fmt}: {response.status_code} {response.text[:300]}")
    if fmt == "json":
        summary = json.loads(content)
    else:
        summary = json.loads(response.headers["X-Segment-Summary"])
    if tuple(summary["shape"]) != parts.shape:
        raise ServiceError(f"the answer's shape {summary['shape']} is not the case's {list(parts.shape)}")
    return Answer(latency_ms, {k: float(v) for k, v in summary["timing_ms"].items()}, 200, len(content))


def client_for(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S)


def outside_share(answer: Answer) -> dict[str, float]:
    """Where a request's time went, in ms and as shares of the client latency.

    ``upload`` is the server's time in the route outside the job (receiving and spooling the body, waiting
    for a slot); ``decode`` reading the NIfTI parts; ``preprocess`` crop and normalisation; ``inference``
    model execution (windows, sigmoid, blending); ``postprocess`` labels, uncrop, volumes and encoding the
    mask; ``rest`` the client latency outside the route (HTTP parsing, routing, encoding the answer, the
    client building the upload and reading the answer).
    """
    t = answer.timing_ms
    inner = t["decode"] + t["preprocess"] + t["inference"] + t["postprocess"]
    parts = {
        "upload": max(t["total"] - inner, 0.0),
        "decode": t["decode"],
        "preprocess": t["preprocess"],
        "inference": t["inference"],
        "postprocess": t["postprocess"],
        "rest": max(answer.latency_ms - t["total"], 0.0),
    }
    return parts


def run_clients(
    server: Server, parts: Parts, *, clients: int, requests: int, model: str, fmt: str
) -> dict[str, Any]:
    """``requests`` requests from ``clients`` concurrent clients (threads, one connection each).

    Returns:
        ``latencies_ms`` (in completion order), ``wall_s`` (first send to last answer) and ``errors``.
    """
    lock = threading.Lock()
    remaining = [requests]
    latencies: list[float] = []
    errors: list[str] = []

    def worker() -> None:
        with client_for(server) as client:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                try:
                    answer = segment(client, parts, model=model, fmt=fmt)
                except (ServiceError, httpx.HTTPError) as exc:
                    with lock:
                        errors.append(str(exc)[:200])
                    continue
                with lock:
                    latencies.append(answer.latency_ms)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies_ms": latencies, "wall_s": time.perf_counter() - started, "errors": errors}

