"""The edges of the HTTP API (issue 10): keys and rate limits on every /v1 route, admin keys,
refused keys counted, forged cursors, odd time zones, time travel before the first snapshot,
and an OpenAPI document that states what the server enforces. A real server on 127.0.0.1
over real Iceberg tables (the stack of test_query_api)."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec

from k2d.config import ApiConfig, QueryConfig, TelemetryConfig
from k2d.telemetry.tracing import setup_tracing
from tests.integration.test_query_api import DAY, Stack, W, get_json, running

READER, ADMIN = "reader-key", "admin-key"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keyed(**kw: Any) -> ApiConfig:
    return ApiConfig(
        port=0,
        api_keys=(digest(READER),),
        admin_api_keys=(digest(ADMIN),),
        **{"rate_limit": 0, **kw},
    )


def with_tracing(s: Stack) -> Stack:
    s.state.tracing = setup_tracing(TelemetryConfig(span_ring_size=32))
    return s


V1_GETS = (
    "/v1/stats",
    "/v1/traces",
    "/v1/symbols",
    "/v1/snapshots",
    "/v1/gaps",
    f"/v1/trades?symbol=BTCUSDT&{W}",
    f"/v1/ohlcv/1m?symbol=BTCUSDT&{W}",
    "/v1/summary/BINANCE/BTCUSDT/2024-03-01",
    f"/v1/completeness?symbol=BTCUSDT&{DAY}",
)


async def test_every_v1_route_needs_a_key_and_the_ops_routes_stay_open(tmp_path: Path) -> None:
    async with running(tmp_path, api=keyed()) as s:
        with_tracing(s)
        anonymous = {url: await s.client.get(url) for url in V1_GETS}
        reader = {url: await s.client.get(url, headers={"X-API-Key": READER}) for url in V1_GETS}
        post = await s.client.post("/v1/trades/query", json={"symbols": ["BTCUSDT"]})
        open_routes = {
            url: await s.client.get(url) for url in ("/health", "/ready", "/metrics", "/schema")
        }
    for url, r in anonymous.items():
        assert (r.status_code, r.json()["code"]) == (401, "unauthorized"), url
        assert r.headers["www-authenticate"] == 'ApiKey header="X-API-Key"'
    for url, r in reader.items():
        assert r.status_code == 200, (url, r.text)
    assert post.status_code == 401
    for url, r in open_routes.items():
        assert r.status_code in (200, 503), url  # /ready: 503 until the daemon marks it ready
        assert r.status_code != 401


async def test_one_rate_limit_per_client_across_every_v1_route(tmp_path: Path) -> None:
    async with running(tmp_path, api=keyed(rate_limit=0.001, rate_burst=2)) as s:
        with_tracing(s)
        key = {"X-API-Key": READER}
        stats = await s.client.get("/v1/stats", headers=key)
        trades = await s.client.get(f"/v1/trades?symbol=BTCUSDT&{W}", headers=key)
        traces = await s.client.get("/v1/traces", headers=key)
        health = await s.client.get("/health")
    assert [stats.status_code, trades.status_code] == [200, 200]
    assert (traces.status_code, traces.json()["code"]) == (429, "rate_limited")
    assert int(traces.headers["retry-after"]) >= 1
    assert health.status_code == 200


async def test_refused_keys_count_against_the_address(tmp_path: Path) -> None:
    api = keyed(rate_limit=0.001, rate_burst=3, trusted_proxies=("127.0.0.1",))
    async with running(tmp_path, api=api) as s:
        guesses = [
            await s.client.get("/v1/symbols", headers={"X-API-Key": f"guess-{i}"}) for i in range(5)
        ]
        # The key's own bucket is untouched, and so is another address's.
        valid = await s.client.get("/v1/symbols", headers={"X-API-Key": READER})
        elsewhere = await s.client.get("/v1/symbols", headers={"X-Forwarded-For": "10.0.0.9"})
    assert [r.status_code for r in guesses] == [401, 401, 401, 429, 429]
    assert guesses[3].json()["code"] == "rate_limited"
    assert int(guesses[3].headers["retry-after"]) >= 1
    assert valid.status_code == 200
    assert (elsewhere.status_code, elsewhere.json()["code"]) == (401, "unauthorized")


async def test_admin_routes_need_an_admin_key_and_say_so_in_the_openapi(tmp_path: Path) -> None:
    async with running(tmp_path, api=keyed()) as s:
        reader = await s.client.post("/v1/admin/compact", headers={"X-API-Key": READER})
        doc = await get_json(s.client, "/schema/openapi.json")
    assert (reader.status_code, reader.json()["code"]) == (403, "admin_required")
    op = doc["paths"]["/v1/admin/compact"]["post"]
    forbidden = op["responses"]["403"]["content"]["application/json"]
    assert forbidden["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert {e["value"]["code"] for e in forbidden["examples"].values()} == {
        "admin_disabled",
        "admin_required",
    }
    assert op["security"] == [{"ApiKey": []}]
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key (api.api_keys, or api.admin_api_keys for /v1/admin)",
    }
    for path in ("/v1/stats", "/v1/traces", "/v1/trades"):
        assert {"401", "429"} <= set(doc["paths"][path]["get"]["responses"]), path
    for path in ("/health", "/ready", "/metrics"):
        assert "security" not in doc["paths"][path]["get"], path


async def test_without_keys_the_openapi_asks_for_none(tmp_path: Path) -> None:
    async with running(tmp_path, seed=False) as s:
        doc = await get_json(s.client, "/schema/openapi.json")
    assert "securitySchemes" not in doc.get("components", {})
    assert all("security" not in op for item in doc["paths"].values() for op in item.values())


def forge(cursor: str, **changes: Any) -> str:
    """The same cursor with some of its fields replaced (the fingerprint stays right)."""
    raw = msgspec.json.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    version, fp, snapshots, key = raw
    snapshots = changes.get("snapshots", snapshots)
    key = [changes.get(f"key{i}", v) for i, v in enumerate(key)]
    text = msgspec.json.encode([version, fp, snapshots, key])
    return base64.urlsafe_b64encode(text).rstrip(b"=").decode()


async def test_a_forged_cursor_is_400_whatever_it_carries(tmp_path: Path) -> None:
    url = f"/v1/trades?symbol=BTCUSDT&{W}&limit=5"
    async with running(tmp_path) as s:
        page = await get_json(s.client, url)
        cursor = page["meta"]["next_cursor"]
        table, pinned = "trades", page["meta"]["snapshot_id"]
        forged = [
            forge(cursor, key0=2**63),  # reached make_timestamptz: a 500 before
            forge(cursor, key0=2**64),
            forge(cursor, key0=-(2**63)),
            forge(cursor, key2=2**70),
            forge(cursor, key1=7),
            forge(cursor, snapshots={table: 42}),  # pinned snapshot that is not there
            forge(cursor, snapshots={table: 2**64}),
        ]
        answers = [await s.client.get(f"{url}&cursor={c}") for c in forged]
        genuine = await s.client.get(f"{url}&cursor={cursor}")
        empty = await s.client.get(f"{url}&cursor=")
    for r in answers:
        assert (r.status_code, r.json()["code"]) == (400, "invalid_cursor"), r.text
    assert genuine.status_code == 200 and pinned is not None
    assert (empty.status_code, empty.json()["code"]) == (400, "invalid_cursor")


ZONES = {
    "Factory": 400,  # "no zone set": not a clock to align bars to (it answered 200 as UTC)
    "localtime": 400,  # the host's zone, which DuckDB has no name for (it answered 500)
    "posixrules": 400,
    "Mars/Olympus": 400,
    "EST5EDT": 200,
    "Etc/GMT+5": 200,
    "Australia/Sydney": 200,
}


async def test_odd_time_zones_are_400_and_left_out_of_the_openapi(tmp_path: Path) -> None:
    async with running(tmp_path) as s:
        answers = {
            tz: await s.client.get(f"/v1/ohlcv/1h?symbol=BTCUSDT&{W}&tz={quote(tz, safe='')}")
            for tz in ZONES
        }
        doc = await get_json(s.client, "/schema/openapi.json")
    zones = param(doc, "/v1/ohlcv/{interval}", "tz")["schema"]["enum"]
    for tz, status in ZONES.items():
        r = answers[tz]
        assert r.status_code == status, (tz, r.text)
        if status == 400:
            assert r.json()["code"] == "unknown_timezone"
        assert (tz in zones) == (status == 200), tz


async def test_as_of_before_the_first_snapshot_reads_an_empty_table(tmp_path: Path) -> None:
    before = "1990-01-01T00:00:00Z"
    async with running(tmp_path) as s:
        trades = await get_json(s.client, f"/v1/trades?symbol=BTCUSDT&{W}&as_of={before}")
        bars = await get_json(s.client, f"/v1/ohlcv/1m?symbol=BTCUSDT&{W}&as_of={before}")
        day = await get_json(s.client, f"/v1/summary/BINANCE/BTCUSDT/2024-03-01?as_of={before}")
        comp = await get_json(s.client, f"/v1/completeness?symbol=BTCUSDT&{DAY}&as_of={before}")
    assert trades["data"] == [] and trades["meta"]["snapshot_id"] is None
    assert bars["data"] == []
    assert day["data"][0]["trade_count"] == 0
    assert sum(b["stored"] for b in comp["data"]) == 0


async def test_names_of_nothing_stored_are_404_and_documented(tmp_path: Path) -> None:
    async with running(tmp_path) as s:
        symbol = await s.client.get(f"/v1/trades?symbol=DOGEUSDT&{W}")
        exchange = await s.client.get(f"/v1/trades?symbol=BTCUSDT&exchange=KRAKEN&{W}")
        snapshot = await s.client.get(f"/v1/trades?symbol=BTCUSDT&{W}&snapshot_id=42")
        calendar = await s.client.get("/v1/summary/NYSE/IBM/2024-03-01")
        malformed = await s.client.get(f"/v1/trades?symbol=DOGE%20USDT&{W}")
        doc = await get_json(s.client, "/schema/openapi.json")
    assert (symbol.status_code, symbol.json()["code"]) == (404, "unknown_symbol")
    assert (exchange.status_code, exchange.json()["code"]) == (404, "unknown_exchange")
    assert (snapshot.status_code, snapshot.json()["code"]) == (404, "unknown_snapshot")
    assert (calendar.status_code, calendar.json()["code"]) == (404, "unknown_exchange")
    assert (malformed.status_code, malformed.json()["code"]) == (400, "invalid_symbol")
    examples = doc["paths"]["/v1/trades"]["get"]["responses"]["404"]["content"]["application/json"]
    assert {e["value"]["code"] for e in examples["examples"].values()} == {
        "unknown_symbol",
        "unknown_exchange",
        "unknown_snapshot",
    }


def param(doc: dict[str, Any], path: str, name: str, method: str = "get") -> dict[str, Any]:
    return next(p for p in doc["paths"][path][method]["parameters"] if p["name"] == name)


async def test_the_openapi_document_refuses_what_the_server_refuses(tmp_path: Path) -> None:
    """The findings of schemathesis against a demo: each request is refused by the server,
    and now by the document too."""
    async with running(tmp_path) as s:
        with_tracing(s)
        doc = await get_json(s.client, "/schema/openapi.json")
        refused = {
            ("/v1/trades", "cursor", ""): await s.client.get("/v1/trades?cursor="),
            ("/v1/trades", "start", ""): await s.client.get("/v1/trades?start="),
            ("/v1/trades", "limit", 0): await s.client.get("/v1/trades?limit=0"),
            ("/v1/traces", "limit", 0): await s.client.get("/v1/traces?limit=0"),
            ("/v1/traces", "limit", 33): await s.client.get("/v1/traces?limit=33"),
            ("/v1/trades", "format", "CSV"): await s.client.get("/v1/trades?format=CSV"),
            ("/v1/gaps", "status", "closed"): await s.client.get("/v1/gaps?status=closed"),
        }
    for (path, name, value), r in refused.items():
        assert r.status_code == 400, (path, name, r.text)
        schema = param(doc, path, name)["schema"]
        schema = schema.get("items", schema) if schema.get("type") == "array" else schema
        if "pattern" in schema:
            assert not re.search(schema["pattern"], str(value)), (path, name)
        elif "enum" in schema:
            assert value not in schema["enum"], (path, name)
        else:
            assert not schema["minimum"] <= value <= schema["maximum"], (path, name)
    assert param(doc, "/v1/traces", "limit")["schema"]["maximum"] == 32  # the ring size


async def test_the_openapi_document_follows_the_config(tmp_path: Path) -> None:
    query = QueryConfig(max_rows=500, max_symbols=3, max_window_seconds=2 * 86_400)
    async with running(tmp_path, query=query, seed=False) as s:
        doc = await get_json(s.client, "/schema/openapi.json")
        too_long = await s.client.get("/v1/trades/recent?symbol=BTCUSDT&window=3d")
        too_many = await s.client.get("/v1/trades?limit=501")
    assert param(doc, "/v1/trades", "limit")["schema"]["maximum"] == 500
    assert param(doc, "/v1/trades", "symbol")["schema"]["maxItems"] == 3
    window = param(doc, "/v1/trades/recent", "window")["schema"]["pattern"]
    assert re.search(window, "2d") and re.search(window, "48h")
    assert not re.search(window, "3d") and not re.search(window, "49h")
    assert too_long.json()["code"] == "window_too_large"
    assert too_many.json()["code"] == "limit_too_large"
    recent_symbol = param(doc, "/v1/trades/recent", "symbol")
    assert recent_symbol["required"] is True
    body = doc["components"]["schemas"]["TradesQuery"]
    assert body["additionalProperties"] is False
    assert body["properties"]["symbols"]["maxItems"] == 3


async def test_rows_of_some_columns_match_the_documented_row(tmp_path: Path) -> None:
    async with running(tmp_path) as s:
        body = await get_json(s.client, f"/v1/trades?symbol=BTCUSDT&{W}&columns=price,symbol")
        doc = await get_json(s.client, "/schema/openapi.json")
    row = doc["components"]["schemas"]["TradeRow"]
    assert body["data"] and set(body["data"][0]) == {"price", "symbol"}
    assert set(row.get("required", [])) <= {"price", "symbol"}
    assert {"price", "symbol"} <= set(row["properties"])
