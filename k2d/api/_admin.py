"""Admin routes: maintenance on demand. Only served when API keys are configured."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from litestar import Router, post
from litestar.di import NamedDependency
from litestar.params import Parameter

from k2d.api._access import AccessControl
from k2d.api._errors import ApiError
from k2d.api._state import ApiState

__all__ = ["admin_router"]


@post(
    "/compact",
    status_code=200,
    summary="Compact, expire snapshots and apply retention now",
    description=(
        "Runs a maintenance round (see `k2d compact`) and returns its report. `before` admits "
        "partitions before that day, today's included. Needs an API key (api.api_keys)."
    ),
)
async def compact(
    api: NamedDependency[ApiState],
    table: Annotated[str | None, Parameter(description="one table; all when omitted")] = None,
    before: Annotated[date | None, Parameter(description="compact days before this")] = None,
) -> dict[str, Any]:
    if not api.config.api_keys:
        raise ApiError(403, "admin_disabled", "admin routes need api.api_keys to be set")
    if api.run_maintenance is None:
        raise ApiError(503, "maintenance_unavailable", "the maintainer is not running")
    if table is not None and table not in ("trades", "quotes", "sequence_events", "dead_letters"):
        raise ApiError(400, "unknown_table", f"no table {table!r}")
    return await api.run_maintenance(table, before)


def admin_router(state: ApiState) -> Router:
    return Router(
        "/v1/admin",
        route_handlers=[compact],
        middleware=[AccessControl(state.config)],
        tags=["admin"],
    )
