"""Client of the segmentation service: a small Python API (the CLI ``python -m service.client`` is
:mod:`service.client_cli`).

Python::

    from service.client import SegmentationClient

    with SegmentationClient("http://127.0.0.1:8000", api_key="...") as client:
        result = client.segment(case_folder_files)          # {"flair": Path, "t1": ..., "t1ce": ..., "t2": ...}
        result = client.segment(image=Path("case_4d.nii.gz"), label=Path("case_seg.nii.gz"), tta=True)
        result.save("case_pred.nii.gz")
        print(result.summary["volumes_ml"])

The command line (``python -m service.client CASE_FOLDER|FILE_4D [--score] ...``) is :mod:`service.client_cli`.

Uploads are streamed from disk (never read whole into memory) as a multipart body whose parts carry
neutral file names (``flair.nii.gz``, ...), never the names of the files on disk. This module needs only
httpx and tqdm: no torch, no training code.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.core.files import atomic_write
from service.core.labels import MODALITIES

__all__ = ["SegmentationClient", "SegmentResult", "ServiceError", "segment_when_free"]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 600.0
"""Seconds to wait for an answer: a full-size volume with TTA on a CPU takes minutes."""
PROGRESS_MIN_BYTES = 8 << 20
"""Uploads at least this large show a progress bar (when stderr is a terminal)."""
_CHUNK = 1 << 20


class ServiceError(Exception):
    """The service answered with an error, or could not be reached.

    Attributes:
        status: The HTTP status, or ``None`` when no answer came (connection refused, timeout).
        detail: What to fix: the problem's ``detail`` (RFC 9457), or a description of the failure.
        title: The problem's ``title`` (e.g. ``"Unprocessable Content"``), if any.
        request_id: The ``X-Request-ID`` of the answer, if any (quote it when reporting a problem).
        retry_after: The ``Retry-After`` of a 503 (busy or not ready yet), as sent, if any.
    """

    def __init__(
        self,
        status: int | None,
        detail: str,
        *,
        title: str | None = None,
        request_id: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        self.status = status
        self.detail = detail
        self.title = title
        self.request_id = request_id
        self.retry_after = retry_after
        prefix = " ".join(str(x) for x in (status, title) if x)
        super().__init__(f"{prefix}: {detail}" if prefix else detail)


@dataclass(frozen=True)
class SegmentResult:
    """One segmentation.

    Attributes:
        mask: The mask as ``.nii.gz`` bytes (uint8 labels 0/1/2/4 on the input's geometry).
        summary: The service's JSON summary without ``mask``: model, model_sha256, provider, shape,
            spacing_mm, labels, volumes_ml, dice, hd95_mm, timing_ms.
        request_id: The answer's ``X-Request-ID``, if any.
    """

    mask: bytes = field(repr=False)
    summary: dict[str, Any]
    request_id: str | None = None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the mask to ``path`` atomically (readers never see half a file) and return the path."""
        path = Path(path)
        atomic_write(path, self.mask)
        return path


# ------------------------------------------------------------------------------------------ multipart body


def _upload_name(part: str, path: Path) -> str:
    """A neutral file name for a part: the part name and the source's extension, nothing of its name."""
    if part == "dicom":
        return "dicom.zip" if path.name.lower().endswith(".zip") else "dicom.dcm"
    return f"{part}.nii.gz" if path.name.lower().endswith(".gz") else f"{part}.nii"


@dataclass(frozen=True)
class _MultipartBody:
    """A ``multipart/form-data`` body streamed from files, with its exact length known in advance."""

    parts: tuple[tuple[str, Path], ...]
    boundary: str = field(default_factory=lambda: "brats-" + secrets.token_hex(16))

    def _head(self, part: str, path: Path) -> bytes:
        return (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{part}"; filename="{_upload_name(part, path)}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode("ascii")

    @property
    def _tail(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("ascii")

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    @property
    def file_bytes(self) -> int:
        return sum(path.stat().st_size for _, path in self.parts)

    def __len__(self) -> int:
        framing = sum(len(self._head(part, path)) + 2 for part, path in self.parts) + len(self._tail)
        return framing + self.file_bytes

    def stream(self, on_bytes: Callable[[int], object] | None = None) -> Iterator[bytes]:
        """Yield the body chunk by chunk, calling ``on_bytes(n)`` after each chunk of file data is sent."""
        for part, path in self.parts:
            yield self._head(part, path)
            with open(path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    yield chunk
                    if on_bytes is not None:
                        on_bytes(len(chunk))
            yield b"\r\n"
        yield self._tail


# ------------------------------------------------------------------------------------------------ client


def _problem(response: httpx.Response) -> ServiceError:
    """A :class:`ServiceError` from an error answer (an RFC 9457 problem, or whatever else came)."""
    request_id = response.headers.get("x-request-id")
    title = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if not isinstance(detail, str):
            detail = json.dumps(detail, separators=(",", ":"))
        title = body.get("title") if isinstance(body.get("title"), str) else None
    else:
        text = response.text.strip().replace("\n", " ")
        detail = text[:300] or response.reason_phrase or "no detail given"
    return ServiceError(
        response.status_code,
        detail,
        title=title,
        request_id=request_id,
        retry_after=response.headers.get("retry-after"),
    )


class SegmentationClient:
    """Talks to a running segmentation service.

    Args:
        base_url: The service root, e.g. ``http://127.0.0.1:8000``.
        api_key: Sent as ``X-API-Key`` when given (needed when the service has API keys configured).
        timeout: Seconds to wait for each answer (inference included); connecting gives up after 10 s.
        progress: Show an upload progress bar on stderr: ``None`` (default) shows it for uploads of at
            least :data:`PROGRESS_MIN_BYTES` when stderr is a terminal; ``True``/``False`` force it.

    Every method raises :class:`ServiceError` on an error answer or when the service cannot be reached.
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        progress: bool | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.progress = progress
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
        )

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TimeoutException as err:
            raise ServiceError(None, f"no answer from {self.base_url} in time ({type(err).__name__})") from err
        except httpx.TransportError as err:
            raise ServiceError(None, f"cannot reach the service at {self.base_url} ({err})") from err
        if response.status_code >= 400:
            raise _problem(response)
        return response

    def _get_json(self, url: str) -> dict[str, Any]:
        response = self._send("GET", url)
        try:
            return response.json()
        except ValueError as err:
            raise ServiceError(response.status_code, f"{url} did not answer JSON") from err

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: the liveness answer (raises if the service is not serving)."""
        return self._get_json("/healthz")

    def ready(self) -> dict[str, Any]:
        """``GET /readyz``: the readiness answer; a service not ready raises a 503 with the reason."""
        return self._get_json("/readyz")

    def models(self) -> dict[str, Any]:
        """``GET /models``: ``{"default": NAME, "models": [card + {"provider": ...}, ...]}``."""
        return self._get_json("/models")

    def segment(
        self,
        paths: Mapping[str, str | os.PathLike] | None = None,
        *,
        image: str | os.PathLike | None = None,
        dicom: Sequence[str | os.PathLike] | None = None,
        label: str | os.PathLike | None = None,
        model: str | None = None,
        tta: bool = False,
        format: str = "nifti",
        postprocess: bool = True,
    ) -> SegmentResult:
        """Segment one case.

        Args:
            paths: The four modalities ``{"flair": path, "t1": ..., "t1ce": ..., "t2": ...}`` (3D volumes),
                or ``None`` when ``image`` is given.
            image: A 4D volume ``(X, Y, Z, 4)`` in the channel order flair, t1, t1ce, t2.
            dicom: A DICOM study instead: DICOM files and/or zips of them (the service picks the four series).
            label: An optional ground truth (BraTS labels): the summary then holds Dice and HD95.
            model: A name from :meth:`models` or ``"ensemble"``; ``None`` uses the service's default.
            tta: Test-time augmentation by mirroring (8 flips averaged for 3D models, 4 for 2D; that many times slower).
            format: ``"nifti"`` (the mask comes as the body, the summary in a header) or ``"json"`` (the
                mask comes base64-encoded inside the JSON); the result is the same. With ``dicom``,
                ``"dicom-seg"`` too: the mask as a DICOM Segmentation of the T1ce series.
            postprocess: Apply the postprocessing rules of the model's card (``False``: the raw mask).

        Raises:
            ValueError: not exactly one of ``paths``, ``image`` and ``dicom``, unknown part names, a bad ``format``.
            FileNotFoundError: a file is missing.
            ServiceError: the service refused the request or failed.
        """
        if format not in ("nifti", "json", "dicom-seg") or (format == "dicom-seg" and not dicom):
            raise ValueError(f"format must be 'nifti' or 'json' (or 'dicom-seg' with dicom), got {format!r}")
        if sum(x is not None for x in (paths, image, dicom)) != 1 or dicom is not None and not dicom:
            raise ValueError("give either the four modality paths or one 4D image (or the DICOM files): exactly one")
        if dicom is not None:
            parts = [("dicom", Path(path)) for path in dicom]
        elif paths is not None:
            if set(paths) != set(MODALITIES):
                raise ValueError(f"expected the parts {', '.join(MODALITIES)}; got {', '.join(sorted(paths))}")
            parts = [(name, Path(paths[name])) for name in MODALITIES]
        else:
            parts = [("image", Path(image))]
        if label is not None:
            parts.append(("label", Path(label)))
        for _, path in parts:
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")

        body = _MultipartBody(tuple(parts))
        params: dict[str, str] = {"format": format, "tta": "true" if tta else "false",
                                  "postprocess": "true" if postprocess else "false"}
        if model is not None:
            params["model"] = model
        headers = {"Content-Type": body.content_type, "Content-Length": str(len(body))}
        total = body.file_bytes
        show = self.progress if self.progress is not None else total >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="upload", leave=False)
        try:
            response = self._send(
                "POST", "/segment", params=params, headers=headers, content=body.stream(bar.update if bar else None)
            )
        finally:
            if bar is not None:
                bar.close()
        return self._result(response, format)

    @staticmethod
    def _result(response: httpx.Response, format: str) -> SegmentResult:
        request_id = response.headers.get("x-request-id")
        try:
            if format == "json":
                summary = response.json()
                mask = base64.b64decode(summary.pop("mask"), validate=True)
            else:
                summary = json.loads(response.headers["x-segment-summary"])
                mask = response.content
        except (ValueError, KeyError, TypeError) as err:
            raise ServiceError(
                response.status_code, f"the service's answer is malformed ({err})", request_id=request_id
            ) from err
        return SegmentResult(mask=mask, summary=summary, request_id=request_id)


def segment_when_free(client: SegmentationClient, *, patience_s: float = 3600.0, **kwargs: Any) -> SegmentResult:
    """:meth:`SegmentationClient.segment` asked again, after the service's ``Retry-After`` (1 s without one), for
    as long as it answers 503 (busy or not ready yet), up to ``patience_s`` seconds of waiting in all.

    Raises:
        ServiceError: any other error, or a 503 once ``patience_s`` is spent.
    """
    waited = 0.0
    while True:
        try:
            return client.segment(**kwargs)
        except ServiceError as err:
            if err.status != 503 or waited >= patience_s:
                raise
            pause = float(err.retry_after) if err.retry_after and err.retry_after.isdigit() else 1.0
            time.sleep(pause)
            waited += pause


# ------------------------------------------------------------------------------------------------- input


if __name__ == "__main__":  # python -m service.client: the command line
    from service.client_cli import run

    run()
