"""The loaded models, their engines, readiness, and the bounded executor that runs inference.

:class:`ModelRegistry` is built from :class:`~service.settings.Settings` by ``create_app`` (nothing is
loaded at import time); the app's lifespan calls :meth:`ModelRegistry.load` in a worker thread. Loading
never raises: a missing or empty models folder leaves the registry not ready, with ``reason`` saying why
(``/readyz`` answers 503 with it); a model that cannot be loaded is left out and named in ``reason`` while
the others serve.

Inference is CPU- or GPU-bound and holds whole volumes in memory, so :meth:`ModelRegistry.run` lets at
most ``max_concurrent`` calls run (in a dedicated thread pool, never on the event loop) and at most
``max_queue`` wait; one more raises :class:`QueueFullError`, which the route answers with 503 and
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from service.inference.card import RESERVED_NAMES
from service.inference.engine import Engine
from service.inference.model import OnnxModel, load_model, model_paths
from service.observability import Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

ENSEMBLE = RESERVED_NAMES[0]
"""``model=ensemble``: the average of the probabilities of all loaded models."""

PREFERRED_DEFAULT = "resunet"


class QueueFullError(RuntimeError):
    """Every inference slot is busy and the waiting queue is full; answer 503 with ``Retry-After``."""

    def __init__(self, running: int, waiting: int) -> None:
        super().__init__(
            f"the service is busy: {running} inference(s) running and {waiting} waiting, the most it queues; "
            "retry shortly"
        )
        self.running = running
        self.waiting = waiting


class ModelRegistry:
    """Models by name, one :class:`Engine` per name plus ``ensemble``, readiness, and the bounded executor.

    Args:
        settings: models folder, providers, threads, default model, overlap, batch size, concurrency limits.
        metrics: where the queue depth, running inferences and inference times go (a private
            :class:`Metrics` if ``None``).

    Attributes:
        models: loaded models by name (empty until :meth:`load` ran).
        failed: models of the folder that could not be loaded, by name, with the reason.
        default: the model used when a request names none; ``None`` when nothing is loaded, or when the
            configured default is not.
        ready: every model of the folder is loaded and the default is among them.
        reason: why the registry is not ready (``None`` when it is).
    """

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.models: dict[str, OnnxModel] = {}
        self.failed: dict[str, str] = {}
        self.default: str | None = None
        self.ready = False
        self.reason: str | None = "the models are still loading"
        self._engines: dict[str, Engine] = {}
        self._executor = ThreadPoolExecutor(max_workers=settings.max_concurrent, thread_name_prefix="inference")
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._admitted = 0  # running + waiting
        self._running = 0
        self._update_gauges()

    # ----------------------------------------------------------------------------------------- loading
    def load(self) -> None:
        """Load every model of ``settings.models_dir`` and build the engines; never raises.

        A model that cannot be loaded (corrupt file, card that does not match, ...) is logged and listed in
        :attr:`failed`; the others serve, but the registry is not ready (``/readyz`` says which model failed
        and why; with ``BRATS_REQUIRE_MODELS`` the service does not start).

        Blocking (ONNX Runtime builds its sessions): call it in a worker thread from async code.
        """
        s = self.settings
        self.ready, self.reason = False, "the models are still loading"
        start = time.perf_counter()
        try:
            paths = model_paths(s.models_dir)
        except ValueError as exc:
            self._not_ready(f"no models loaded: {exc}")
            return
        models: dict[str, OnnxModel] = {}
        failed: dict[str, str] = {}
        for path in paths:
            try:
                model = load_model(
                    path,
                    backend=s.backend,
                    precision=s.precision,
                    batch_size=s.batch_size,
                    providers=s.providers or None,
                    intra_op_threads=s.threads,
                    cudnn_conv_algo_search=s.cudnn_conv_algo_search,
                    gpu_mem_limit=s.gpu_mem_limit_bytes,
                )
            except ValueError as exc:  # the reason names the file, not the server's folders (/readyz is open)
                failed[path.stem] = str(exc).replace(str(path), path.name)
            except Exception as exc:  # ONNX Runtime or the OS; the other models still serve
                failed[path.stem] = f"{type(exc).__name__}: {exc}".replace(str(path), path.name)
            else:
                models[model.name] = model
                continue
            logger.error("model %s cannot be loaded and is not served: %s", path.stem, failed[path.stem])
        engines = {
            name: Engine([model], overlap=s.overlap, batch_size=s.batch_size) for name, model in models.items()
        }
        if models:
            try:
                engines[ENSEMBLE] = Engine(list(models.values()), overlap=s.overlap, batch_size=s.batch_size)
            except ValueError as exc:
                logger.warning("model=%s is unavailable: %s", ENSEMBLE, exc)
        self.models, self.failed, self._engines = models, failed, engines
        self.metrics.models_loaded.set(len(models))
        if s.default_model is not None:
            self.default = s.default_model if s.default_model in models else None
        else:
            self.default = PREFERRED_DEFAULT if PREFERRED_DEFAULT in models else (self.names or [None])[0]
        problems = [f"model {name} could not be loaded ({reason})" for name, reason in failed.items()]
        if s.default_model is not None and self.default is None:
            problems.append(
                f"the configured default model {s.default_model!r} (BRATS_DEFAULT_MODEL) is not among the loaded "
                f"models {self.names}"
            )
        if problems:
            serving = f"serving {', '.join(self.names)}" if models else "no models loaded"
            self._not_ready(f"{'; '.join(problems)}; {serving}")
            return
        self.ready, self.reason = True, None
        self.metrics.ready.set(1)
        logger.info(
            "ready: models %s (default %s) on %s in %.1f s",
            self.names, self.default, sorted({f"{m.provider} {m.precision}" for m in models.values()}),
            time.perf_counter() - start,
        )

    def _not_ready(self, reason: str) -> None:
        self.ready, self.reason = False, reason
        self.metrics.ready.set(0)
        logger.warning("NOT READY: %s. /readyz answers 503 until this is fixed and the service restarted", reason)

    # ----------------------------------------------------------------------------------------- lookup
    @property
    def names(self) -> list[str]:
        """Loaded model names, sorted."""
        return sorted(self.models)

    @property
    def choices(self) -> list[str]:
        """Valid values of ``model``: the loaded names, then ``ensemble`` when the models can be averaged."""
        return self.names + ([ENSEMBLE] if ENSEMBLE in self._engines else [])

    def engine(self, name: str) -> Engine:
        """The engine for a loaded model name or ``ensemble``.

        Raises:
            KeyError: ``name`` is not one of :attr:`choices` (the message lists them).
        """
        try:
            return self._engines[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; valid names: {', '.join(self.choices) or 'none loaded'}") from None

    # ---------------------------------------------------------------------------------------- executor
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
        if self._admitted >= self.settings.max_concurrent + self.settings.max_queue:
            self.metrics.rejected.inc()
            raise QueueFullError(self._running, self.waiting)

    async def run(self, fn: Callable[..., T], *args: Any, model: str | None = None) -> T:
        """``fn(*args)`` in an inference thread, at most ``max_concurrent`` at a time.

        The caller's context variables (the request id for logging) are visible in the thread.

        Args:
            fn: a blocking callable, e.g. ``engine.segment`` (use ``functools.partial`` for keywords).
            model: label of ``brats_inference_duration_seconds`` (the model name or ``ensemble``).

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
        try:
            return context.run(fn, *args)
        finally:
            if model is not None:
                self.metrics.inference.labels(model).observe(time.perf_counter() - start)

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
        state = "ready" if self.ready else f"not ready ({self.reason})"
        return f"ModelRegistry({self.names}, default={self.default!r}, {state})"
