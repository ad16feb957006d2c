"""Query spans end to end: a real uvicorn server on 127.0.0.1, the QueryPool with its DuckDB
workers and a real Iceberg table, tracing into a trace store in tmp_path. A request that
carries a W3C traceparent is read back through /v1/traces: its server span continues the
caller's trace, and the query.execute span made in the pool's worker is its child, with the
database attributes and never the bound values."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
from prometheus_client.parser import text_string_to_metric_families

from actors.query_pool import QueryPool
from k2d.api import ApiState, create_app, serve
from k2d.config import ApiConfig, QueryConfig, StorageConfig, TelemetryConfig
from k2d.messages import Committed
from k2d.model import now_us
from k2d.runtime import Registry
from k2d.storage import TRADES, Warehouse, trades_to_arrow
from k2d.telemetry.metrics import Metrics
from k2d.telemetry.tracing import Tracing, setup_tracing
from tests.integration.test_query_api import T0, S, btc

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@dataclass
class Traced:
    client: httpx.AsyncClient
    tracing: Tracing

    async def spans(self) -> list[dict[str, Any]]:
        r = await self.client.get("/v1/traces?limit=2048")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        assert body["meta"]["source"] == "store"
        spans: list[dict[str, Any]] = body["data"]
        return spans


@asynccontextmanager
async def traced(
    tmp_path: Path, telemetry: TelemetryConfig, query: QueryConfig | None = None
) -> AsyncIterator[Traced]:
    """The query API with 300 BTCUSDT trades committed, wired for tracing as app.py does."""
    storage = StorageConfig(data_dir=str(tmp_path / "data"))
    wh = await anyio.to_thread.run_sync(Warehouse, storage)
    await anyio.to_thread.run_sync(wh.ensure_tables)
    registry = Registry()
    metrics = Metrics(registry)
    tracing = setup_tracing(telemetry, store_dir=telemetry.trace_path(storage), metrics=metrics)
    pool = QueryPool(wh, query or QueryConfig(timeout=10.0), metrics, tracing.tracer)
    api_cfg = ApiConfig(port=0, rate_limit=0)
    state = ApiState(
        registry=registry,
        metrics=metrics,
        tracing=tracing,
        stats=_no_stats,
        config=api_cfg,
        query_pool=pool,
    )
    server = serve(create_app(state), api_cfg)
    send, recv = anyio.create_memory_object_stream[Committed](4)
    await pool.on_start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, recv, None)
            await tg.start(server.run)
            result = await anyio.to_thread.run_sync(
                wh.append, TRADES, trades_to_arrow(btc(range(1, 301))), {}
            )
            await send.send(
                Committed(
                    table=TRADES,
                    snapshot_id=result.snapshot_id,
                    files=result.files,
                    batch_ids=(),
                    rows=result.rows,
                    committed_at=now_us(),
                )
            )
            await pool.catch_up()
            async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
                try:
                    yield Traced(client, tracing)
                finally:
                    await server.stop()
                    send.close()
    finally:
        tracing.shutdown()
        wh.close()


async def _no_stats() -> dict[str, Any]:
    return {}


async def test_query_span_is_a_child_of_the_request_that_continues_the_callers_trace(
    tmp_path: Path,
) -> None:
    async with traced(tmp_path, TelemetryConfig()) as s:
        r = await s.client.get(
            f"/v1/trades?symbol=BTCUSDT&start={T0 + 10 * S}&end={T0 + 40 * S}&limit=20",
            headers={"traceparent": TRACEPARENT},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        spans = await s.spans()
        metrics_text = (await s.client.get("/metrics")).text

    assert len(body["data"]) == 20
    [request] = [x for x in spans if x["name"] == "http GET /v1/trades"]
    assert (request["trace_id"], request["parent"], request["kind"]) == (
        TRACE_ID,
        PARENT_ID,
        "server",
    )
    [query] = [x for x in spans if x["name"] == "query.execute"]
    assert query["trace_id"] == TRACE_ID
    assert query["parent"] == request["span_id"]
    assert query["kind"] == "client"
    assert request["start_ns"] <= query["start_ns"]
    attrs = query["attributes"]
    assert attrs["db.system"] == "duckdb"
    assert attrs["db.system.name"] == "duckdb"
    assert attrs["db.operation.name"] == "SELECT"
    assert attrs["db.collection.name"] == "trades"
    assert attrs["db.query.summary"] == "SELECT trades"
    assert attrs["db.response.returned_rows"] == 20
    assert (attrs["k2d.endpoint"], attrs["k2d.format"]) == ("trades", "json")
    assert attrs["k2d.snapshot_id"] == body["meta"]["snapshot_id"]
    assert attrs["k2d.outcome"] == "ok"
    # The statement as DuckDB ran it, placeholders and all; the values stay bound.
    text = attrs["db.query.text"]
    assert text.startswith("WITH q AS (SELECT ") and "?" in text
    assert "BTCUSDT" not in text
    assert str(T0 + 10 * S) not in text and ".parquet" not in text
    # The store's queue is counted from the start: a dashboard finds the series at 0.
    dropped = {
        (sample.labels["exporter"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(metrics_text)
        if family.name == "k2d_spans_dropped"
        for sample in family.samples
        if sample.name == "k2d_spans_dropped_total"
    }
    assert dropped == {("store", "queue_full"): 0.0, ("store", "export_failed"): 0.0}


async def test_failed_queries_are_kept_when_the_ratio_keeps_nothing(tmp_path: Path) -> None:
    # Every query misses its deadline before it starts: 504, and an error on its span.
    async with traced(tmp_path, TelemetryConfig(sample_ratio=0.0), QueryConfig(timeout=1e-6)) as s:
        assert (await s.client.get("/health")).status_code == 200
        r = await s.client.get(
            f"/v1/trades?symbol=BTCUSDT&start={T0}&end={T0 + 400 * S}",
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"},  # caller sampled it out
        )
        assert r.status_code == 504, r.text
        spans = await s.spans()

    names = {x["name"] for x in spans}
    assert "http GET /health" not in names  # sampled out, and it did not fail
    [request] = [x for x in spans if x["name"] == "http GET /v1/trades"]
    [query] = [x for x in spans if x["name"] == "query.execute"]
    assert request["status"]["code"] == "error"
    assert query["status"] == {
        "code": "error",
        "description": "the query waited past its time limit",
    }
    assert query["attributes"]["error.type"] == "query_timeout"
    assert query["attributes"]["k2d.outcome"] == "timeout"
    assert (query["trace_id"], query["parent"]) == (TRACE_ID, request["span_id"])
