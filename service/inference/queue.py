"""The inference queue: admits, runs, times and records every inference of the service.

Inference is CPU- or GPU-bound and holds whole volumes in memory, so :meth:`InferenceQueue.run` lets at
most ``max_concurrent`` jobs run (in a dedicated thread pool, never on the event loop) and at most
``max_queue`` wait; one more raises :class:`QueueFullError`, which the route answers with 503 and
``Retry-After``. The queue keeps the Prometheus gauges of running and waiting jobs and observes each job's
time (queue wait excluded) in ``brats_inference_duration_seconds``.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from service.observability import Metrics

T = TypeVar("T")


class QueueFullError(RuntimeError):
    """Every inference slot is busy and the waiting queue is full; answer 503 with ``Retry-After``."""

    def __init__(self, running: int, waiting: int) -> None:
        super().__init__(
            f"the service is busy: {running} inference(s) running and {waiting} waiting, the most it queues; "
            "retry shortly"
        )
        self.running = running
        self.waiting = waiting


class InferenceQueue:
    """At most ``max_concurrent`` jobs running and ``max_queue`` waiting.

    Args:
        max_concurrent: jobs that run at the same time (``BRATS_MAX_CONCURRENT``).
        max_queue: jobs that may wait for a slot (``BRATS_MAX_QUEUE``).
        metrics: where the queue depth, running jobs, refusals and job times go (a private :class:`Metrics`
            if ``None``).
    """

    def __init__(self, max_concurrent: int = 1, max_queue: int = 4, *, metrics: Metrics | None = None) -> None:
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError(f"need max_concurrent >= 1 and max_queue >= 0, got {max_concurrent} and {max_queue}")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.metrics = metrics if metrics is not None else Metrics()
        self._executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="inference")
        self._slots = asyncio.Semaphore(max_concurrent)
        self._admitted = 0  # running + waiting
        self._running = 0
        self._update_gauges()

    @property
    def running(self) -> int:
        """Inferences in progress."""
        return self._running

    @property
    def waiting(self) -> int:
        """Calls waiting for an inference slot (the queue depth)."""
        return self._admitted - self._running

    def check_capacity(self) -> None:
        """Raise :class:`QueueFullError` now if a call to :meth:`run` would be refused (e.g. before an upload
        is received, so that a busy service does not first take in a large body)."""
        if self._admitted >= self.max_concurrent + self.max_queue:
            self.metrics.rejected.inc()
            raise QueueFullError(self._running, self.waiting)

    async def run(self, fn: Callable[..., T], *args: Any, model: str | None = None) -> T:
        """``fn(*args)`` in an inference thread, at most ``max_concurrent`` at a time.

        The caller's context variables (the request id for logging) are visible in the thread.

        Args:
            fn: a blocking callable, e.g. :func:`service.inference.pipeline.segment_files` (use
                ``functools.partial`` for keywords).
            model: label of ``brats_inference_duration_seconds`` (the model name or ``ensemble``) under which
                the job's time is recorded when it succeeds; ``None`` records nothing.

        Raises:
            QueueFullError: ``max_concurrent`` calls run and ``max_queue`` wait already.
            Whatever ``fn`` raises.

        A caller cancelled while waiting (client gone) leaves the queue at once. One cancelled while ``fn``
        runs gets the cancellation at once, but the slot stays taken until the thread ends (a running ONNX
        Runtime call cannot be stopped), so the limit on concurrent inferences always holds.
        """
        self.check_capacity()
        self._admitted += 1
        self._update_gauges()
        try:
            await self._slots.acquire()
        except BaseException:
            self._admitted -= 1
            self._update_gauges()
            raise
        self._running += 1
        self._update_gauges()
        context = contextvars.copy_context()
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._call, context, fn, args, model)
        handed_off = False
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if not future.done():
                handed_off = True
                future.add_done_callback(self._release_when_done)
            raise
        finally:
            if not handed_off:
                self._release()

    def _call(self, context: contextvars.Context, fn: Callable[..., T], args: tuple, model: str | None) -> T:
        start = time.perf_counter()
        result = context.run(fn, *args)  # a job that fails (bad input, cancelled) is not timed
        if model is not None:
            self.metrics.inference.labels(model).observe(time.perf_counter() - start)
        return result

    def _release(self) -> None:
        self._running -= 1
        self._admitted -= 1
        self._slots.release()
        self._update_gauges()

    def _release_when_done(self, future: Future | asyncio.Future) -> None:
        if not future.cancelled():
            future.exception()  # retrieved, so that asyncio does not log it: the caller has gone
        self._release()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.running.set(self._running)

    def close(self) -> None:
        """Stop the inference threads (running calls finish; queued ones are dropped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"InferenceQueue(running={self._running}, waiting={self.waiting}, max_concurrent={self.max_concurrent})"
