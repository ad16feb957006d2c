"""Operational endpoints: liveness, readiness and Prometheus metrics (open to anyone), and
warehouse stats and recent spans (under /v1, behind the API keys and rate limits)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Response, get
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import Parameter
from prometheus_client import generate_latest

from k2d.api._access import access_responses
from k2d.api._errors import ApiError, ErrorBody
from k2d.api._state import ApiState, Readiness
from k2d.query import QueryError, parse_integer

__all__ = ["OPS_HANDLERS", "V1_OPS_HANDLERS"]

# Litestar appends "; charset=utf-8" to text/* media types.
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4"
_DEFAULT_TRACES = 100


class HealthBody(msgspec.Struct, frozen=True):
    status: str


class ReadyBody(msgspec.Struct, frozen=True):
    status: Readiness
    actors: dict[str, str]
    restarts: dict[str, int]
    # Why each degraded actor is degraded (disk full, venue ban, commits failing, ...).
    degraded: dict[str, str] = msgspec.field(default_factory=dict)


class Meta(msgspec.Struct, frozen=True):
    generated_at: str


class StatsBody(msgspec.Struct, frozen=True):
    data: dict[str, Any]
    meta: Meta


class TracesMeta(msgspec.Struct, frozen=True):
    generated_at: str
    count: int
    limit: int
    # The most spans one answer holds (telemetry.span_ring_size).
    ring_size: int
    # "store": the trace store on disk (this run's spans and earlier runs'); "memory": the
    # in-memory ring of this process (the store is off).
    source: str


class TracesBody(msgspec.Struct, frozen=True):
    data: list[dict[str, Any]]
    meta: TracesMeta


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@get("/health", tags=["ops"], sync_to_thread=False)
def health() -> HealthBody:
    """Liveness: the process answers."""
    return HealthBody(status="ok")


@get(
    "/ready",
    tags=["ops"],
    sync_to_thread=False,
    responses={503: ResponseSpec(data_container=ReadyBody, description="Not ready")},
)
def ready(api: NamedDependency[ApiState]) -> Response[ReadyBody]:
    """Readiness: 200 once marked ready with every expected actor running or degraded."""
    status = api.readiness()
    body = ReadyBody(
        status=status,
        actors={name: str(state) for name, state in sorted(api.registry.states.items())},
        restarts=dict(sorted(api.registry.restarts.items())),
        degraded=dict(sorted(api.registry.reasons.items())),
    )
    return Response(body, status_code=200 if status == "ready" else 503)


@get("/metrics", tags=["ops"], sync_to_thread=False, media_type=METRICS_MEDIA_TYPE)
def metrics(api: NamedDependency[ApiState]) -> Response[bytes]:
    """Prometheus text exposition (format 0.0.4)."""
    return Response(generate_latest(api.metrics.registry), media_type=METRICS_MEDIA_TYPE)


@get("/stats", tags=["ops"], responses=access_responses())
async def stats(api: NamedDependency[ApiState]) -> StatsBody:
    """Warehouse statistics: tables, rows, snapshots, gaps."""
    return StatsBody(data=await api.stats(), meta=Meta(generated_at=utc_now_iso()))


@get(
    "/traces",
    tags=["ops"],
    # Reads the trace store's files: in a worker thread, off the event loop.
    sync_to_thread=True,
    responses={
        400: ResponseSpec(
            data_container=ErrorBody,
            description="Invalid limit",
            generate_examples=False,
        ),
        **access_responses(),
        503: ResponseSpec(
            data_container=ErrorBody,
            description="Tracing is not set up in this process",
            generate_examples=False,
        ),
    },
)
def traces(
    api: NamedDependency[ApiState],
    limit: Annotated[
        str | None,
        Parameter(
            description="Spans to return, newest first (default 100, at most "
            "telemetry.span_ring_size)",
        ),
    ] = None,
) -> TracesBody:
    """The spans that ended last, newest first: from the trace store, which keeps earlier
    runs' spans too (or the in-memory ring when telemetry.trace_store is off)."""
    try:
        asked = parse_integer(limit, "limit")
    except QueryError as exc:
        raise ApiError(exc.status, exc.code, exc.detail) from None
    if api.tracing is None:
        raise ApiError(503, "tracing_disabled", "tracing is not set up in this process")
    ring = api.tracing.ring_size
    n = min(_DEFAULT_TRACES, ring) if asked is None else asked
    if not 1 <= n <= ring:
        raise ApiError(
            400,
            "invalid_parameter",
            f"query parameter 'limit' must be between 1 and {ring}, got {n}",
        )
    spans = api.tracing.recent_spans(n)
    meta = TracesMeta(
        generated_at=utc_now_iso(),
        count=len(spans),
        limit=n,
        ring_size=ring,
        source="memory" if api.tracing.store is None else "store",
    )
    return TracesBody(data=spans, meta=meta)


OPS_HANDLERS = (health, ready, metrics)
# Mounted under /v1.
V1_OPS_HANDLERS = (stats, traces)
