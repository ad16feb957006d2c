"""The Litestar application: operational routes, JSON errors, offline OpenAPI, telemetry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from litestar import Litestar, Response, Router, get
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.types import ControllerRouterHandler
from opentelemetry import trace

from k2d import __version__
from k2d.api._access import AccessControl
from k2d.api._admin import admin_router
from k2d.api._asyncapi import asyncapi_document
from k2d.api._contract import ContractJsonRender
from k2d.api._errors import error_response, exception_handlers
from k2d.api._middleware import RequestMiddleware
from k2d.api._ops import OPS_HANDLERS, V1_OPS_HANDLERS
from k2d.api._query_routes import query_router
from k2d.api._state import ApiState
from k2d.api._stream import stream_handlers
from k2d.api._ui import UI_HANDLERS, browser_keys

__all__ = ["create_app"]

SCHEMA_PATH = "/schema"


def create_app(
    state: ApiState, *, route_handlers: Sequence[ControllerRouterHandler] = ()
) -> Litestar:
    """Build the app: the open ops routes (/health, /ready, /metrics, /schema), the /v1
    routes (queries served by `state.query_pool`, stats, traces, admin) behind one
    AccessControl (keys, rate limits, CORS), and `route_handlers` (more endpoints sharing
    its error mapping, telemetry and limits). Handlers get the state as
    `api: NamedDependency[ApiState]`."""

    def provide_api() -> ApiState:
        return state

    # One AccessControl for every /v1 route: one rate-limit bucket per client across them
    # (the stream's handshake is checked by the same instance).
    access = AccessControl(state.config)
    streams = stream_handlers(state, access) if state.stream.enabled else []
    v1 = Router(
        "/v1",
        route_handlers=[query_router(), *V1_OPS_HANDLERS, admin_router(state), *streams],
        middleware=[access],
    )
    app = Litestar(
        route_handlers=[*OPS_HANDLERS, v1, *UI_HANDLERS, *route_handlers],
        # The live page (k2d/api/_ui.py): its stream handshake carries the key as a subprotocol.
        middleware=[browser_keys],
        dependencies={"api": Provide(provide_api, use_cache=True, sync_to_thread=False)},
        exception_handlers=exception_handlers(),
        openapi_config=_openapi_config(state),
        request_max_body_size=state.config.max_body_bytes,
        # Logging belongs to k2d.telemetry.logs; Litestar's default would reconfigure the root.
        logging_config=None,
        debug=False,
    )
    tracer = state.tracing.tracer if state.tracing is not None else trace.NoOpTracer()
    # Wrap Litestar's exception handling (as its own OpenTelemetry plugin does), so requests
    # that match no route are traced and counted too.
    app.asgi_handler = RequestMiddleware(
        app.asgi_handler,
        tracer=tracer,
        requests=state.metrics.http_requests,
        max_body_bytes=state.config.max_body_bytes,
    )
    return app


def _openapi_config(state: ApiState) -> OpenAPIConfig:
    """JSON only at /schema and /schema/openapi.json (the UIs load JavaScript from a CDN),
    with the constraints the server enforces written in (k2d/api/_contract.py)."""
    router = Router(
        SCHEMA_PATH,
        route_handlers=[_asyncapi(state)],
        include_in_schema=False,
        after_request=_json_not_found,
    )
    return OpenAPIConfig(
        title="k2d",
        version=__version__,
        description="Market data captured into Apache Iceberg: historical, recent and live.",
        render_plugins=[ContractJsonRender(state)],
        openapi_router=router,
    )


def _asyncapi(state: ApiState) -> Any:
    """/schema/asyncapi.json: the stream protocol (k2d/api/_asyncapi.py)."""
    keys = bool(state.config.api_keys or state.config.admin_api_keys)
    body = msgspec.json.encode(asyncapi_document(state.stream, keys=keys))

    @get("/asyncapi.json", media_type="application/json", sync_to_thread=False)
    def asyncapi() -> Response[bytes]:
        return Response(body, media_type="application/json")

    return asyncapi


async def _json_not_found(response: Response[object]) -> Response[object]:
    """Litestar answers unknown /schema/* paths with an HTML page; keep errors JSON."""
    if response.status_code == 404:
        return error_response(404, "not_found", "no such schema document")  # type: ignore[return-value]
    return response
