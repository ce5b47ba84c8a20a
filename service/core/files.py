"""Atomic file writes: readers see the old file or the whole new one, never half of it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success it is renamed over ``path``, else removed.

    The temporary name is unique (two writers never collide) and hidden (starts with a dot), and it lies in
    the same folder so that the final rename is atomic.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, payload: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write ``payload`` (bytes, text, or a function given the open binary file) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        if callable(payload):
            payload(fh)
        else:
            fh.write(payload.encode() if isinstance(payload, str) else payload)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask cannot be read without briefly changing it
