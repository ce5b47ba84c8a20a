"""Bounded load and soak test of the segmentation service: ``python -m benchmarks.soak [options]``.

The script starts a real ``python -m service`` on a free loopback port: on the CPU (ONNX Runtime is limited
to its CPU provider, and the service's ``auto`` backend then picks OpenVINO where it is installed), with its
own temporary upload folder, ``BRATS_MAX_CONCURRENT=1`` and ``BRATS_MAX_QUEUE=2`` by default. Then it runs
``--clients`` threads for ``--duration`` seconds. Each client loops over requests whose kind it draws at
random (seeded) from a mix of

- valid requests on one small synthetic scan (a bright tumour-like blob in an ellipsoid "brain", four
  modalities written once with nibabel): four 3D parts or one 4D ``image``, ``format=json`` or ``nifti``;
- invalid requests: corrupt gzip (bad checksum), truncated gzip, a missing part, an unknown model, a body
  that is not multipart, a header that claims more voxels than allowed;
- abandoned requests: the client closes the connection part way through the upload, or after sending it
  all, while the service queues or runs it.

Before the load, one valid request on the idle service gives the reference mask: every later 200 must carry
exactly that mask. After the load the script waits until no inference runs or waits, sends one more valid
request, and reads the server's memory (``VmRSS``, ``VmHWM``) and open file descriptors from ``/proc``.

Pass criteria (exit status 1 if any fails, 0 if all pass, 2 if the run itself could not be made):

- every answer is one the request's kind expects (its status, or 503 "queue full" with ``Retry-After``),
  and no request fails at the transport level (abandoned ones excepted);
- no 5xx other than that 503;
- every 200 carries the reference mask, at least one 200 came during the load, and the final request too;
- after the load, the service drains (nothing running or waiting) within ``--drain-timeout`` seconds;
- the resident memory at the end is at most 10% above the one after the warm-up;
- no more open file descriptors at the end than after the warm-up;
- nothing left in the temporary upload folder.

Results go to stdout (a progress line every 10 s, then the tables) and to ``--out`` (default
``runs/soak/``): ``soak.json`` (figures, command line, settings, machine, library versions), ``soak.md``
(the tables, ready to paste) and ``server.log``. Linux only (``/proc``). Ctrl-C or SIGTERM stop the run
and the server.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np

from benchmarks.machine import library_versions, machine_info
from benchmarks.serving import proc_memory
from service.core.labels import MODALITIES
from service.launcher import HOST, LaunchError, ServiceProcess, clean_env, free_port, service_command, start_service

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = PROJECT_ROOT / "models"
DEFAULT_OUT = PROJECT_ROOT / "runs" / "soak"

RSS_TOLERANCE = 0.10
"""The resident memory at the end may exceed the one after the warm-up by at most this fraction."""
PROGRESS_EVERY_S = 10.0
CLAIMED_SHAPE = (1024, 1024, 1024)
"""What the oversized header claims: 1 Gi voxels, far above the service's default limit of 64 Mi."""


class SoakError(RuntimeError):
    """The run could not be made (the service did not start, the reference request failed, ...)."""


# ------------------------------------------------------------------------------------------ the input
def synthetic_scan(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A small BraTS-like scan ``(4, X, Y, Z)`` int16, channels in ``MODALITIES`` order.

    An ellipsoid "brain" on a zero background, with a spherical lesion off centre: a dark core, an enhancing
    rim bright on T1ce, and edema around it bright on FLAIR and T2; a mild intensity gradient and Gaussian
    noise. Deterministic from ``seed``.
    """
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    brain = sum((a / 0.85) ** 2 for a in axes) <= 1.0
    distance = np.sqrt(sum((a - c) ** 2 for a, c in zip(axes, (0.3, -0.2, 0.1)))) / 0.3
    core = brain & (distance <= 0.5)
    rim = brain & (distance > 0.5) & (distance <= 0.75)
    edema = brain & (distance > 0.75) & (distance <= 1.3)
    #            healthy, edema, rim, core
    contrasts = {
        "flair": (300, 650, 550, 500),
        "t1": (500, 430, 420, 250),
        "t1ce": (520, 450, 1100, 260),
        "t2": (400, 900, 700, 1000),
    }
    gradient = 1.0 + 0.05 * axes[0]
    channels = []
    for modality in MODALITIES:
        healthy, in_edema, in_rim, in_core = contrasts[modality]
        volume = np.zeros(shape, dtype=np.float64)
        volume[brain] = healthy
        volume[edema] = in_edema
        volume[rim] = in_rim
        volume[core] = in_core
        volume = volume * gradient + rng.normal(0.0, 12.0, size=shape)
        volume[~brain] = 0.0
        channels.append(np.clip(np.rint(volume), 0, None).astype(np.int16))
    return np.stack(channels)


def _affine() -> np.ndarray:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-32.0, -40.0, -20.0)
    return affine


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> bytes:
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    nib.save(image, path)
    return path.read_bytes()


def _oversized_claim(affine: np.ndarray) -> bytes:
    """A gzip-compressed NIfTI whose header claims :data:`CLAIMED_SHAPE` but holds 4 KiB of data."""
    image = nib.Nifti1Image(np.zeros((16, 16, 8), dtype=np.int16), affine)
    raw = image.to_bytes()
    header = image.header.copy()
    header.set_data_shape(CLAIMED_SHAPE)
    return gzip.compress(header.binaryblock + raw[len(header.binaryblock):], mtime=0)


@dataclass(frozen=True)
class Payloads:
    """The bytes every request is made of, built once at start.

    Attributes:
        modalities: ``.nii.gz`` bytes of each 3D modality, by part name.
        image: ``.nii.gz`` bytes of the same scan as one 4D volume ``(X, Y, Z, 4)``.
        bad_checksum: the FLAIR file with its gzip CRC-32 altered.
        truncated: the first half of the FLAIR file.
        oversized: a FLAIR header claiming :data:`CLAIMED_SHAPE`.
        shape: the scan's shape.
    """

    modalities: dict[str, bytes]
    image: bytes
    bad_checksum: bytes
    truncated: bytes
    oversized: bytes
    shape: tuple[int, int, int]

    @classmethod
    def build(cls, folder: Path, shape: tuple[int, int, int], seed: int) -> Payloads:
        """Write the scan's files into ``folder`` with nibabel and keep their bytes."""
        folder.mkdir(parents=True, exist_ok=True)
        scan = synthetic_scan(shape, seed)
        affine = _affine()
        modalities = {m: _save(folder / f"{m}.nii.gz", scan[i], affine) for i, m in enumerate(MODALITIES)}
        image = _save(folder / "image.nii.gz", np.ascontiguousarray(np.moveaxis(scan, 0, -1)), affine)
        flair = modalities["flair"]
        bad_checksum = bytearray(flair)
        bad_checksum[-8] ^= 0xFF  # first byte of the CRC-32 in the gzip trailer
        return cls(
            modalities=modalities,
            image=image,
            bad_checksum=bytes(bad_checksum),
            truncated=flair[: len(flair) // 2],
            oversized=_oversized_claim(affine),
            shape=shape,
        )

    def parts(self, **replace: bytes | None) -> list[tuple[str, tuple[str, bytes, str]]]:
        """The four modality parts for httpx's ``files=``; ``replace`` swaps (bytes) or drops (``None``) one."""
        files = []
        for name in MODALITIES:
            content = replace.get(name, self.modalities[name])
            if content is not None:
                files.append((name, (f"{name}.nii.gz", content, "application/gzip")))
        return files

    def image_part(self) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [("image", ("image.nii.gz", self.image, "application/gzip"))]


def decode_mask(content: bytes) -> np.ndarray:
    """The label array of a ``.nii.gz`` mask (as the service returns it)."""
    raw = gzip.decompress(content)
    return np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj)


# ------------------------------------------------------------------------------------------ request kinds
@dataclass(frozen=True)
class Kind:
    """One kind of request of the mix.

    Attributes:
        name: Short identifier (JSON key).
        label: What it is, for the table.
        group: ``valid``, ``invalid`` or ``abandoned``.
        expected: The answer it must get (besides 503 with ``Retry-After``, always acceptable for a request
            sent while the queue is full); empty for abandoned requests, which expect no answer.
        weight: Relative frequency in the mix.
    """

    name: str
    label: str
    group: str
    expected: tuple[int, ...]
    weight: float


KINDS: tuple[Kind, ...] = (
    Kind("valid_3d_json", "valid: 4 parts, json", "valid", (200,), 14),
    Kind("valid_4d_json", "valid: 4D image, json", "valid", (200,), 10),
    Kind("valid_3d_nifti", "valid: 4 parts, nifti", "valid", (200,), 10),
    Kind("valid_4d_nifti", "valid: 4D image, nifti", "valid", (200,), 6),
    Kind("bad_checksum", "invalid: gzip checksum", "invalid", (400,), 6),
    Kind("truncated_gzip", "invalid: truncated gzip", "invalid", (400,), 6),
    Kind("missing_part", "invalid: part t2 missing", "invalid", (400,), 6),
    Kind("unknown_model", "invalid: unknown model", "invalid", (422,), 6),
    Kind("not_multipart", "invalid: not multipart", "invalid", (415,), 6),
    Kind("oversized_header", "invalid: header claims 1 Gi voxels", "invalid", (413,), 6),
    Kind("abandon_upload", "abandoned during upload", "abandoned", (), 12),
    Kind("abandon_after_upload", "abandoned after upload", "abandoned", (), 12),
)
KIND_BY_NAME = {kind.name: kind for kind in KINDS}


@dataclass
class Outcome:
    """What one request got.

    Attributes:
        answer: The HTTP status as text (``"200"``), or ``"closed"`` (an abandoned request closed before any
            answer), ``"reset"`` (the service closed the connection while an abandoned request was being
            sent), or ``"error: ExceptionName"`` (a transport error or timeout).
        status: The HTTP status, if an answer came.
        latency_s: Seconds from sending to the end of the answer.
        failure: Why this outcome breaks a criterion (``None`` when it does not).
        server_error: A 5xx other than 503 with ``Retry-After``.
        correct: For a 200 of a valid request: whether it carried the reference mask.
    """

    answer: str
    status: int | None = None
    latency_s: float = 0.0
    failure: str | None = None
    server_error: bool = False
    correct: bool | None = None


class Requester:
    """Sends one request of a given kind and judges its answer.

    Args:
        url: The service's base URL.
        payloads: The request bytes.
        reference: The reference labels (``None`` while the reference itself is being fetched).
        abandon_delay_s: The longest wait before an abandoned request closes after sending everything.
        timeout_s: Longest wait for any request.
    """

    def __init__(
        self, url: str, payloads: Payloads, *, reference: np.ndarray | None, abandon_delay_s: float, timeout_s: float
    ) -> None:
        self.url = url
        self.payloads = payloads
        self.reference = reference
        self.abandon_delay_s = abandon_delay_s
        self.timeout_s = timeout_s
        parsed = httpx.URL(url)
        self.address = (parsed.host, parsed.port)
        # Bodies encoded once, so that the clients spend their time waiting on the service, not encoding.
        self._requests = {kind.name: self._encode(kind.name) for kind in KINDS if kind.group != "abandoned"}
        self._raw = self._raw_request()

    # ------------------------------------------------------------------------------------------ HTTP kinds
    def _request_args(self, kind: str) -> dict[str, Any]:
        p = self.payloads
        match kind:
            case "valid_3d_json":
                return {"files": p.parts()}
            case "valid_4d_json":
                return {"files": p.image_part()}
            case "valid_3d_nifti":
                return {"files": p.parts(), "params": {"format": "nifti"}}
            case "valid_4d_nifti":
                return {"files": p.image_part(), "params": {"format": "nifti"}}
            case "bad_checksum":
                return {"files": p.parts(flair=p.bad_checksum)}
            case "truncated_gzip":
                return {"files": p.parts(flair=p.truncated)}
            case "missing_part":
                return {"files": p.parts(t2=None)}
            case "unknown_model":
                return {"files": p.parts(), "params": {"model": "no-such-model"}}
            case "not_multipart":
                body = json.dumps({m: base64.b64encode(p.modalities[m][:64]).decode() for m in MODALITIES})
                return {"content": body.encode(), "headers": {"Content-Type": "application/json"}}
            case "oversized_header":
                return {"files": p.parts(flair=p.oversized)}
        raise ValueError(f"unknown request kind {kind!r}; known: {', '.join(KIND_BY_NAME)}")

    def _encode(self, kind: str) -> dict[str, Any]:
        """``client.post`` arguments of a kind, with the body encoded already."""
        args = self._request_args(kind)
        request = httpx.Request("POST", self.url + "/segment", files=args.get("files"), content=args.get("content"),
                                headers=args.get("headers"))
        return {"content": request.read(), "headers": {"Content-Type": request.headers["content-type"]},
                "params": args.get("params")}

    def send(self, kind: Kind, client: httpx.Client, rng: random.Random) -> Outcome:
        """Send one request of ``kind`` (with ``client``, or a raw socket for abandoned ones) and judge it."""
        if kind.group == "abandoned":
            return self._abandon(kind, rng)
        start = time.perf_counter()
        try:
            response = client.post("/segment", **self._requests[kind.name])
        except httpx.HTTPError as exc:
            name = type(exc).__name__
            return Outcome(f"error: {name}", latency_s=time.perf_counter() - start,
                           failure=f"{kind.name}: no answer ({name}: {exc})")
        outcome = Outcome(str(response.status_code), response.status_code, time.perf_counter() - start)
        self._judge(kind, response, outcome)
        return outcome

    def _judge(self, kind: Kind, response: httpx.Response, outcome: Outcome) -> None:
        status = response.status_code
        if status == 503:
            if "retry-after" not in response.headers:
                outcome.server_error = True
                outcome.failure = f"{kind.name}: 503 without Retry-After: {response.text[:300]}"
            return
        if status >= 500:
            outcome.server_error = True
            outcome.failure = f"{kind.name}: server error {status}: {response.text[:300]}"
            return
        if status not in kind.expected:
            outcome.failure = (
                f"{kind.name}: expected {' or '.join(map(str, kind.expected))} (or 503), got {status}: "
                f"{response.text[:300]}"
            )
            return
        if status == 200 and self.reference is not None:
            problem = self._mask_problem(kind, response)
            outcome.correct = problem is None
            if problem is not None:
                outcome.failure = f"{kind.name}: 200 with a wrong answer: {problem}"

    def _mask_problem(self, kind: Kind, response: httpx.Response) -> str | None:
        """Why the mask of a 200 differs from the reference, or ``None`` when it is identical."""
        try:
            if kind.name.endswith("_nifti"):
                if not response.headers.get("content-type", "").startswith("application/gzip"):
                    return f"Content-Type {response.headers.get('content-type')!r}, expected application/gzip"
                if "x-segment-summary" not in response.headers:
                    return "no X-Segment-Summary header"
                labels = decode_mask(response.content)
            else:
                labels = decode_mask(base64.b64decode(response.json()["mask"]))
        except Exception as exc:  # any undecodable answer is a wrong answer
            return f"the mask cannot be decoded ({type(exc).__name__}: {exc})"
        return labels_problem(labels, self.reference)

    # ------------------------------------------------------------------------------------------ abandoned
    def _raw_request(self) -> bytes:
        """A valid request (four parts, json) as the bytes on the wire."""
        encoded = self._requests["valid_3d_json"]
        head = (
            f"POST /segment HTTP/1.1\r\nHost: {self.address[0]}:{self.address[1]}\r\n"
            f"Content-Type: {encoded['headers']['Content-Type']}\r\nContent-Length: {len(encoded['content'])}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        return head + encoded["content"]

    def _abandon(self, kind: Kind, rng: random.Random) -> Outcome:
        """A valid request whose client goes away: during the upload, or after it within ``abandon_delay_s``."""
        data = self._raw
        start = time.perf_counter()
        sock = socket.create_connection(self.address, timeout=self.timeout_s)
        try:
            if kind.name == "abandon_upload":
                cut = rng.randint(len(data) // 20, len(data) - 1)
                try:
                    sock.sendall(data[:cut])
                except (BrokenPipeError, ConnectionResetError):  # refused early (503) and closed by the service
                    return Outcome("reset", latency_s=time.perf_counter() - start)
                except TimeoutError:
                    return self._stalled(kind, start)
                time.sleep(rng.uniform(0.0, 0.3))
                sock.setblocking(False)  # an answer that came before the client left (a 503) is counted as such
                try:
                    first = sock.recv(64)
                except BlockingIOError:
                    return Outcome("closed", latency_s=time.perf_counter() - start)
                except ConnectionResetError:
                    return Outcome("reset", latency_s=time.perf_counter() - start)
                return self._early_answer(kind, first, time.perf_counter() - start)
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                return Outcome("reset", latency_s=time.perf_counter() - start)
            except TimeoutError:
                return self._stalled(kind, start)
            sock.settimeout(rng.uniform(0.02, self.abandon_delay_s))
            try:
                first = sock.recv(64)
            except TimeoutError:
                return Outcome("closed", latency_s=time.perf_counter() - start)
            except ConnectionResetError:
                return Outcome("reset", latency_s=time.perf_counter() - start)
            return self._early_answer(kind, first, time.perf_counter() - start)
        finally:
            sock.close()

    def _stalled(self, kind: Kind, start: float) -> Outcome:
        return Outcome("error: upload stalled", latency_s=time.perf_counter() - start,
                       failure=f"{kind.name}: the service took none of the body for {self.timeout_s:.0f} s")

    @staticmethod
    def _early_answer(kind: Kind, first: bytes, latency_s: float) -> Outcome:
        """An abandoned request answered before it closed: only 200 or 503 make sense."""
        if not first:
            return Outcome("error: closed without an answer", latency_s=latency_s,
                           failure=f"{kind.name}: the service closed the connection without an answer")
        try:
            status = int(first.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return Outcome("error: bad status line", latency_s=latency_s,
                           failure=f"{kind.name}: unreadable answer {first[:40]!r}")
        outcome = Outcome(str(status), status, latency_s)
        if status >= 500 and status != 503:
            outcome.server_error = True
        if status not in (200, 503):
            outcome.failure = f"{kind.name}: a valid request answered {status} before the client left"
        return outcome


def labels_problem(labels: np.ndarray, reference: np.ndarray) -> str | None:
    """Why ``labels`` is not the reference mask, or ``None`` when they are identical."""
    if labels.shape != reference.shape:
        return f"mask shape {labels.shape}, reference {reference.shape}"
    if not np.array_equal(labels, reference):
        differ = int(np.count_nonzero(labels != reference))
        return f"{differ} voxels differ from the reference mask"
    return None


# ------------------------------------------------------------------------------------------ the tally
@dataclass
class Tally:
    """Thread-safe counts of what the requests got."""

    answers: dict[str, Counter] = field(default_factory=lambda: {k.name: Counter() for k in KINDS})
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k.name: [] for k in KINDS})
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0
    unexpected: Counter = field(default_factory=Counter)
    server_errors: int = 0
    correct: int = 0
    incorrect: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    MAX_FAILURES_KEPT = 50

    def add(self, kind: Kind, outcome: Outcome) -> None:
        with self._lock:
            self.answers[kind.name][outcome.answer] += 1
            if outcome.status == 200 and kind.group == "valid":
                self.latencies[kind.name].append(outcome.latency_s)
            if outcome.correct is True:
                self.correct += 1
            elif outcome.correct is False:
                self.incorrect += 1
            self.server_errors += outcome.server_error
            if outcome.failure is not None:
                self.failure_count += 1
                self.unexpected[kind.name] += 1
                if len(self.failures) < self.MAX_FAILURES_KEPT:
                    self.failures.append(outcome.failure)

    def snapshot(self) -> dict[str, int]:
        """Totals for the progress line."""
        with self._lock:
            total = Counter()
            for counts in self.answers.values():
                total.update(counts)
        return {
            "requests": sum(total.values()),
            "200": total["200"],
            "503": total["503"],
            "4xx": sum(n for answer, n in total.items() if answer.startswith("4")),
            "abandoned": total["closed"] + total["reset"],
            "failures": self.failure_count,
        }


class Client(threading.Thread):
    """One load client: draws a kind, sends it, records the outcome, until ``stop`` is set."""

    def __init__(self, index: int, requester: Requester, tally: Tally, stop: threading.Event, seed: int) -> None:
        super().__init__(name=f"soak-client-{index}", daemon=True)
        self.requester = requester
        self.tally = tally
        self.stop = stop
        self.rng = random.Random(seed * 1000 + index)

    def run(self) -> None:
        weights = [kind.weight for kind in KINDS]
        with httpx.Client(base_url=self.requester.url, timeout=self.requester.timeout_s) as client:
            while not self.stop.is_set():
                kind = self.rng.choices(KINDS, weights)[0]
                try:
                    outcome = self.requester.send(kind, client, self.rng)
                except Exception as exc:  # a raw socket that could not connect, or anything else: counted, shown
                    outcome = Outcome(f"error: {type(exc).__name__}", failure=f"{kind.name}: {exc!r}")
                self.tally.add(kind, outcome)
                if outcome.status == 503:
                    self.stop.wait(self.rng.uniform(0.05, 0.25))


# ------------------------------------------------------------------------------------------ the server
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


# ------------------------------------------------------------------------------------------ the run
@dataclass
class Report:
    """Everything the run measured (``soak.json``)."""

    command: str
    started: str
    settings: dict[str, Any]
    machine: dict[str, Any]
    libraries: dict[str, str]
    reference: dict[str, Any] = field(default_factory=dict)
    load_s: float = 0.0
    wall_s: float = 0.0
    answers: dict[str, dict[str, int]] = field(default_factory=dict)
    latency_s: dict[str, dict[str, float]] = field(default_factory=dict)
    correct_200: int = 0
    incorrect_200: int = 0
    server_errors: int = 0
    unexpected: int = 0
    unexpected_by_kind: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    drain: dict[str, Any] = field(default_factory=dict)
    final_request: str = ""
    resources: dict[str, dict[str, int]] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    server_statuses: dict[str, int] = field(default_factory=dict)
    server_stop: dict[str, Any] = field(default_factory=dict)
    criteria: list[dict[str, Any]] = field(default_factory=list)
    passed: bool = False


def soak_machine() -> dict[str, Any]:
    """The machine (:func:`benchmarks.machine.machine_info`) with the figures the soak report prints."""
    info = machine_info()
    info.update({"cores": os.cpu_count(), "accelerator": "none used (BRATS_PROVIDERS=CPUExecutionProvider)",
                 "load_average_at_start": os.getloadavg()[0]})
    return info


def percentiles(values: list[float]) -> dict[str, float | None]:
    """``n``, median and 95th percentile of ``values`` (``None`` when there are none)."""
    if not values:
        return {"n": 0, "p50": None, "p95": None}
    array = np.asarray(values)
    return {"n": len(values), "p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95))}


def _settle_fds(server: Server, ceiling: int | None, wait_s: float = 5.0) -> dict[str, int]:
    """The server's resources once the client connections just closed have gone from its side too: read
    after a second, then again (up to ``wait_s``) while the FD count is above ``ceiling``."""
    time.sleep(1.0)
    resources = server.resources()
    deadline = time.monotonic() + wait_s
    while ceiling is not None and resources["fds"] > ceiling and time.monotonic() < deadline:
        time.sleep(0.25)
        resources = server.resources()
    return resources


def _warm_up(requester: Requester, count: int) -> None:
    """``count`` valid requests of every form, then one of each invalid kind, one after the other."""
    valid = [k for k in KINDS if k.group == "valid"]
    invalid = [k for k in KINDS if k.group == "invalid"]
    rng = random.Random(0)
    with httpx.Client(base_url=requester.url, timeout=requester.timeout_s) as client:
        for kind in [valid[i % len(valid)] for i in range(count)] + invalid:
            outcome = requester.send(kind, client, rng)
            if outcome.failure is not None:
                raise SoakError(f"warm-up request failed on the idle service: {outcome.failure}")


def _reference(server: Server, payloads: Payloads, timeout_s: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The mask of one valid request on the idle service, and what it says about it."""
    start = time.perf_counter()
    with httpx.Client(base_url=server.url, timeout=timeout_s) as client:
        response = client.post("/segment", files=payloads.parts())
    latency = time.perf_counter() - start
    if response.status_code != 200:
        raise SoakError(f"the reference request got {response.status_code}: {response.text[:500]}")
    body = response.json()
    labels = decode_mask(base64.b64decode(body["mask"]))
    if labels.shape != payloads.shape:
        raise SoakError(f"the reference mask has shape {labels.shape}, the scan {payloads.shape}")
    values, counts = np.unique(labels, return_counts=True)
    card = next((m for m in httpx.get(server.url + "/models", timeout=10.0).json().get("models", [])
                 if m.get("name") == body.get("model")), {})
    return labels, {
        "model": body.get("model"),
        "model_sha256": body.get("model_sha256"),
        "provider": body.get("provider"),
        "backend": card.get("backend"),
        "device": card.get("device"),
        "precision": card.get("precision"),
        "latency_s": latency,
        "label_voxels": {str(int(v)): int(c) for v, c in zip(values, counts)},
    }


def _progress(start: float, tally: Tally, server: Server) -> str:
    t = tally.snapshot()
    try:
        rss = f"{server.resources()['rss'] / 2**20:.0f} MiB"
    except (OSError, KeyError):
        rss = "unavailable"
    return (
        f"[{time.monotonic() - start:5.0f} s] {t['requests']} requests: {t['200']} x 200, {t['503']} x 503, "
        f"{t['4xx']} x 4xx, {t['abandoned']} abandoned; failures {t['failures']}; server RSS {rss}"
    )


def run_load(server: Server, requester: Requester, args: argparse.Namespace, report: Report) -> Tally:
    """``args.clients`` clients for ``args.duration`` seconds, with a progress line every 10 s."""
    tally = Tally()
    stop = threading.Event()
    clients = [Client(i, requester, tally, stop, args.seed) for i in range(args.clients)]
    start = time.monotonic()
    for client in clients:
        client.start()
    finished = False
    try:
        next_line = start + PROGRESS_EVERY_S
        end = start + args.duration
        while time.monotonic() < end:
            time.sleep(max(0.0, min(next_line, end) - time.monotonic()))
            if not server.alive():
                print(f"the service exited during the load (status {server.process.returncode})", flush=True)
                break
            if time.monotonic() >= next_line:
                print(_progress(start, tally, server), flush=True)
                next_line += PROGRESS_EVERY_S
        finished = True
    finally:
        stop.set()
        if finished:  # let each client finish its request; when interrupted, leave them (daemon threads)
            for client in clients:
                client.join(args.timeout + 5)
    report.load_s = time.monotonic() - start
    print(_progress(start, tally, server) + " (load stopped)", flush=True)
    return tally


def _drain(server: Server, timeout_s: float) -> dict[str, Any]:
    """Wait until no inference runs or waits; returns the time it took and the last reading."""
    start = time.monotonic()
    running = waiting = float("nan")
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        while True:
            running, waiting = server.inference_load(client)
            if running == 0 and waiting == 0:
                return {"drained": True, "seconds": time.monotonic() - start, "running": 0, "waiting": 0}
            if time.monotonic() - start > timeout_s:
                return {"drained": False, "seconds": time.monotonic() - start, "running": running,
                        "waiting": waiting}
            time.sleep(0.25)


def _criterion(name: str, measured: str, ok: bool) -> dict[str, Any]:
    return {"criterion": name, "measured": measured, "result": "PASS" if ok else "FAIL"}


def judge(report: Report) -> None:
    """Fill ``report.criteria`` and ``report.passed``."""
    total = sum(sum(c.values()) for c in report.answers.values())
    warm, end = report.resources.get("warm_up", {}), report.resources.get("end", {})
    criteria = [
        _criterion("every answer is the expected one (or 503 with Retry-After)",
                   f"{report.unexpected} unexpected of {total}", report.unexpected == 0),
        _criterion("no 5xx other than 503 with Retry-After", f"{report.server_errors}", report.server_errors == 0),
        _criterion(
            "every 200 carries the reference mask",
            f"{report.correct_200} of {report.correct_200 + report.incorrect_200} identical; final request: "
            f"{report.final_request}",
            report.incorrect_200 == 0 and report.correct_200 > 0 and report.final_request == "200, identical",
        ),
        _criterion(
            "the service drains after the load",
            (f"idle after {report.drain['seconds']:.1f} s" if report.drain.get("drained")
             else f"still {report.drain.get('running')} running, {report.drain.get('waiting')} waiting after "
                  f"{report.drain.get('seconds', 0):.0f} s"),
            bool(report.drain.get("drained")),
        ),
    ]
    if warm and end:
        change = end["rss"] / warm["rss"] - 1.0
        criteria.append(_criterion(
            f"RSS at the end at most {RSS_TOLERANCE:.0%} above warm-up",
            f"{warm['rss'] / 2**20:.1f} -> {end['rss'] / 2**20:.1f} MiB ({change:+.1%})",
            end["rss"] <= warm["rss"] * (1.0 + RSS_TOLERANCE),
        ))
        criteria.append(_criterion(
            "open FDs at the end not above warm-up", f"{warm['fds']} -> {end['fds']}", end["fds"] <= warm["fds"],
        ))
    else:
        criteria.append(_criterion("resources measured", "the service was gone", False))
    criteria.append(_criterion("nothing left in BRATS_TMP_DIR", f"{len(report.leftovers)} entries",
                               not report.leftovers))
    report.criteria = criteria
    report.passed = all(c["result"] == "PASS" for c in criteria)


# ------------------------------------------------------------------------------------------ output
def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def markdown(report: Report) -> str:
    """The tables of ``soak.md``: answers per kind, latency, resources, criteria."""
    s, ref = report.settings, report.reference
    runs_on = ", ".join(str(x) for x in (ref.get("provider"), ref.get("precision")) if x)
    lines = [
        f"Soak run of {report.load_s:.0f} s: {s['clients']} clients, BRATS_MAX_CONCURRENT={s['max_concurrent']}, "
        f"BRATS_MAX_QUEUE={s['max_queue']}, model {ref.get('model')} ({runs_on}), scan "
        f"{'x'.join(map(str, s['shape']))} voxels; {report.machine['cpu']['model']}, {report.machine['cores']} cores, "
        "no GPU.",
        "",
        "| request kind | sent | expected | answers | unexpected |",
        "|---|---:|---|---|---:|",
    ]
    grand = Counter()
    for kind in KINDS:
        counts = report.answers.get(kind.name, {})
        grand.update(counts)
        if kind.group == "abandoned":
            expected = "none; 200 or 503 if it comes first"
        else:
            expected = f"{'/'.join(map(str, kind.expected))} or 503"
        shown = ", ".join(f"{a}: {n}" for a, n in sorted(counts.items())) or "-"
        lines.append(f"| {kind.label} | {sum(counts.values())} | {expected} | {shown} | "
                     f"{report.unexpected_by_kind.get(kind.name, 0)} |")
    shown = ", ".join(f"{a}: {n}" for a, n in sorted(grand.items()))
    lines.append(f"| **all** | {sum(grand.values())} | | {shown} | {report.unexpected} |")
    lines += ["", "| latency of valid 200s (client side) | n | p50 (s) | p95 (s) |", "|---|---:|---:|---:|"]
    for name, figures in report.latency_s.items():
        label = KIND_BY_NAME[name].label if name in KIND_BY_NAME else name
        p50, p95 = (("-" if v is None else f"{v:.2f}") for v in (figures["p50"], figures["p95"]))
        lines.append(f"| {label} | {figures['n']} | {p50} | {p95} |")
    warm, end = report.resources.get("warm_up", {}), report.resources.get("end", {})
    lines += [
        "",
        "| server process | after warm-up | at the end |",
        "|---|---:|---:|",
        f"| RSS (MiB) | {_mib(warm.get('rss'))} | {_mib(end.get('rss'))} |",
        f"| peak RSS, VmHWM (MiB) | {_mib(warm.get('peak_rss'))} | {_mib(end.get('peak_rss'))} |",
        f"| open file descriptors | {warm.get('fds', '-')} | {end.get('fds', '-')} |",
        f"| entries left in BRATS_TMP_DIR | | {len(report.leftovers)} |",
        "",
        "| criterion | measured | result |",
        "|---|---|---|",
    ]
    lines += [f"| {c['criterion']} | {c['measured']} | {c['result']} |" for c in report.criteria]
    if report.server_statuses:
        shown = ", ".join(f"{status}: {n}" for status, n in report.server_statuses.items())
        lines += ["", f"The service's own count of POST /segment by status (`/metrics`; reference, warm-up and "
                      f"final request included; 499: the client left before its answer): {shown}."]
    overall = f"Overall: {'PASS' if report.passed else 'FAIL'}."
    stop = report.server_stop
    if stop:
        how = "was killed (no exit within 15 s of SIGTERM)" if stop["killed"] else "stopped on SIGTERM"
        overall += f" The service {how} in {stop['seconds']:.1f} s."
    lines += ["", overall]
    return "\n".join(lines) + "\n"


def write_outputs(report: Report, out: Path) -> None:
    """``soak.json`` and ``soak.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report.__dict__, indent=2, default=str) + "\n")
    (out / "soak.md").write_text(markdown(report))


# ------------------------------------------------------------------------------------------ main
def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three integers like 64,64,48, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 8:
        raise argparse.ArgumentTypeError(f"expected three sizes of at least 8 voxels like 64,64,48, got {text!r}")
    return shape  # type: ignore[return-value]


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="Bounded load and soak test: start the service on a loopback port, send it a mix of valid, "
        "invalid and abandoned requests from several clients for a fixed time, and check the answers, the "
        "masks, the memory, the file descriptors and the temporary folder. Exit status 0 when every criterion "
        "passes, 1 when one fails, 2 when the run could not be made.",
    )
    add = parser.add_argument
    add("--duration", type=_positive(float), default=180.0,
        help="seconds of load (default %(default)s; start-up, warm-up and the end checks come on top)")
    add("--clients", type=_positive(int), default=6,
        help="concurrent clients (default %(default)s); above max-concurrent + max-queue some get 503")
    add("--max-concurrent", type=_positive(int), default=1, help="BRATS_MAX_CONCURRENT (default %(default)s)")
    add("--max-queue", type=int, default=2, help="BRATS_MAX_QUEUE (default %(default)s)")
    add("--threads", type=_positive(int), default=None,
        help="BRATS_THREADS (inference threads per model); default: the backend's own")
    add("--backend", choices=("auto", "onnxruntime", "openvino"), default=None,
        help="BRATS_BACKEND; default: the service's (auto). GPUs are never used: ONNX Runtime is limited to its "
        "CPU provider")
    add("--precision", choices=("auto", "fp32", "bf16"), default=None,
        help="BRATS_PRECISION; default: the service's (auto)")
    add("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
        help="folder of NAME.onnx + NAME.json models the service loads (default: the shipped models/)")
    add("--shape", type=_shape, default=(64, 64, 48), help="size of the synthetic scan, X,Y,Z (default 64,64,48)")
    add("--seed", type=int, default=0, help="seed of the scan and of the request mix (default %(default)s)")
    add("--warmup", type=_positive(int), default=5,
        help="valid requests before the warm-up memory and FD reading (default %(default)s)")
    add("--timeout", type=_positive(float), default=120.0,
        help="longest wait for one answer, s (default %(default)s)")
    add("--drain-timeout", type=_positive(float), default=60.0,
        help="longest wait, after the load, for no inference to run or wait, s (default %(default)s)")
    add("--start-timeout", type=_positive(float), default=120.0,
        help="longest wait for the service to be ready, s (default %(default)s)")
    add("--out", type=Path, default=DEFAULT_OUT,
        help="folder for soak.json, soak.md and server.log (default runs/soak/)")
    args = parser.parse_args(argv)
    if args.max_queue < 0:
        parser.error("--max-queue must be 0 or more")
    if not args.models_dir.is_dir():
        parser.error(f"--models-dir {args.models_dir} is not a folder")
    return args


def _interrupt(signum, frame) -> None:  # SIGTERM behaves like Ctrl-C: the finally blocks stop the server
    raise KeyboardInterrupt


def soak(args: argparse.Namespace, argv: Sequence[str]) -> Report:
    """Make the run (see the module docstring). Whatever happens, the server is stopped, its log copied to
    ``args.out/server.log`` and the work folder removed."""
    report = Report(
        command=shlex.join(["python", "-m", "benchmarks.soak", *argv]),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        settings={
            "duration_s": args.duration, "clients": args.clients, "max_concurrent": args.max_concurrent,
            "max_queue": args.max_queue, "threads": args.threads, "backend": args.backend,
            "precision": args.precision, "models_dir": str(args.models_dir),
            "shape": list(args.shape), "seed": args.seed, "warmup": args.warmup, "timeout_s": args.timeout,
            "drain_timeout_s": args.drain_timeout,
            "mix": {k.name: k.weight for k in KINDS},
        },
        machine=soak_machine(),
        libraries=library_versions(),
    )
    workdir = Path(tempfile.mkdtemp(prefix="brats-soak-"))
    server: Server | None = None
    try:
        payloads = Payloads.build(workdir / "inputs", args.shape, args.seed)
        settings = {"BRATS_MAX_CONCURRENT": str(args.max_concurrent), "BRATS_MAX_QUEUE": str(args.max_queue)}
        for name, value in (("THREADS", args.threads), ("BACKEND", args.backend), ("PRECISION", args.precision)):
            if value is not None:
                settings[f"BRATS_{name}"] = str(value)
        server = Server(workdir, args.models_dir, settings)
        print(f"starting the service on {server.url} (models {args.models_dir}, upload folder {server.spool})",
              flush=True)
        server.start(args.start_timeout)
        reference, report.reference = _reference(server, payloads, args.timeout)
        print(f"reference mask: model {report.reference['model']} on {report.reference['provider']} "
              f"({report.reference['precision']}), {report.reference['latency_s']:.2f} s, "
              f"label voxels {report.reference['label_voxels']}", flush=True)
        abandon_delay = max(0.2, 1.5 * report.reference["latency_s"])
        report.settings["abandon_delay_max_s"] = abandon_delay
        requester = Requester(server.url, payloads, reference=reference, abandon_delay_s=abandon_delay,
                              timeout_s=args.timeout)
        _warm_up(requester, args.warmup)
        report.resources["warm_up"] = _settle_fds(server, None)
        print(f"warm-up done: RSS {_mib(report.resources['warm_up']['rss'])} MiB, "
              f"{report.resources['warm_up']['fds']} open FDs; load for {args.duration:.0f} s with "
              f"{args.clients} clients", flush=True)

        tally = run_load(server, requester, args, report)
        report.answers = {name: dict(counts) for name, counts in tally.answers.items()}
        report.latency_s = {name: percentiles(v) for name, v in tally.latencies.items()
                            if KIND_BY_NAME[name].group == "valid"}
        report.latency_s["all valid"] = percentiles([x for v in tally.latencies.values() for x in v])
        report.correct_200, report.incorrect_200 = tally.correct, tally.incorrect
        report.server_errors, report.unexpected = tally.server_errors, tally.failure_count
        report.failures = list(tally.failures)
        report.unexpected_by_kind = dict(tally.unexpected)

        if server.alive():
            report.drain = _drain(server, args.drain_timeout)
            report.final_request = _final_request(requester, args.timeout)
            report.resources["end"] = _settle_fds(server, report.resources["warm_up"]["fds"])
            report.server_statuses = server.segment_statuses()
        else:
            report.drain = {"drained": False, "seconds": 0.0, "running": "service gone", "waiting": "service gone"}
            report.final_request = "the service had exited"
        report.leftovers = leftovers(server.spool)
        return report
    finally:
        if server is not None:
            stop_started = time.monotonic()
            status = server.stop()
            report.server_stop = {"exit_status": status, "killed": server.killed,
                                  "seconds": round(time.monotonic() - stop_started, 2)}
            report.settings["server_command"] = shlex.join(server.command)
            if server.log_path.exists():
                args.out.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(server.log_path, args.out / "server.log")
        shutil.rmtree(workdir, ignore_errors=True)


def _final_request(requester: Requester, timeout_s: float) -> str:
    """One valid request after the load: ``"200, identical"`` when it is served with the reference mask."""
    with httpx.Client(base_url=requester.url, timeout=timeout_s) as client:
        outcome = requester.send(KIND_BY_NAME["valid_3d_json"], client, random.Random(0))
    if outcome.failure is None and outcome.correct:
        return "200, identical"
    return outcome.failure or f"{outcome.answer}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        report = soak(args, argv)
    except KeyboardInterrupt:
        print(f"interrupted: the service was stopped; only {args.out / 'server.log'} was written", file=sys.stderr)
        return 130
    except SoakError as exc:
        print(f"python -m benchmarks.soak: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    judge(report)
    report.wall_s = round(time.monotonic() - started, 1)
    report.machine["load_average_at_end"] = os.getloadavg()[0]
    out = args.out
    write_outputs(report, out)
    print()
    print(markdown(report))
    if report.failures:
        print("First unexpected answers:")
        for failure in report.failures[:10]:
            print(f"  - {failure}")
    print(f"written: {out / 'soak.json'}, {out / 'soak.md'}, {out / 'server.log'}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
