"""Uploads of ``POST /segment``: a streamed ``multipart/form-data`` body, written part by part to a private
temporary folder (:mod:`service.api.upload_folders`) that is removed when the request ends.

The body is parsed as it arrives (python-multipart's streaming parser fed from ``request.stream()``), never
through ``request.form()``, which spools to the system temp folder with no per-request limit. Each file part
goes to ``<folder>/<random hex>``: the client's file name is never used, stored or logged (it can hold
patient data); only the part's form name (``flair``, ``image`` ...) is kept.

Limits, each answered with an RFC 9457 problem as soon as it is hit, without reading further:

- ``413`` when the body is larger than ``max_bytes`` (from ``Content-Length`` before anything is read,
  else while counting the bytes as they arrive);
- ``408`` when no byte of the body arrives for ``idle_timeout_s`` seconds (``BRATS_IDLE_TIMEOUT_S``), or the
  whole body takes longer than ``deadline_s`` (``BRATS_UPLOAD_TIMEOUT_S``: a client trickling a byte now and
  then cannot hold a folder for ever); the client may send the request again. 413 and 408 replies carry
  ``Connection: close``, as the rest of the body is left unread;
- ``415`` when the body is not ``multipart/form-data`` (or has a ``Content-Encoding``);
- ``499`` (recorded, never received) for a client that disconnects mid-body;
- ``400`` for a malformed body and any break of the part rules
  (:data:`EXPECTED_PARTS`): missing, duplicated, unknown or empty parts, ``image`` together with modality
  parts. Unknown, duplicated and mixed parts are refused as soon as their headers arrive, so there can
  never be more than five parts on disk.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request

from service.api.errors import ProblemError
from service.api.upload_folders import storage_error, temporary_folder
from service.api.upload_parts import DICOM_PART, EXPECTED_PARTS, begin_part, check_complete, part_rule_error
from service.core.scan import LABEL_PART, image_parts

__all__ = ["Upload", "check_content_type", "receive_multipart", "received_upload"]

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499
"""Status recorded (metrics, access log) for a request whose client left before its answer; nobody gets it."""

FLUSH_BYTES = 1 << 20
"""Part data is buffered up to this many bytes, then written to disk in a worker thread."""

@dataclass(frozen=True)
class Upload:
    """A received, well-formed upload (the part rules hold; the contents are not checked yet).

    Attributes:
        folder: The request's private temporary folder, which holds the files.
        files: Part name -> its file in ``folder`` (a random name); the NIfTI parts and the label.
        sizes: Part name -> its size in bytes (all ``dicom`` parts together).
        dicom: The files of the ``dicom`` parts, in the order received.
        body_bytes: Size of the whole multipart body.
    """

    folder: Path
    files: Mapping[str, Path]
    sizes: Mapping[str, int]
    body_bytes: int
    dicom: tuple[Path, ...] = ()

    @property
    def image_parts(self) -> tuple[str, ...]:
        """The image parts, in channel order: ``MODALITIES``, or ``("image",)`` for one 4D volume."""
        return image_parts(self.files)

    @property
    def label(self) -> Path | None:
        """The ground-truth file, if a ``label`` part was sent."""
        return self.files.get(LABEL_PART)


def _bad_request(detail: str, *, title: str = "Invalid upload") -> ProblemError:
    return ProblemError(400, title, detail)


def check_content_type(headers: Headers | Mapping[str, str]) -> bytes:
    """The multipart boundary of a request whose headers announce ``multipart/form-data``.

    Raises:
        ProblemError: 415 for another media type or a ``Content-Encoding``; 400 for a missing or invalid
            boundary.
    """
    media_type, options = parse_options_header(headers.get("content-type"))
    if media_type != b"multipart/form-data":
        shown = media_type.decode("latin-1")[:60] or "none"
        raise ProblemError(
            415,
            "Unsupported Media Type",
            f"the request body must be multipart/form-data (got {shown}); {EXPECTED_PARTS}",
        )
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ProblemError(
            415,
            "Unsupported Media Type",
            "a Content-Encoding of the request body is not supported; send the multipart body as it is "
            "(compress the NIfTI files themselves: .nii.gz)",
        )
    boundary = options.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 70:  # RFC 2046: 1 to 70 characters
        raise _bad_request("the multipart/form-data Content-Type has no valid boundary parameter")
    return boundary


def _too_large(max_bytes: int) -> ProblemError:
    return ProblemError(
        413,
        "Content Too Large",
        f"the upload is larger than this service's limit of {max_bytes} bytes ({max_bytes / 2**20:.1f} MiB); "
        "send gzip-compressed .nii.gz files, or ask the operator to raise BRATS_MAX_UPLOAD_BYTES",
        headers={"Connection": "close"},
    )


def _check_content_length(headers: Headers | Mapping[str, str], max_bytes: int) -> None:
    value = headers.get("content-length")
    if value is None:
        return
    if not value.strip().isdigit():
        raise _bad_request(f"the Content-Length header {value[:30]!r} is not a number of bytes")
    if int(value) > max_bytes:
        raise _too_large(max_bytes)


class _PartWriter:
    """One part's file: data buffered in memory, written out in a worker thread every ``FLUSH_BYTES``."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.path = folder / secrets.token_hex(16)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as err:  # no space, no inodes, too many open files: the server's problem
            raise storage_error(err) from None
        self._file = os.fdopen(fd, "wb")
        self._buffer = bytearray()
        self.size = 0

    async def write(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self._buffer:
            chunk, self._buffer = bytes(self._buffer), bytearray()
            try:
                await anyio.to_thread.run_sync(self._file.write, chunk)
            except OSError as err:
                raise storage_error(err) from None

    async def finish(self) -> None:
        try:
            await self._flush()
        finally:
            try:
                self._file.close()
            except OSError as err:
                raise storage_error(err) from None

    def abandon(self) -> None:
        try:
            self._file.close()
        except OSError:  # the request already failed; its own error is the one to report
            pass


class _Events:
    """Collects the parser's callbacks (which cannot await) for the receive loop to act on."""

    def __init__(self) -> None:
        # ("begin", the part's name or None), ("data", bytes), ("end", None), in the order of the body
        self.items: list[tuple[str, bytes | None]] = []
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": lambda data, start, end: self.items.append(("data", bytes(data[start:end]))),
            "on_part_end": lambda: self.items.append(("end", None)),
        }

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        kind, options = parse_options_header(self._headers.get(b"content-disposition"))
        self.items.append(("begin", options.get(b"name") if kind == b"form-data" else None))


def _timed_out(detail: str) -> ProblemError:
    return ProblemError(408, "Request Timeout", detail, headers={"Connection": "close"})


async def _time_limited(
    chunks: AsyncIterable[bytes], idle_timeout_s: float | None, deadline_s: float | None = None
) -> AsyncIterator[bytes]:
    """``chunks``, raising a 408 problem when the next one takes longer than ``idle_timeout_s`` to come, or
    when they have not all come ``deadline_s`` seconds after the first was asked for."""
    iterator = chunks.__aiter__()
    ends = None if deadline_s is None else anyio.current_time() + deadline_s
    while True:
        wait = idle_timeout_s
        if ends is not None:
            left = max(ends - anyio.current_time(), 0.0)
            wait = left if wait is None else min(wait, left)
        try:
            with anyio.fail_after(wait):
                chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            if ends is not None and anyio.current_time() >= ends:
                raise _timed_out(
                    f"the request body did not arrive within {deadline_s:g} s, so the upload was abandoned; "
                    "send it again over a faster link, or ask the operator to raise BRATS_UPLOAD_TIMEOUT_S"
                ) from None
            raise _timed_out(
                f"no data of the request body arrived for {idle_timeout_s:g} s, so the upload was abandoned; "
                "send the request again"
            ) from None
        yield chunk


async def receive_multipart(
    chunks: AsyncIterable[bytes],
    boundary: bytes,
    folder: Path,
    *,
    max_bytes: int,
    idle_timeout_s: float | None = None,
    deadline_s: float | None = None,
    max_dicom_parts: int = 5000,
) -> Upload:
    """Parse a multipart body from ``chunks`` into files in ``folder`` while checking the part rules.

    Args:
        chunks: The raw body (for example ``request.stream()``).
        boundary: The multipart boundary (see :func:`check_content_type`).
        folder: Where the part files go (a fresh private folder).
        max_bytes: Largest body accepted; the reading stops as soon as it is exceeded.
        idle_timeout_s: Longest wait for the next chunk (``None``: no limit).
        deadline_s: Longest time for the whole body (``None``: no limit).
        max_dicom_parts: Most ``dicom`` parts accepted (413 beyond).

    Raises:
        ProblemError: 413 over ``max_bytes`` or ``max_dicom_parts``; 408 when a chunk or the whole body is late; 499 when the client
            disconnects; 400 for a malformed or incomplete body or a part-rule violation.
    """
    receiver = _Receiver(boundary, folder, max_bytes=max_bytes, max_dicom_parts=max_dicom_parts)
    try:
        async with aclosing(_time_limited(chunks, idle_timeout_s, deadline_s)) as body:
            async for chunk in body:
                await receiver.feed(chunk)
    except ClientDisconnect:  # nobody reads the answer; 499 tells the metrics and the log what happened
        raise ProblemError(
            CLIENT_CLOSED_REQUEST, "Client Closed Request",
            "the client disconnected before the request body was complete",
        ) from None
    finally:
        receiver.abandon()
    return receiver.upload()


class _Receiver:
    """The state of one multipart body being received: the parser, the files so far, the part being written."""

    def __init__(self, boundary: bytes, folder: Path, *, max_bytes: int, max_dicom_parts: int = 5000) -> None:
        self._events = _Events()
        try:
            self._parser = MultipartParser(boundary, self._events.callbacks())
        except FormParserError as err:
            raise _bad_request(f"invalid multipart boundary ({err})") from None
        self._folder = folder
        self._max_bytes = max_bytes
        self._files: dict[str, Path] = {}
        self._dicom: list[Path] = []
        self._max_dicom_parts = max_dicom_parts
        self._sizes: dict[str, int] = {}
        self._current: _PartWriter | None = None
        self._total = 0

    async def feed(self, chunk: bytes) -> None:
        self._total += len(chunk)
        if self._total > self._max_bytes:
            raise _too_large(self._max_bytes)
        if self._parser.state == MultipartState.END:
            return  # the epilogue after the closing boundary is ignored, as RFC 2046 says
        try:
            self._parser.write(chunk)
        except FormParserError as err:
            raise _bad_request(f"the multipart/form-data body is malformed ({err})") from None
        try:
            for kind, payload in self._events.items:
                await self._handle(kind, payload)
        finally:
            self._events.items.clear()

    async def _handle(self, kind: str, payload: bytes) -> None:
        if kind == "begin":
            name = begin_part(payload, self._files, len(self._dicom), max_dicom_parts=self._max_dicom_parts)
            self._current = _PartWriter(name, self._folder)
            if name == DICOM_PART:
                self._dicom.append(self._current.path)
            else:
                self._files[name] = self._current.path
        elif kind == "data" and self._current is not None:
            await self._current.write(payload)
        elif kind == "end" and self._current is not None:
            part, self._current = self._current, None
            await part.finish()
            self._sizes[part.name] = self._sizes.get(part.name, 0) + part.size
            if part.size == 0:
                raise part_rule_error(f"part {part.name!r} is empty")

    def abandon(self) -> None:
        """Close the file of a part left unfinished (the folder's removal deletes it)."""
        if self._current is not None:
            self._current.abandon()
            self._current = None

    def upload(self) -> Upload:
        """The finished upload; raises a 400 problem if the body ended early or parts are missing."""
        if self._parser.state != MultipartState.END:
            raise _bad_request(
                "the multipart/form-data body ends before its closing boundary (truncated upload?)",
                title="Incomplete request",
            )
        check_complete(self._files, len(self._dicom))
        return Upload(
            folder=self._folder,
            files=MappingProxyType(dict(self._files)),
            dicom=tuple(self._dicom),
            sizes=MappingProxyType(dict(self._sizes)),
            body_bytes=self._total,
        )


@asynccontextmanager
async def received_upload(
    request: Request,
    *,
    tmp_dir: str | os.PathLike[str] | None,
    max_bytes: int,
    idle_timeout_s: float,
    deadline_s: float | None = None,
    max_dicom_parts: int = 5000,
) -> AsyncIterator[Upload]:
    """Receive the request's multipart body into a private temporary folder that lives as long as the block.

    The headers are checked first (415, 413 from ``Content-Length``, 400 for a missing boundary), before a
    folder is made or a byte read. The folder is removed when the block ends, whatever the outcome.

    Args:
        request: The incoming request; its body must not have been read.
        tmp_dir: Parent of the per-request folder (``None``: the system temp folder).
        max_bytes: Largest body accepted (413 beyond).
        idle_timeout_s: Longest wait for the next chunk of the body, in seconds (408 beyond).
        deadline_s: Longest time for the whole body, in seconds (408 beyond; ``None``: no limit).
        max_dicom_parts: Most ``dicom`` parts accepted (413 beyond).

    Yields:
        The :class:`Upload`.
    """
    boundary = check_content_type(request.headers)
    _check_content_length(request.headers, max_bytes)
    async with temporary_folder(tmp_dir) as folder:
        upload = await receive_multipart(
            request.stream(), boundary, folder, max_bytes=max_bytes, idle_timeout_s=idle_timeout_s,
            deadline_s=deadline_s, max_dicom_parts=max_dicom_parts,
        )
        logger.debug(
            "upload received: %d bytes, parts %s",
            upload.body_bytes,
            ", ".join(f"{name}={size}" for name, size in upload.sizes.items()),
        )
        yield upload
