"""Logging with request ids, and the Prometheus metrics.

- :data:`request_id_var` holds the id of the request being handled (set by
  :class:`service.api.request_context.RequestContextMiddleware`).
- :func:`configure_logging` puts the request id in every log line (worker threads included when they are
  started through :meth:`service.inference.queue.InferenceQueue.run`). Log lines carry ids, sizes, statuses
  and timings; never file names, paths from a request, or header text.
- :class:`Metrics` holds the Prometheus collectors in a per-app :class:`~prometheus_client.CollectorRegistry`
  (so that several apps in one process, as in tests, do not collide). The inference time it records is
  a whole job of the inference queue: reading the scan, segmenting, scoring and encoding.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import warnings

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

METRICS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""Prometheus text exposition format 0.0.4."""

NO_REQUEST = "-"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default=NO_REQUEST)
"""The id of the request being handled in this context (``"-"`` outside a request)."""


# ---------------------------------------------------------------------------------------------- logging
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current request's id, ``"-"`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


_HANDLER_NAME = "brats-service"


def configure_logging(level: str | int = "INFO") -> None:
    """One stderr handler on the root logger with the request id in every line; uvicorn's loggers go through
    it too. Calling it again replaces the handler (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.propagate = True
        uv.setLevel(level)
    numeric = logging.getLevelName(level) if isinstance(level, str) else level
    for name, floor in IDENTIFYING_LOGGERS.items():
        logging.getLogger(name).setLevel(max(numeric, floor))
    for module in IDENTIFYING_WARNINGS:  # their warnings quote attribute values (names, UIDs)
        warnings.filterwarnings("ignore", module=module)


IDENTIFYING_LOGGERS = {"highdicom": logging.WARNING, "pydicom": logging.ERROR, "dicomweb_client": logging.WARNING,
                       "urllib3": logging.WARNING}
"""Libraries whose log lines below these levels name instances by UID or show request URLs that hold UIDs."""
IDENTIFYING_WARNINGS = (r"highdicom(\.|$)", r"pydicom(\.|$)")
"""Modules whose warnings (e.g. on a malformed person name) quote the value they judge."""


# ---------------------------------------------------------------------------------------------- metrics
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
INFERENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """The service's Prometheus collectors, in their own registry.

    Attributes:
        requests: ``brats_http_requests_total{endpoint, method, model, status}``.
        latency: ``brats_http_request_duration_seconds{endpoint, method, model, status}``.
        inference: ``brats_inference_duration_seconds{model}``: time of a successful job in the inference
            queue (reading the scan, segmenting, scoring, encoding), queue wait excluded.
        queue_depth: ``brats_inference_queue_depth``: requests waiting for an inference slot.
        running: ``brats_inferences_running``: inferences in progress.
        rejected: ``brats_inference_rejected_total``: requests answered 503 because the queue was full.
        models_loaded: ``brats_models_loaded``; ready: ``brats_ready`` (1 when ``/readyz`` answers 200).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ("endpoint", "method", "model", "status")
        self.requests = Counter(
            "brats_http_requests", "HTTP requests by endpoint template, method, model and status",
            labels, registry=self.registry,
        )
        self.latency = Histogram(
            "brats_http_request_duration_seconds", "HTTP request latency by endpoint template, method, model and status",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.inference = Histogram(
            "brats_inference_duration_seconds",
            "Inference job time by model: read, segment, score, encode (queue wait excluded)",
            ("model",), buckets=INFERENCE_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge(
            "brats_inference_queue_depth", "Requests waiting for an inference slot", registry=self.registry
        )
        self.running = Gauge("brats_inferences_running", "Inferences in progress", registry=self.registry)
        self.rejected = Counter(
            "brats_inference_rejected", "Requests refused with 503 because the inference queue was full",
            registry=self.registry,
        )
        self.models_loaded = Gauge("brats_models_loaded", "Models loaded", registry=self.registry)
        self.ready = Gauge("brats_ready", "1 when every configured model is loaded, else 0", registry=self.registry)

    def observe_request(self, endpoint: str, method: str, model: str, status: int, seconds: float) -> None:
        labels = (endpoint, method, model, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of this registry."""
        return generate_latest(self.registry)
