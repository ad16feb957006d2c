"""Every API error as JSON `{"code", "detail"}`: stable snake_case codes, no traces, no SQL."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap
from opentelemetry import trace

__all__ = ["ApiError", "ErrorBody", "error_body", "error_response", "exception_handlers"]

log = logging.getLogger("k2d.api")

# Codes whose HTTP reason phrase would not read well as a code.
_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    500: "internal_error",
}
_MISSING_PARAM = re.compile(r"^Missing required (?P<src>\w+) parameter (?P<name>'[^']*')")
_MAX_ECHO = 200  # characters of a client-supplied path echoed back in a detail


class ErrorBody(msgspec.Struct, frozen=True):
    """The body of every error response."""

    code: str
    detail: str


class ApiError(Exception):
    """Raise from a handler to answer `status` with `{"code": code, "detail": detail}`."""

    def __init__(
        self, status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})


def code_for_status(status: int) -> str:
    """A stable snake_case code for an HTTP status (`429` -> `too_many_requests`)."""
    if status in _CODES:
        return _CODES[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "client_error" if status < 500 else "server_error"
    return re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")


def error_body(code: str, detail: str) -> bytes:
    """The JSON bytes of an error, for code outside Litestar (raw ASGI middleware)."""
    return msgspec.json.encode(ErrorBody(code=code, detail=detail))


def error_response(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
) -> Response[ErrorBody]:
    return Response(
        ErrorBody(code=code, detail=detail),
        status_code=status,
        headers=dict(headers or {}),
        media_type="application/json",
    )


def _on_api_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.detail, exc.headers)


def _on_http_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 500:
        return _on_unexpected(request, exc)
    headers = dict(exc.headers or {})
    if isinstance(exc, ValidationException):
        return _on_validation(exc, headers)
    path = _echo(request.url.path)
    if status == 404:
        detail = f"no such endpoint: {request.method} {path}"
    elif status == 405:
        allowed = headers.get("allow") or headers.get("Allow") or ""
        detail = f"method {request.method} is not allowed on {path}"
        detail += f"; allowed: {allowed}" if allowed else ""
    elif status == 413:
        detail = "request body is too large"
    else:
        detail = exc.detail or HTTPStatus(status).phrase
    return error_response(status, code_for_status(status), detail, headers)


def _on_validation(exc: ValidationException, headers: dict[str, str]) -> Response[ErrorBody]:
    """Name the offending parameter(s); Litestar's own detail repeats the whole URL."""
    problems = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, Mapping) and item.get("key"):
            source = getattr(item.get("source"), "value", item.get("source")) or "request"
            message = str(item.get("message") or "invalid")
            message = message[:1].lower() + message[1:]
            problems.append(f"{source} parameter {item['key']!r}: {message}")
    if problems:
        return error_response(400, "invalid_parameter", "; ".join(problems), headers)
    missing = _MISSING_PARAM.match(exc.detail or "")
    if missing:
        detail = f"missing required {missing['src']} parameter {missing['name']}"
        return error_response(400, "invalid_parameter", detail, headers)
    return error_response(400, "bad_request", exc.detail or "bad request", headers)


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    """Log the full traceback server-side; the client gets a generic, safe message."""
    request_id = request.scope.get("state", {}).get("request_id")
    trace.get_current_span().record_exception(exc)
    log.error(
        "unhandled error in %s %s",
        request.method,
        _echo(request.url.path),
        exc_info=exc,
        extra={"request_id": request_id},
    )
    detail = "internal server error"
    if request_id:
        detail += f" (request id {request_id})"
    return error_response(500, "internal_error", detail)


def _echo(text: str) -> str:
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "..."


def exception_handlers() -> ExceptionHandlersMap:
    """The app-wide mapping; Litestar picks the most specific class for each exception."""
    return {
        ApiError: _on_api_error,
        HTTPException: _on_http_exception,
        Exception: _on_unexpected,
    }
