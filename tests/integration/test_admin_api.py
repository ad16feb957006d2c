"""POST /v1/admin/compact: maintenance on demand, only with an admin API key."""

from __future__ import annotations

import hashlib
from datetime import date
from pathlib import Path
from typing import Any

from actors.maintenance import Maintainer
from k2d.config import ApiConfig, MaintenanceConfig
from tests.integration.test_query_api import running

ADMIN = "admin-secret"
READER = "reader-secret"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def test_admin_compact_needs_an_admin_key_and_returns_a_report(tmp_path: Path) -> None:
    async with running(tmp_path / "open") as s:
        refused = await s.client.post("/v1/admin/compact")
    assert (refused.status_code, refused.json()["code"]) == (403, "admin_disabled")

    keyed = ApiConfig(
        port=0, rate_limit=0, api_keys=(digest(READER),), admin_api_keys=(digest(ADMIN),)
    )
    async with running(tmp_path / "keyed", api=keyed) as s:
        maintainer = Maintainer(s.wh, MaintenanceConfig(), s.metrics)

        async def run(table: str | None, before: date | None) -> dict[str, Any]:
            return (await maintainer.run_now(table=table, before=before)).as_dict()

        s.state.run_maintenance = run
        anonymous = await s.client.post("/v1/admin/compact")
        reader = await s.client.post("/v1/admin/compact", headers={"X-API-Key": READER})
        bad_table = await s.client.post(
            "/v1/admin/compact?table=nope", headers={"X-API-Key": ADMIN}
        )
        bad_day = await s.client.post(
            "/v1/admin/compact?before=2100-1-1", headers={"X-API-Key": ADMIN}
        )
        done = await s.client.post(
            "/v1/admin/compact?table=trades&before=2100-01-01", headers={"X-API-Key": ADMIN}
        )
        # An admin key is a key everywhere.
        query = await s.client.get("/v1/symbols", headers={"X-API-Key": ADMIN})
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "unauthorized")
    assert (reader.status_code, reader.json()["code"]) == (403, "admin_required")
    assert bad_table.status_code == 400 and bad_table.json()["code"] == "unknown_table"
    assert (bad_day.status_code, bad_day.json()["code"]) == (400, "invalid_parameter")
    assert done.status_code == 200, done.text
    report = done.json()
    assert report["errors"] == []
    assert {s["table"] for s in report["stats"]} == {"trades"}
    assert query.status_code == 200
