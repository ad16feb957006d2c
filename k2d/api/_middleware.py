"""The outermost ASGI layer: request id, server span, request counter, body size limit.

It wraps Litestar's exception handling, so 404s, 405s and 500s are traced and counted too.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, cast

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter

from k2d.api._errors import ApiError, error_body

__all__ = ["RequestMiddleware"]

REQUEST_ID_HEADER = "x-request-id"
_RID = REQUEST_ID_HEADER.encode()
# Metric label for requests that matched no route: raw paths would make the label unbounded.
UNMATCHED_ROUTE = "<unmatched>"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_PROPAGATOR = TraceContextTextMapPropagator()


class RequestMiddleware:
    """Per HTTP request: X-Request-ID, a server span (W3C traceparent as parent), a count in
    k2d_http_requests_total by route template and status, and the request body size limit."""

    def __init__(
        self, app: ASGIApp, *, tracer: trace.Tracer, requests: Counter, max_body_bytes: int
    ) -> None:
        self.app = app
        self.tracer = tracer
        self.requests = requests
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        request_id = headers.get(REQUEST_ID_HEADER, "")
        if not _VALID_REQUEST_ID.match(request_id):
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        method = cast(str, scope.get("method", "GET"))
        parent = _PROPAGATOR.extract(headers)
        span = self.tracer.start_span(
            f"http {method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=_request_attributes(scope, headers, method, request_id),
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                raw = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"
                ]
                raw.append((b"x-request-id", request_id.encode()))
                message = cast(Message, {**message, "headers": raw})
            await send(message)

        try:
            declared = _content_length(headers)
            if declared is not None and declared > self.max_body_bytes:
                await self._reject_too_large(send_wrapper)
            else:
                await self.app(scope, self._limited(receive), send_wrapper)
        except BaseException as exc:
            span.record_exception(exc)
            raise
        finally:
            route = cast(str | None, scope.get("path_template")) or UNMATCHED_ROUTE
            span.update_name(f"http {method} {route}")
            span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
            span.end()
            otel_context.detach(token)
            self.requests.labels(route=route, status=str(status)).inc()

    def _limited(self, receive: Receive) -> Receive:
        """Count body bytes as they arrive (chunked bodies declare no length)."""
        limit, seen = self.max_body_bytes, 0

        async def receive_wrapper() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, "body_too_large", _too_large_detail(limit))
            return message

        return receive_wrapper

    async def _reject_too_large(self, send: Send) -> None:
        """Answer before reading the body; close the connection as the body stays unread."""
        body = error_body("body_too_large", _too_large_detail(self.max_body_bytes))
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _request_attributes(
    scope: Scope, headers: dict[str, str], method: str, request_id: str
) -> dict[str, str | int]:
    """OpenTelemetry's HTTP server semantic conventions (http.route and the status code are
    added once the route is matched and the response starts)."""
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.path": scope["path"],
        "url.scheme": str(scope.get("scheme", "http")),
        "network.protocol.version": str(scope.get("http_version", "1.1")),
        "k2d.request_id": request_id,
    }
    server, client = scope.get("server"), scope.get("client")
    if server:
        attributes["server.address"] = str(server[0])
        if server[1] is not None:
            attributes["server.port"] = int(server[1])
    if client:
        attributes["client.address"] = str(client[0])
    agent = headers.get("user-agent")
    if agent:
        attributes["user_agent.original"] = agent[:256]
    return attributes


def _too_large_detail(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _content_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)
