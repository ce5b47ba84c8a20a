"""Request context: an id for every request, the 500 problem for a crash, request metrics and the access log.

:class:`RequestContextMiddleware` gives every request an id (the client's ``X-Request-ID`` when it is a sane
token, else a new one), returns it in ``X-Request-ID`` on every response (errors included), turns an
unexpected exception into a 500 problem, counts and times the request, and writes one access log line.
A route that resolves a model sets ``request.state.model = name`` so that the request metrics carry it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import internal_error_response
from service.observability import Metrics, request_id_var

logger = logging.getLogger("service.access")

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
UNMATCHED = "unmatched"
"""Endpoint label of a request that matched no route (a 404): raw paths would grow the label set unboundedly."""


def request_id_from(value: str | None) -> str:
    """The client's id if it is a sane token (letters, digits, ``._:-``, at most 128), else a new uuid4 hex."""
    if value and _SANE_ID.match(value):
        return value
    return uuid.uuid4().hex


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
