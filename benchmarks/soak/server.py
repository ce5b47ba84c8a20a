"""The service under test: ``python -m service`` started by :mod:`service.launcher`, with its own upload folder
and log, and what the soak test reads of it (``/proc`` resources, ``/metrics``)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.serving import proc_memory
from service.launcher import HOST, LaunchError, ServiceProcess, clean_env, free_port, service_command, start_service


class SoakError(RuntimeError):
    """The run could not be made (the service did not start, the reference request failed, ...)."""


def open_fds(pid: int) -> int:
    """The number of open file descriptors of a process (entries of ``/proc/PID/fd``)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class Server:
    """``python -m service`` (:func:`service.launcher.start_service`) with its own temporary upload folder and log.

    Args:
        workdir: A folder owned by this run: ``spool/`` becomes ``BRATS_TMP_DIR``, ``server.log`` the log.
        models_dir: ``--models-dir`` of the service.
        settings: More ``BRATS_*`` variables (the caller's own ``BRATS_*`` variables are not passed on).
    """

    def __init__(self, workdir: Path, models_dir: Path, settings: dict[str, str]) -> None:
        self.spool = workdir / "spool"
        self.spool.mkdir()
        self.log_path = workdir / "server.log"
        self.env = clean_env({"BRATS_TMP_DIR": str(self.spool), "BRATS_PROVIDERS": "CPUExecutionProvider", **settings})
        self.args = ["--models-dir", str(models_dir)]
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.service: ServiceProcess | None = None

    @property
    def process(self):
        return self._running().process

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def command(self) -> list[str]:
        return service_command(self.port, self.args)

    @property
    def killed(self) -> bool:
        return self.service is not None and self.service.killed

    def _running(self) -> ServiceProcess:
        if self.service is None:
            raise SoakError("the service has not been started")
        return self.service

    def start(self, timeout_s: float) -> None:
        """Start the process and wait until ``/readyz`` answers 200.

        Raises:
            SoakError: with the end of the log, if it exits, or is not ready within ``timeout_s``.
        """
        try:
            self.service = start_service(self.log_path, env=self.env, args=self.args, port=self.port,
                                         timeout_s=timeout_s)
        except LaunchError as exc:
            raise SoakError(str(exc)) from None

    def alive(self) -> bool:
        return self.service is not None and self.service.alive()

    def log_tail(self, lines: int = 30) -> str:
        return self.service.log_tail(lines) if self.service is not None else "(no log)"

    def resources(self) -> dict[str, int]:
        """``rss``, ``peak_rss`` (bytes) and ``fds`` of the server process now."""
        status = proc_memory(self.pid)
        return {"rss": status["VmRSS"], "peak_rss": status["VmHWM"], "fds": open_fds(self.pid)}

    def inference_load(self, client: httpx.Client) -> tuple[float, float]:
        """``(running, waiting)`` inferences, from ``/metrics``."""
        running = waiting = float("nan")
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("brats_inferences_running "):
                running = float(line.split()[1])
            elif line.startswith("brats_inference_queue_depth "):
                waiting = float(line.split()[1])
        return running, waiting

    def segment_statuses(self) -> dict[str, int]:
        """The service's own count of ``POST /segment`` answers by status, from ``/metrics`` (499: the client
        left before its answer)."""
        counts: Counter = Counter()
        for line in httpx.get(self.url + "/metrics", timeout=10.0).text.splitlines():
            if line.startswith("brats_http_requests_total{") and 'endpoint="/segment"' in line:
                labels, value = line.rsplit(" ", 1)
                status = labels.split('status="', 1)[1].split('"', 1)[0]
                counts[status] += int(float(value))
        return dict(sorted(counts.items()))

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s`` (``killed`` tells); returns the exit status, ``None`` if it
        never started. After a graceful shutdown uvicorn ends by re-raising the signal: status -15."""
        return None if self.service is None else self.service.stop(timeout_s)


def leftovers(folder: Path) -> list[str]:
    """Every file and folder under ``folder``, relative to it."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))
