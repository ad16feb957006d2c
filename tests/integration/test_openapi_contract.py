"""The OpenAPI document says what the server enforces: schemathesis, with every check, run from
outside (its CLI, as a user would) against a real server on 127.0.0.1 with rows in its tables
and API keys on.

The document cannot state rules that tie parameters together (a window's start before its
end and within query.max_window_seconds, as_of or snapshot_id but not both, a cursor the
server issued); the operations describe them and answer 400 with a stable code. The
`map_case` hook below teaches them to schemathesis for the requests it means to be valid,
and nothing else: every other disagreement between the document and the server fails.
This module is the hook module too (SCHEMATHESIS_HOOKS names it).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from datetime import date
from pathlib import Path
from typing import Any

import anyio
import pytest
import schemathesis

from actors.maintenance import Maintainer
from k2d.config import ApiConfig, MaintenanceConfig, QueryConfig, TelemetryConfig
from k2d.query import MAX_US, MIN_EPOCH_US, QueryError, parse_time
from k2d.telemetry.tracing import setup_tracing
from tests.integration.test_query_api import running

ROOT = Path(__file__).resolve().parents[2]
KEY = "contract-admin-key"
_HOUR_US = 3_600_000_000
_MAX_WINDOW_US = int(QueryConfig().max_window_seconds * 1_000_000)


def _time(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a JSON integer may be written 1111.0
    try:
        return parse_time(str(value), "t")
    except QueryError:
        return None


def _epoch(us: int) -> str:
    """A time as the API reads it (integers below 10^14 are milliseconds)."""
    return str(us) if us >= MIN_EPOCH_US else str(us // 1_000)


def _keep_cross_parameter_rules(params: dict[str, Any]) -> None:
    """Make a request meant to be valid keep the rules no schema can state."""
    params.pop("cursor", None)  # only the server issues cursors
    if params.get("as_of") is not None and params.get("snapshot_id") is not None:
        params.pop("snapshot_id")
    start, end = _time(params.get("start")), _time(params.get("end"))
    if start is not None and (end is None or not 0 < end - start <= _MAX_WINDOW_US):
        # Without an end the window ends now; either way, an hour from the start.
        first = min(start, MAX_US - 1 - _HOUR_US)
        params["start"], params["end"] = _epoch(first), _epoch(first + _HOUR_US)
    elif start is None and end == 0:
        params["end"] = _epoch(_HOUR_US)  # the default start (an hour before) is clamped to 1970


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    if isinstance(case.query, dict):
        _keep_cross_parameter_rules(case.query)
    if isinstance(case.body, dict):
        _keep_cross_parameter_rules(case.body)
    return case


def _cli() -> str | None:
    return shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")


# Two schemathesis processes share the operations (one worker each: CPython 3.11 can fail
# ast.parse in concurrent threads, gh-106905, and hypothesis parses filters' source while it
# generates). The coverage phase sends every value of an enum, so the ~600 time zones of
# /v1/ohlcv make it the longest operation by far: it gets a process of its own.
_SHARES = ("^/v1/ohlcv/", "^/(?!v1/ohlcv/)")


async def _schemathesis(cli: str, url: str, share: str, cwd: Path) -> tuple[int, str]:
    await anyio.Path(cwd).mkdir()
    proc = await anyio.run_process(
        [
            cli,
            "run",
            f"{url}/schema/openapi.json",
            "--url",
            url,
            "--include-path-regex",
            share,
            "--checks",
            "all",
            "--header",
            f"X-API-Key: {KEY}",
            "--max-examples",
            "5",
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--request-timeout",
            "20",
            "--no-color",
        ],
        check=False,
        cwd=cwd,  # schemathesis keeps state in ./.schemathesis
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": __name__,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )
    return proc.returncode, proc.stdout.decode(errors="replace") + proc.stderr.decode(
        errors="replace"
    )


@pytest.mark.skipif(_cli() is None, reason="schemathesis is not installed")
async def test_the_server_does_what_its_openapi_document_says(tmp_path: Path) -> None:
    cli = _cli()
    assert cli is not None
    admin = hashlib.sha256(KEY.encode()).hexdigest()
    api = ApiConfig(port=0, rate_limit=0, admin_api_keys=(admin,))
    results: dict[str, tuple[int, str]] = {}
    async with running(tmp_path, api=api) as s:
        # /v1/traces reads the trace store on disk, as in the daemon.
        s.state.tracing = setup_tracing(
            TelemetryConfig(span_ring_size=64), store_dir=tmp_path / "traces"
        )
        maintainer = Maintainer(s.wh, MaintenanceConfig(), s.metrics)

        async def maintain(table: str | None, before: date | None) -> dict[str, Any]:
            return (await maintainer.run_now(table=table, before=before)).as_dict()

        s.state.run_maintenance = maintain
        s.state.mark_ready()

        async def run(i: int, share: str) -> None:
            results[share] = await _schemathesis(cli, s.server.url, share, tmp_path / f"st{i}")

        async with anyio.create_task_group() as tg:
            for i, share in enumerate(_SHARES):
                tg.start_soon(run, i, share)
    tested = 0
    for share, (code, out) in results.items():
        assert code == 0, f"{share}:\n{out[-8000:]}"
        m = re.search(r"Tested: (\d+)", out)
        assert m is not None, out[-3000:]
        tested += int(m.group(1))
    assert tested == 18, "every operation of the document is tested"
