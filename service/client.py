"""Client of the segmentation service: a small Python API and the CLI ``python -m service.client``.

Python::

    from service.client import SegmentationClient

    with SegmentationClient("http://127.0.0.1:8000", api_key="...") as client:
        result = client.segment(case_folder_files)          # {"flair": Path, "t1": ..., "t1ce": ..., "t2": ...}
        result = client.segment(image=Path("case_4d.nii.gz"), label=Path("case_seg.nii.gz"), tta=True)
        result.save("case_pred.nii.gz")
        print(result.summary["volumes_ml"])

CLI::

    python -m service.client data/BraTS20_Training_001            # a BraTS case folder
    python -m service.client case_4d.nii.gz --model unet --tta     # a 4D (X, Y, Z, 4) volume
    python -m service.client data/BraTS20_Training_001 --score     # also send CASE_seg: Dice and HD95

The mask goes next to the input (``CASE_pred.nii.gz`` inside a case folder, ``NAME_pred.nii.gz`` beside a 4D
file) or to ``--out``. Exit status: 0 done, 1 the service refused or failed (its problem ``detail`` is
printed), 2 bad command-line input. The API key comes from ``--api-key`` or the ``BRATS_API_KEY``
environment variable.

Uploads are streamed from disk (never read whole into memory) as a multipart body whose parts carry
neutral file names (``flair.nii.gz``, ...), never the names of the files on disk. This module needs only
httpx and tqdm: no torch, no training code.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx

from service.core.files import atomic_write
from service.core.labels import MODALITIES

__all__ = ["SegmentationClient", "SegmentResult", "ServiceError", "find_case_files", "format_summary", "main"]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 600.0
"""Seconds to wait for an answer: a full-size volume with TTA on a CPU takes minutes."""
PROGRESS_MIN_BYTES = 8 << 20
"""Uploads at least this large show a progress bar (when stderr is a terminal)."""
_CHUNK = 1 << 20
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


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
            label: An optional ground truth (BraTS labels): the summary then holds Dice and HD95.
            model: A name from :meth:`models` or ``"ensemble"``; ``None`` uses the service's default.
            tta: Test-time augmentation by mirroring (8 flips averaged for 3D models, 4 for 2D; that many times slower).
            format: ``"nifti"`` (the mask comes as the body, the summary in a header) or ``"json"`` (the
                mask comes base64-encoded inside the JSON); the result is the same.
            postprocess: Apply the postprocessing rules of the model's card (``False``: the raw mask).

        Raises:
            ValueError: neither or both of ``paths`` and ``image``, unknown part names, a bad ``format``.
            FileNotFoundError: a file is missing.
            ServiceError: the service refused the request or failed.
        """
        if format not in ("nifti", "json"):
            raise ValueError(f"format must be 'nifti' or 'json', got {format!r}")
        if (paths is None) == (image is None):
            raise ValueError("give either the four modality paths or one 4D image, not both or neither")
        if paths is not None:
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


# ------------------------------------------------------------------------------------------------- input


class InputError(ValueError):
    """Bad command-line input (exit status 2)."""


def _nifti_stem(path: Path) -> str | None:
    """The name without ``.nii``/``.nii.gz``, or ``None`` if the name has neither."""
    lower = path.name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _one_nifti(folder: Path, stem: str) -> Path | None:
    present = [folder / f"{stem}{ext}" for ext in (".nii", ".nii.gz") if (folder / f"{stem}{ext}").is_file()]
    if len(present) > 1:
        raise InputError(f"both {present[0].name} and {present[1].name} exist in {folder}; keep one")
    return present[0] if present else None


def _case_prefix(folder: Path) -> str:
    """The case id of a folder: its name when ``NAME_flair.nii[.gz]`` exists, else the one ``*_flair`` file's."""
    if _one_nifti(folder, f"{folder.name}_flair") is not None:
        return folder.name
    flairs = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _flair_case(p) is not None
    )
    cases = sorted({_flair_case(p) for p in flairs})
    if len(cases) != 1:
        found = f"found {', '.join(p.name for p in flairs)}" if flairs else "found none"
        raise InputError(f"expected one CASE_flair.nii[.gz] file in the case folder {folder} ({found})")
    return cases[0]


def _flair_case(path: Path) -> str | None:
    stem = _nifti_stem(path)
    return stem[: -len("_flair")] if stem and stem.endswith("_flair") and len(stem) > len("_flair") else None


def find_case_files(folder: str | os.PathLike) -> tuple[str, dict[str, Path], Path | None]:
    """The files of a BraTS case folder: ``(case_id, {modality: path}, seg path or None)``.

    The case id is the folder name (``BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz``), or, for a
    renamed folder, the prefix of its one ``*_flair.nii[.gz]`` file. Each file may be ``.nii`` or ``.nii.gz``.

    Raises:
        InputError: a modality is missing, or both ``.nii`` and ``.nii.gz`` exist for one.
    """
    folder = Path(folder)
    case = _case_prefix(folder)
    files: dict[str, Path] = {}
    for modality in MODALITIES:
        path = _one_nifti(folder, f"{case}_{modality}")
        if path is None:
            raise InputError(f"the case folder {folder} has no {case}_{modality}.nii[.gz]")
        files[modality] = path
    return case, files, _one_nifti(folder, f"{case}_seg")


# --------------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit status 2
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m service.client",
        description="Segment a BraTS case folder or a 4D NIfTI file with a running segmentation service.",
        epilog="Exit status: 0 done, 1 the service refused or failed, 2 bad command-line input.",
    )
    p.add_argument("input", type=Path, help="a BraTS case folder (CASE_{flair,t1,t1ce,t2}.nii[.gz]) or a 4D file")
    p.add_argument("--url", default=DEFAULT_URL, help=f"service root (default {DEFAULT_URL})")
    p.add_argument("--model", help="model name from GET /models, or 'ensemble' (default: the service's default)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation by mirroring (8 flips for 3D models, 4 for 2D: that much slower)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="the raw mask, without the postprocessing rules of the model's card")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--label", type=Path, help="ground-truth segmentation to score the mask against")
    group.add_argument("--score", action="store_true", help="score against the case folder's CASE_seg file")
    p.add_argument("--out", type=Path, help="where to write the mask (a file, or a folder for the default name)")
    p.add_argument("--api-key", help="API key (default: the BRATS_API_KEY environment variable)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for the answer")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a short text")
    p.add_argument("--no-progress", action="store_true", help="no upload progress bar")
    return p


@dataclass(frozen=True)
class _Job:
    paths: dict[str, Path] | None
    image: Path | None
    label: Path | None
    out: Path


def _job(args: argparse.Namespace) -> _Job:
    """Resolve the command line into files to send and where the mask goes (:class:`InputError` if bad)."""
    source: Path = args.input
    if source.is_dir():
        case, paths, seg = find_case_files(source)
        image, default_out = None, source / f"{case}_pred.nii.gz"
        if args.score:
            if seg is None:
                raise InputError(f"--score needs {case}_seg.nii[.gz] in {source}; there is none")
            args.label = seg
    elif source.is_file():
        stem = _nifti_stem(source)
        if stem is None:
            raise InputError(f"{source} is neither a case folder nor a .nii/.nii.gz file")
        if args.score:
            raise InputError("--score needs a case folder; with a 4D file, give the label with --label")
        paths, image, default_out = None, source, source.with_name(f"{stem}_pred.nii.gz")
    else:
        raise InputError(f"{source} does not exist")
    label: Path | None = args.label
    if label is not None and not label.is_file():
        raise InputError(f"the label file {label} does not exist")

    out: Path = default_out
    if args.out is not None:
        out = args.out / default_out.name if args.out.is_dir() else args.out
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: the folder {out.parent} does not exist")
    inputs = [*(paths or {}).values(), *([image] if image else []), *([label] if label else [])]
    if any(out.resolve() == p.resolve() for p in inputs):
        raise InputError(f"the output {out} is one of the inputs; choose another --out")
    return _Job(paths=paths, image=image, label=label, out=out)


def _fmt(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_summary(summary: Mapping[str, Any], *, tta: bool = False) -> str:
    """A few lines for a person: model, geometry, volumes, scores when present, timings."""
    lines = [
        f"model     {summary.get('model')} ({summary.get('model_sha256')}) on {summary.get('provider')}"
        + (", TTA" if tta else "")
    ]
    shape, spacing = summary.get("shape"), summary.get("spacing_mm")
    if shape:
        lines.append(
            "volume    " + "x".join(str(s) for s in shape)
            + (" voxels of " + "x".join(f"{s:g}" for s in spacing) + " mm" if spacing else "")
        )
    volumes = summary.get("volumes_ml") or {}
    if volumes:
        lines.append("ml        " + "  ".join(f"{k} {_fmt(v, 2)}" for k, v in volumes.items()))
    for key, title, digits in (("dice", "dice", 3), ("hd95_mm", "hd95 mm", 2)):
        scores = summary.get(key)
        if scores:
            lines.append(f"{title:<10}" + "  ".join(f"{k} {_fmt(v, digits)}" for k, v in scores.items()))
    timing = summary.get("timing_ms") or {}
    if timing:
        steps = ", ".join(f"{k} {v:.0f}" for k, v in timing.items() if k != "total" and v is not None)
        total = timing.get("total")
        lines.append(f"time ms   {_fmt(total, 0)}" + (f" ({steps})" if steps else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 done, 1 service error, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        job = _job(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("BRATS_API_KEY") or None
    progress = False if args.no_progress else None
    try:
        with SegmentationClient(args.url, api_key=api_key, timeout=args.timeout, progress=progress) as client:
            result = client.segment(job.paths, image=job.image, label=job.label, model=args.model, tta=args.tta,
                                    postprocess=not args.no_postprocess)
    except ServiceError as err:
        status = f"{err.status} " if err.status else ""
        retry = f" (retry after {err.retry_after} s)" if err.retry_after else ""
        where = f" (request id {err.request_id})" if err.request_id else ""
        print(f"error: {status}{err.detail}{retry}{where}", file=sys.stderr)
        return 1
    try:
        result.save(job.out)
    except OSError as err:
        print(f"error: cannot write {job.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**result.summary, "mask_path": str(job.out)}, indent=2))
    else:
        print(format_summary(result.summary, tta=args.tta))
        print(f"mask      {job.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
