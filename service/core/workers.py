"""One small pool of threads for the CPU work of a request that NumPy and zlib do without the GIL (decoding the
parts, z-scoring the channels), so that it spreads over the cores.

The pool is made on first use, in each process: a child forked from a process that had one starts without it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

__all__ = ["THREADS", "thread_pool"]

THREADS = min(4, os.cpu_count() or 1)
"""Threads of the pool: one a core, at most four (a scan has four channels)."""

_pool: ThreadPoolExecutor | None = None


def _forget() -> None:
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget)


def thread_pool() -> ThreadPoolExecutor:
    """The process's pool (made on first use). Never submit to it from one of its own tasks and wait."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="worker")
    return _pool
