"""The request mix of the soak test: the kinds of request, what each must get, and the client that sends one
and judges its answer (over httpx, or a raw socket for the abandoned ones)."""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from benchmarks.soak.payloads import Payloads, decode_mask
from service.core.labels import MODALITIES


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
