"""POST /v1/admin/compact: maintenance on demand, only with an API key."""

from __future__ import annotations

import hashlib
from datetime import date
from pathlib import Path
from typing import Any

from actors.maintenance import Maintainer
from k2d.config import ApiConfig, MaintenanceConfig
from tests.integration.test_query_api import running

KEY = "admin-secret"


async def test_admin_compact_needs_keys_and_returns_a_report(tmp_path: Path) -> None:
    async with running(tmp_path / "open") as s:
        refused = await s.client.post("/v1/admin/compact")
    assert refused.status_code == 403
    assert refused.json()["code"] == "admin_disabled"

    keyed = ApiConfig(port=0, rate_limit=0, api_keys=(hashlib.sha256(KEY.encode()).hexdigest(),))
    async with running(tmp_path / "keyed", api=keyed) as s:
        maintainer = Maintainer(s.wh, MaintenanceConfig(), s.metrics)

        async def run(table: str | None, before: date | None) -> dict[str, Any]:
            return (await maintainer.run_now(table=table, before=before)).as_dict()

        s.state.run_maintenance = run
        anonymous = await s.client.post("/v1/admin/compact")
        bad_table = await s.client.post("/v1/admin/compact?table=nope", headers={"X-API-Key": KEY})
        done = await s.client.post(
            "/v1/admin/compact?table=trades&before=2100-01-01", headers={"X-API-Key": KEY}
        )
    assert anonymous.status_code == 401
    assert bad_table.status_code == 400 and bad_table.json()["code"] == "unknown_table"
    assert done.status_code == 200, done.text
    report = done.json()
    assert report["errors"] == []
    assert {s["table"] for s in report["stats"]} == {"trades"}
