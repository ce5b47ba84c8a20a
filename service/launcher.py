"""The service as a child process: ``python -m service`` on a free loopback port, started, awaited and stopped.

One launcher for everything that runs the real service beside itself: the HTTP tests, the benchmarks and the
soak test. The child gets the caller's environment without any ``BRATS_*`` variable, then the settings it is
given, so a developer's own configuration never leaks into a measurement or a test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class LaunchError(RuntimeError):
    """The service exited, or did not get ready in time; the message ends with its log."""


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
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


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``BRATS_*`` variables, the project importable, output unbuffered,
    then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRATS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def service_command(port: int, args: Sequence[str] = ()) -> list[str]:
    """The command line :func:`start_service` runs."""
    return [sys.executable, "-m", "service", "--host", HOST, "--port", str(port), *args]


def read_log(path: Path, lines: int | None = None) -> str:
    """The text of a process's log file (its last ``lines`` lines when given), or ``"(no log)"``."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text if lines is None else "\n".join(text.splitlines()[-lines:])


@dataclass
class ServiceProcess:
    """A running ``python -m service``: its base ``url``, process, log file and environment."""

    url: str
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    startup_s: float = 0.0
    killed: bool = False
    """Whether :meth:`stop` had to SIGKILL the process."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def logs(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return read_log(self.log_path)

    def log_tail(self, lines: int = 30) -> str:
        return read_log(self.log_path, lines)

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, **kwargs)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s`` seconds; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.process.kill()
                self.process.wait(timeout_s)
        return self.process.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_service(
    log_path: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    port: int | None = None,
    wait_for: Literal["loaded", "ready"] = "ready",
    timeout_s: float = 60.0,
) -> ServiceProcess:
    """Start ``python -m service --host 127.0.0.1 --port FREE ARGS`` and wait for it.

    Args:
        log_path: file for the process's stdout and stderr.
        env: the child's environment (e.g. :func:`clean_env` with settings); default :func:`clean_env` ``()``.
        args: more command line arguments (``--models-dir DIR``, ...).
        port: the loopback port to listen on (default: a free one, :func:`free_port`).
        wait_for: ``"ready"``: until ``/readyz`` answers 200 (a model that failed to load is an error);
            ``"loaded"``: until ``/healthz`` answers and ``/readyz`` no longer says the models are loading
            (loaded, or given up with a reason the caller may check).
        timeout_s: how long to wait.

    Raises:
        LaunchError: with the end of the log, if the process exits or is not there in time.
    """
    port = free_port() if port is None else int(port)
    full_env = dict(env) if env is not None else clean_env()
    log_path = Path(log_path)
    started = time.perf_counter()
    command = service_command(port, args)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=full_env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    service = ServiceProcess(url=f"http://{HOST}:{port}", process=process, log_path=log_path, env=full_env,
                             command=command)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(f"the service exited with status {process.returncode}:\n{service.log_tail()}")
        try:
            if httpx.get(service.url + "/healthz", timeout=2.0).status_code == 200:
                ready = httpx.get(service.url + "/readyz", timeout=2.0)
                last = f"/readyz {ready.status_code}: {ready.text[:300]}"
                loading = "still loading" in ready.text
                if ready.status_code == 200 or (wait_for == "loaded" and not loading):
                    service.startup_s = time.perf_counter() - started
                    return service
                if not loading:
                    service.stop()
                    raise LaunchError(f"the service is not ready: {last}\n{service.log_tail()}")
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    service.stop()
    raise LaunchError(f"the service was not ready within {timeout_s:.0f} s ({last}):\n{service.log_tail()}")
