"""The lifecycle of upload folders: one private temporary folder per request, removed when it ends, and the
folders of a killed process removed when the service starts again."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from service.api.errors import ProblemError

__all__ = ["FOLDER_PREFIX", "remove_stale_folders", "storage_error", "temporary_folder"]

logger = logging.getLogger(__name__)

FOLDER_PREFIX = "segment-"
"""Upload folders are named ``segment-<pid>-<random>``: the process that owns one can be told from its name."""


@asynccontextmanager
async def temporary_folder(parent: str | os.PathLike[str] | None = None) -> AsyncIterator[Path]:
    """A new private folder (mode 0700, named ``segment-<pid>-<random>``) inside ``parent``, removed with its
    contents on exit.

    Removal happens whatever ends the block: success, an exception, or cancellation (a client that went
    away, a server shutting down). It is done synchronously so that a cancelled task cannot skip it. Only a
    process killed outright (SIGKILL, power loss) leaves its folders behind: :func:`remove_stale_folders`
    removes them when the service starts again.
    """
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=parent))
    except OSError as err:
        raise storage_error(err) from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_folders(parent: str | os.PathLike[str] | None = None) -> int:
    """Remove the upload folders in ``parent`` (default: the system temp folder) left by service processes
    that no longer run (killed before they could clean up), and those named after this process's own pid
    (a previous process with the same pid, as in a restarted container). Folders of other running
    processes (several services sharing one temp folder) are kept.

    Returns:
        How many folders were removed.
    """
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    removed = 0
    try:
        candidates = list(parent.glob(f"{FOLDER_PREFIX}*-*"))
    except OSError:
        return 0
    for folder in candidates:
        pid_text = folder.name[len(FOLDER_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or not folder.is_dir() or folder.is_symlink():
            continue
        pid = int(pid_text)
        if pid == os.getpid() or not _process_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed += not folder.exists()
    if removed:
        logger.warning("removed %d upload folder(s) left behind by a service process that was killed", removed)
    return removed


def storage_error(err: OSError) -> ProblemError:
    """The temporary storage failed (full disk, ...): the server's problem, not the request's."""
    logger.error("cannot write an upload to the temporary folder: %s", err.strerror or type(err).__name__)
    return ProblemError(
        503,
        "Service Unavailable",
        "the service cannot store the upload right now (its temporary storage is full or failing); "
        "try again later",
        headers={"Retry-After": "30", "Connection": "close"},
    )
