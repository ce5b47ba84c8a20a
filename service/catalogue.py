"""The catalogue of models: what is loaded, the engine for each name (and ``ensemble``), and readiness.

:class:`ModelCatalogue` is built from :class:`~service.settings.Settings` by ``create_app`` (nothing is
loaded at import time); the app's lifespan calls :meth:`ModelCatalogue.load` in a worker thread. Loading
never raises: a missing or empty models folder leaves the catalogue not ready, with ``reason`` saying why
(``/readyz`` answers 503 with it); a model that cannot be loaded is left out and named in ``reason`` while
the others serve. Every model runs with the one :class:`~service.inference.backends.BackendOptions` that
the settings make. Running inferences is :class:`service.inference.queue.InferenceQueue`'s job.
"""

from __future__ import annotations

import logging
import time

from service.inference.card import RESERVED_NAMES
from service.inference.engine import Engine
from service.inference.model import OnnxModel, load_model, model_paths
from service.observability import Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)

ENSEMBLE = RESERVED_NAMES[0]
"""``model=ensemble``: the average of the probabilities of all loaded models."""

PREFERRED_DEFAULT = "resunet"


class ModelCatalogue:
    """Models by name, one :class:`Engine` per name plus ``ensemble``, and readiness.

    Args:
        settings: models folder, backend options, overlap, default model.
        metrics: where ``brats_models_loaded`` and ``brats_ready`` go (a private :class:`Metrics` if ``None``).

    Attributes:
        models: loaded models by name (empty until :meth:`load` ran).
        failed: models of the folder that could not be loaded, by name, with the reason.
        default: the model used when a request names none; ``None`` when nothing is loaded, or when the
            configured default is not.
        ready: every model of the folder is loaded and the default is among them.
        reason: why the catalogue is not ready (``None`` when it is).
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

    # ----------------------------------------------------------------------------------------- loading
    def load(self) -> None:
        """Load every model of ``settings.models_dir`` and build the engines; never raises.

        A model that cannot be loaded (corrupt file, card that does not match, ...) is logged and listed in
        :attr:`failed`; the others serve, but the registry is not ready (``/readyz`` says which model failed
        and why; with ``BRATS_REQUIRE_MODELS`` the service does not start).

        Blocking (ONNX Runtime builds its sessions): call it in a worker thread from async code.
        """
        s = self.settings
        options = s.backend_options()
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
                model = load_model(path, options)
            except ValueError as exc:  # the reason names the file, not the server's folders (/readyz is open)
                failed[path.stem] = str(exc).replace(str(path), path.name)
            except Exception as exc:  # ONNX Runtime or the OS; the other models still serve
                failed[path.stem] = f"{type(exc).__name__}: {exc}".replace(str(path), path.name)
            else:
                models[model.name] = model
                continue
            logger.error("model %s cannot be loaded and is not served: %s", path.stem, failed[path.stem])
        engines = {
            name: Engine([model], overlap=s.overlap, batch_size=options.batch_size) for name, model in models.items()
        }
        if models:
            try:
                engines[ENSEMBLE] = Engine(list(models.values()), overlap=s.overlap, batch_size=options.batch_size)
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

    def __repr__(self) -> str:
        state = "ready" if self.ready else f"not ready ({self.reason})"
        return f"ModelCatalogue({self.names}, default={self.default!r}, {state})"
