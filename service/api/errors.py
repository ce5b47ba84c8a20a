"""RFC 9457 problem details for every error the service answers.

Routes raise :class:`ProblemError`; :func:`install_error_handlers` turns it, FastAPI's request validation
errors (422), Starlette's HTTP errors (404, 405, ...) and anything unexpected (500) into
``application/problem+json`` bodies ``{"type", "title", "status", "detail"}``.

A ``detail`` tells a person what to fix. It never carries an uploaded file's name, a temporary path or
header text: those can hold patient data. A 500 says only that something went wrong and quotes the
request id that the log line carries.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class Problem(BaseModel):
    """The body of every error reply (RFC 9457 problem details), as the OpenAPI document shows it."""

    type: str = Field(description="A URI naming the problem type; `about:blank` means: see the status code.")
    title: str = Field(description="A short summary of the problem type.")
    status: int = Field(ge=400, le=599, description="The HTTP status code of the reply.")
    detail: str = Field(description="What went wrong in this request and what to do about it.")


PROBLEM_SCHEMA: dict[str, Any] = Problem.model_json_schema()
"""The JSON schema of :class:`Problem`, inlined where the OpenAPI document describes an error reply."""

OPTIONAL_API_KEY: dict[str, Any] = {"security": [{}]}
"""``openapi_extra`` of an operation whose ``X-API-Key`` is required only when the operator configures keys: FastAPI
lists the key scheme, and this adds the alternative of no key at all (OpenAPI's empty security requirement)."""

_WWW_AUTHENTICATE_DOC = {"WWW-Authenticate": "`ApiKey`: send a key in the X-API-Key header."}


def problem_responses(
    descriptions: Mapping[int, str], *, headers: Mapping[int, Mapping[str, str]] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses: ``application/problem+json`` bodies of the
    :class:`Problem` schema, and the headers sent with them (a 401 always carries ``WWW-Authenticate``).

    Args:
        descriptions: Status code -> when the operation answers it.
        headers: Status code -> more headers of that reply, name -> description (``Retry-After`` of a 503).
    """
    extra = {401: _WWW_AUTHENTICATE_DOC, **(headers or {})}
    responses: dict[int | str, dict[str, Any]] = {}
    for status, description in descriptions.items():
        entry: dict[str, Any] = {"description": description, "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}}
        if status in extra:
            entry["headers"] = {
                name: {"description": text, "schema": {"type": "string"}} for name, text in extra[status].items()
            }
        responses[status] = entry
    return responses


class ProblemError(Exception):
    """An error answered as a problem details response.

    Args:
        status: HTTP status code.
        title: short, fixed summary of the problem type (e.g. ``"Invalid upload"``); empty means the
            status phrase.
        detail: what went wrong in this request and what to do about it.
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
        type: a URI naming the problem type; ``about:blank`` means "see the status code".
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        type: str = "about:blank",  # noqa: A002 - the RFC 9457 member name
    ) -> None:
        super().__init__(detail)
        self.status = int(status)
        self.title = title or status_phrase(self.status)
        self.detail = detail
        self.headers = dict(headers or {})
        self.type = type

    def __repr__(self) -> str:
        return f"ProblemError({self.status}, {self.title!r}, {self.detail!r})"


class ProblemResponse(JSONResponse):
    """A JSON response with the ``application/problem+json`` media type."""

    media_type = PROBLEM_JSON


def status_phrase(status: int) -> str:
    """``404`` -> ``"Not Found"``; an unknown code -> ``"Error"``."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    type: str = "about:blank",  # noqa: A002
) -> ProblemResponse:
    """The problem details response ``{"type", "title", "status", "detail"}``."""
    body = {"type": type, "title": title or status_phrase(status), "status": int(status), "detail": detail}
    return ProblemResponse(body, status_code=status, headers=dict(headers or {}))


def internal_error_response() -> ProblemResponse:
    """The 500 answered for an unexpected exception: nothing about it leaks to the client."""
    return problem_response(
        500,
        "Internal Server Error",
        "The service failed while handling this request. Nothing was kept; try again, and if it persists "
        "report the X-Request-ID of this response to the operators.",
    )


def _location(loc: Sequence[Any]) -> str:
    """``("query", "tta")`` -> ``"query parameter 'tta'"``; ``("body", "x", 0)`` -> ``"body field 'x.0'"``."""
    parts = [str(p) for p in loc]
    if not parts:
        return "request"
    where, rest = parts[0], parts[1:]
    name = ".".join(rest)
    kind = {"query": "query parameter", "path": "path parameter", "header": "header", "cookie": "cookie"}.get(where)
    if kind is None:
        return f"body field {name!r}" if where == "body" and name else ("request body" if where == "body" else name)
    return f"{kind} {name!r}"


def validation_detail(errors: Sequence[Mapping[str, Any]]) -> str:
    """One sentence per error naming the bad parameter, e.g. ``query parameter 'tta': Input should be a
    valid boolean``. The offending value is not repeated (pydantic's messages name the expected values)."""
    sentences = []
    for error in errors:
        message = str(error.get("msg", "invalid value"))
        sentences.append(f"{_location(error.get('loc', ()))}: {message}")
    return "; ".join(sentences) or "The request is invalid."


async def _problem_error(request: Request, exc: ProblemError) -> ProblemResponse:
    # 503 (busy, not ready) is the documented answer to overload, with Retry-After: a warning, not an error
    level = logging.INFO if exc.status < 500 else logging.WARNING if exc.status == 503 else logging.ERROR
    logger.log(level, "%d %s", exc.status, exc.title)
    return problem_response(exc.status, exc.title, exc.detail, headers=exc.headers, type=exc.type)


async def _validation_error(request: Request, exc: RequestValidationError) -> ProblemResponse:
    return problem_response(422, "Invalid request parameters", validation_detail(exc.errors()))


_HTTP_DETAILS = {
    404: "There is no endpoint at this path; the API is described at /docs.",
    401: "Authentication is required.",
}


async def _http_error(request: Request, exc: StarletteHTTPException) -> ProblemResponse:
    status = exc.status_code
    headers = dict(exc.headers or {})
    phrase = status_phrase(status)
    if status == 405:
        allowed = headers.get("Allow") or headers.get("allow")
        detail = f"Method {request.method} is not allowed on this endpoint" + (
            f"; use {allowed}." if allowed else "."
        )
    elif isinstance(exc.detail, str) and exc.detail and exc.detail != phrase:
        detail = exc.detail
    else:
        detail = _HTTP_DETAILS.get(status, phrase + ".")
    return problem_response(status, phrase, detail, headers=headers)


async def _unexpected_error(request: Request, exc: Exception) -> ProblemResponse:
    logger.error("unhandled %s while handling %s %s", type(exc).__name__, request.method,
                 getattr(request.scope.get("route"), "path", "?"), exc_info=exc)
    return internal_error_response()


def install_error_handlers(app: FastAPI) -> None:
    """Register the problem details handlers on ``app``.

    The 500 handler is a fallback: :class:`service.observability.RequestContextMiddleware` catches
    unexpected exceptions first, so that the 500 carries ``X-Request-ID`` too.
    """
    app.add_exception_handler(ProblemError, _problem_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
