"""Admin routes: maintenance on demand, for admin API keys only (api.admin_api_keys)."""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any

from litestar import Router, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import Parameter

from k2d.api._access import ADMIN_RESPONSES, access_responses, admin_guard
from k2d.api._errors import ApiError, ErrorBody
from k2d.api._state import ApiState
from k2d.storage import TABLE_NAMES

__all__ = ["admin_router"]

_DAY = re.compile("[0-9]{4}-[0-9]{2}-[0-9]{2}")


@post(
    "/compact",
    status_code=200,
    summary="Compact, expire snapshots and apply retention now",
    description=(
        "Runs a maintenance round (see `k2d compact`) and returns its report. `before` admits "
        "partitions before that day, today's included. Needs an admin API key "
        "(api.admin_api_keys): another valid key is 403 `admin_required`, and with no admin "
        "keys configured the route is off (403 `admin_disabled`)."
    ),
    responses={
        400: ResponseSpec(
            data_container=ErrorBody,
            description="Invalid parameters",
            examples=[
                Example(
                    id="invalid_parameter",
                    summary="invalid_parameter",
                    value={"code": "invalid_parameter", "detail": "query parameter 'before': ..."},
                )
            ],
            generate_examples=False,
        ),
        **access_responses(),
        **ADMIN_RESPONSES,
        503: ResponseSpec(
            data_container=ErrorBody,
            description="The maintainer is not running in this process",
            generate_examples=False,
        ),
    },
)
async def compact(
    api: NamedDependency[ApiState],
    table: Annotated[
        str | None,
        Parameter(
            description="one table; all when omitted", schema_extra={"enum": list(TABLE_NAMES)}
        ),
    ] = None,
    before: Annotated[
        str | None, Parameter(description="compact days before this day, YYYY-MM-DD")
    ] = None,
) -> dict[str, Any]:
    day = None
    if before is not None:
        try:
            if not _DAY.fullmatch(before):
                raise ValueError
            day = date.fromisoformat(before)
        except ValueError:
            raise ApiError(
                400,
                "invalid_parameter",
                f"query parameter 'before': expected a date YYYY-MM-DD, got {before[:64]!r}",
            ) from None
    if api.run_maintenance is None:
        raise ApiError(503, "maintenance_unavailable", "the maintainer is not running")
    if table is not None and table not in TABLE_NAMES:
        raise ApiError(400, "unknown_table", f"no table {table!r}")
    return await api.run_maintenance(table, day)


def admin_router(state: ApiState) -> Router:
    """/admin, to be mounted under the /v1 router (whose AccessControl admits the key)."""
    return Router(
        "/admin", route_handlers=[compact], guards=[admin_guard(state.config)], tags=["admin"]
    )
