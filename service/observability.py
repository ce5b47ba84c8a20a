"""Request ids, logging and Prometheus metrics.

- :class:`RequestContextMiddleware` gives every request an id (the client's ``X-Request-ID`` when it is a
  sane token, else a new one), returns it in ``X-Request-ID`` on every response (errors included), turns an
  unexpected exception into a 500 problem, counts and times the request, and writes one access log line.
- :func:`configure_logging` puts the request id in every log line (worker threads included when they are
  started through :meth:`service.registry.ModelRegistry.run`). Log lines carry ids, sizes, statuses and
  timings; never file names, paths from a request, or header text.
- :class:`Metrics` holds the Prometheus collectors in a per-app :class:`~prometheus_client.CollectorRegistry`
  (so that several apps in one process, as in tests, do not collide).

A route that resolves a model sets ``request.state.model = name`` so that the request metrics carry it.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import internal_error_response

logger = logging.getLogger("service.access")

REQUEST_ID_HEADER = "X-Request-ID"
METRICS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""Prometheus text exposition format 0.0.4."""

_SANE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
NO_REQUEST = "-"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default=NO_REQUEST)
"""The id of the request being handled in this context (``"-"`` outside a request)."""


def request_id_from(value: str | None) -> str:
    """The client's id if it is a sane token (letters, digits, ``._:-``, at most 128), else a new uuid4 hex."""
    if value and _SANE_ID.match(value):
        return value
    return uuid.uuid4().hex


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


# ---------------------------------------------------------------------------------------------- metrics
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
INFERENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
UNMATCHED = "unmatched"
"""Endpoint label of a request that matched no route (a 404): raw paths would grow the label set unboundedly."""


class Metrics:
    """The service's Prometheus collectors, in their own registry.

    Attributes:
        requests: ``brats_http_requests_total{endpoint, method, model, status}``.
        latency: ``brats_http_request_duration_seconds{endpoint, method, model, status}``.
        inference: ``brats_inference_duration_seconds{model}``: time in the engine, queue wait excluded.
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
            "brats_inference_duration_seconds", "Inference time by model (queue wait excluded)",
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


# ------------------------------------------------------------------------------------------- middleware
def endpoint_label(scope: Scope, status: int | None = None) -> str:
    """The route template (``/segment``); :data:`UNMATCHED` when no route matched (a 404).

    FastAPI records the matched route in the scope for its API routes only; a request to one of its own
    plain routes (``/docs``, ``/openapi.json``) is labelled with its path, which is safe because only a
    fixed set of paths can be answered other than 404.
    """
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str) and path:
        return path
    if status is not None and status != 404:
        return str(scope.get("path", UNMATCHED))
    return UNMATCHED


class RequestContextMiddleware:
    """Pure ASGI middleware: request id, ``X-Request-ID`` on every response, 500 problems, metrics, access log.

    Args:
        app: the wrapped ASGI app.
        metrics: where request counts and latencies go; ``None`` records none.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(_header(scope, b"x-request-id"))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        response: dict[str, Any] = {"status": None, "bytes": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
            elif message["type"] == "http.response.body":
                response["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            logging.getLogger("service").error(
                "unhandled %s on %s %s", type(exc).__name__, scope.get("method"), endpoint_label(scope), exc_info=exc
            )
            if response["status"] is not None:
                raise  # the response has begun: nothing better to do than let the server drop the connection
            await internal_error_response()(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            status = response["status"] if response["status"] is not None else 500
            endpoint = endpoint_label(scope, status)
            model = str(state.get("model") or "")
            if self.metrics is not None:
                self.metrics.observe_request(endpoint, scope.get("method", ""), model, status, elapsed)
            logger.info(
                "%s %s%s %d in=%s out=%d %.1f ms",
                scope.get("method"), endpoint, f" model={model}" if model else "", status,
                _content_length(scope), response["bytes"], 1000 * elapsed,
            )
            request_id_var.reset(token)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            try:
                return value.decode("latin-1")
            except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
                return None
    return None


def _content_length(scope: Scope) -> str:
    """The request's declared body size as digits, or ``"-"`` (header text is never logged as such)."""
    value = _header(scope, b"content-length")
    return value if value is not None and value.isdigit() else "-"
