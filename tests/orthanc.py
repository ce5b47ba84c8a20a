"""A real Orthanc PACS with its DICOMweb plugin, as a child process, for the tests that speak DICOMweb.

``OrthancServer(tmp_dir)`` writes its own configuration into ``tmp_dir`` (storage and index there too), starts
Debian's ``Orthanc`` on a free port, waits until ``GET /system`` answers, and stops it (SIGTERM, then SIGKILL).
It removes nothing: ``tmp_dir`` (a pytest ``tmp_path``) holds everything it wrote.

    with OrthancServer(tmp_path, username="u", password="p") as pacs:
        pacs.url            # http://127.0.0.1:PORT
        pacs.dicomweb_url   # http://127.0.0.1:PORT/dicom-web

Where it listens: Orthanc 1.10 has no option for the HTTP bind address; its HTTP server listens on every
interface (0.0.0.0:PORT) and, with ``"RemoteAccessAllowed": false``, refuses (401) every client whose address
is not loopback. Its DICOM (DIMSE) server is switched off (``"DicomServerEnabled": false``): the tests
speak DICOMweb only, so no DICOM port is opened at all.

``orthanc_available()`` is false only when the Orthanc binary is missing (``.ci/run`` installs it); a missing
DICOMweb plugin is an error when the server starts, not a reason to skip.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from service.launcher import HOST, free_port, read_log

BINARY_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
PLUGIN_PATTERNS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/*/orthanc/libOrthancDicomWeb.so*",
)
MISSING_REASON = (
    "Orthanc is not installed (Debian packages orthanc and orthanc-dicomweb; .ci/run installs them, "
    "or set ORTHANC_BINARY)"
)
_PORT_IN_USE = "already in use"


class OrthancError(RuntimeError):
    """Orthanc exited, or did not answer in time; the message ends with its log."""


def orthanc_binary() -> str | None:
    """The Orthanc executable: ``$ORTHANC_BINARY``, ``Orthanc`` on the PATH, or Debian's ``/usr/sbin/Orthanc``."""
    override = os.environ.get("ORTHANC_BINARY")
    if override:
        return override if os.access(override, os.X_OK) else None
    found = shutil.which("Orthanc")
    if found:
        return found
    return next((path for path in BINARY_CANDIDATES if os.access(path, os.X_OK)), None)


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared library: ``$ORTHANC_DICOMWEB_PLUGIN`` or where Debian installs it."""
    override = os.environ.get("ORTHANC_DICOMWEB_PLUGIN")
    if override:
        return override if os.path.isfile(override) else None
    for pattern in PLUGIN_PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def orthanc_available() -> bool:
    """Whether the Orthanc binary is here (the only reason a test may skip; see :data:`MISSING_REASON`)."""
    return orthanc_binary() is not None


class OrthancServer:
    """A running Orthanc with DICOMweb at ``/dicom-web``; authentication on when credentials are given."""

    def __init__(
        self,
        tmp_dir: str | Path,
        *,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.tmp_dir = Path(tmp_dir)
        self.username, self.password = username, password
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.config_path = self.tmp_dir / "orthanc.json"
        self.log_path = self.tmp_dir / "orthanc.log"
        self.killed = False

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + "/dicom-web"

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.username, self.password) if self.username is not None else None

    def config(self, http_port: int, dicom_port: int) -> dict:
        plugin = dicomweb_plugin()
        if plugin is None:
            raise OrthancError(f"the Orthanc DICOMweb plugin is missing (Debian package orthanc-dicomweb; "
                               f"looked for {', '.join(PLUGIN_PATTERNS)}; .ci/run installs it)")
        storage = self.tmp_dir / "storage"
        return {
            "Name": "brats-test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": http_port,
            "DicomPort": dicom_port,  # named for completeness: the DICOM server is off
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,  # HTTP answers loopback clients only (it cannot bind to loopback only)
            "AuthenticationEnabled": self.username is not None,
            "RegisteredUsers": {self.username: self.password} if self.username is not None else {},
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
        }

    def logs(self) -> str:
        return read_log(self.log_path)

    def log_tail(self, lines: int = 30) -> str:
        return read_log(self.log_path, lines)

    def start(self, attempts: int = 3) -> OrthancServer:
        """Start Orthanc and wait for ``GET /system``; a port taken in the meantime is retried with another."""
        binary = orthanc_binary()
        if binary is None:
            raise OrthancError(MISSING_REASON)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            self.port = free_port()
            self.config_path.write_text(json.dumps(self.config(self.port, free_port()), indent=2))
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [binary, str(self.config_path)], cwd=self.tmp_dir, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            try:
                self._wait_ready()
                return self
            except OrthancError:
                self.stop()
                if _PORT_IN_USE not in self.logs() or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancError(f"Orthanc exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                answer = httpx.get(self.url + "/system", auth=self.auth, timeout=2.0)
                if answer.status_code == 200:
                    return
                last = f"GET /system answered {answer.status_code}"
            except httpx.TransportError as exc:
                last = type(exc).__name__
            time.sleep(0.05)
        raise OrthancError(f"Orthanc did not answer within {self.timeout_s:.0f} s ({last}):\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s`` seconds; returns the exit status. Files stay in tmp_dir."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                process.kill()
                process.wait(timeout_s)
        return process.returncode

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
