"""The OpenAPI document states what the server enforces.

Litestar derives the document from the handlers: types, descriptions, examples, responses.
What the server checks beyond a type (the syntax of times, symbols and cursors, allow-lists,
limits from the config, which keys a route needs) is written in here, when the document is
rendered, from the same patterns and config that k2d.query and the access layer check with:
a request the document admits is one the server accepts, short of the rules that tie
parameters together (a window's start before its end and within query.max_window_seconds,
as_of or snapshot_id but not both, a cursor issued by the server), which each operation
describes and answers with a 400 and a stable code. tests/integration/test_openapi_contract.py
holds the server to it with schemathesis.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from litestar.openapi.plugins import JsonRenderPlugin

from k2d.api._access import SECURITY_SCHEME
from k2d.config import QueryConfig
from k2d.query import (
    BUCKETS,
    CURSOR_PATTERN,
    DATE_PATTERN,
    EXCHANGE_SYNTAX,
    GAP_KINDS,
    GAP_STATUSES,
    INTERVALS,
    MAX_EPOCH_MS,
    MAX_US,
    MIN_EPOCH_US,
    SYMBOL_SYNTAX,
    TABLE_COLUMNS,
    TIME_PATTERN,
    Format,
    duration_pattern,
    exchange_pattern,
    name_list_pattern,
    symbol_pattern,
    timezones,
)
from k2d.storage import QUOTES, TABLE_NAMES, TRADES

if TYPE_CHECKING:
    from litestar import Request

    from k2d.api._state import ApiState

__all__ = ["ContractJsonRender", "apply_contract"]

Schema = dict[str, Any]
_INT64: Schema = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
_TIME: Schema = {"type": "string", "pattern": TIME_PATTERN}
# The same times as integers, in a JSON body: epoch milliseconds or microseconds.
_EPOCH: Schema = {
    "anyOf": [
        {"type": "integer", "minimum": 0, "maximum": MAX_EPOCH_MS},
        {"type": "integer", "minimum": MIN_EPOCH_US, "maximum": MAX_US - 1},
    ]
}
# Operations whose symbol is required: one symbol at least, in a list or alone.
_NEEDS_SYMBOL = {
    "/v1/trades/recent",
    "/v1/quotes/recent",
    "/v1/ohlcv/{interval}",
    "/v1/completeness",
}
_COLUMNS_OF = {
    "/v1/trades": TRADES,
    "/v1/trades/recent": TRADES,
    "/v1/quotes": QUOTES,
    "/v1/quotes/recent": QUOTES,
}


def _enum(values: Any) -> Schema:
    return {"type": "string", "enum": list(values)}


def _listed(item: Schema, max_items: int | None = None) -> Schema:
    out: Schema = {"type": "array", "items": item}
    if max_items is not None:
        out["maxItems"] = max_items
    return out


def _parameter_schemas(
    q: QueryConfig, ring_size: int | None
) -> dict[str, Callable[[str], Schema | None]]:
    """Per parameter name, the schema of that parameter in an operation (by path)."""
    symbols = _listed({"type": "string", "pattern": symbol_pattern()}, q.max_symbols)
    needed = _listed({"type": "string", "pattern": symbol_pattern(required=True)}, q.max_symbols)
    needed["minItems"] = 1
    traces_limit: Schema = {"type": "integer", "minimum": 1}
    if ring_size is not None:
        traces_limit["maximum"] = ring_size

    def symbol(path: str) -> Schema:
        if path == "/v1/completeness":
            return {"type": "string", "pattern": symbol_pattern(required=True)}
        if path.startswith("/v1/summary/"):
            return {"type": "string", "pattern": f"^{SYMBOL_SYNTAX}$"}
        return needed if path in _NEEDS_SYMBOL else symbols

    def exchange(path: str) -> Schema:
        if path == "/v1/completeness":
            return {"type": "string", "pattern": exchange_pattern(listed=False)}
        if path.startswith("/v1/summary/"):
            return {"type": "string", "pattern": f"^{EXCHANGE_SYNTAX}$"}
        return _listed({"type": "string", "pattern": exchange_pattern()}, q.max_symbols)

    def columns(path: str) -> Schema | None:
        table = _COLUMNS_OF.get(path)
        if table is None:
            return None
        return _listed({"type": "string", "pattern": name_list_pattern(TABLE_COLUMNS[table])})

    def limit(path: str) -> Schema:
        if path == "/v1/traces":
            return traces_limit
        return {"type": "integer", "minimum": 1, "maximum": q.max_rows}

    return {
        "symbol": symbol,
        "exchange": exchange,
        "start": lambda _: _TIME,
        "end": lambda _: _TIME,
        "as_of": lambda _: _TIME,
        "limit": limit,
        "cursor": lambda _: {"type": "string", "pattern": CURSOR_PATTERN},
        "order": lambda _: _enum(("asc", "desc")),
        "columns": columns,
        "snapshot_id": lambda _: _INT64,
        "format": lambda _: _enum(f.value for f in Format),
        "tz": lambda _: _enum(timezones()),
        "interval": lambda _: _enum(INTERVALS),
        "bucket": lambda _: _enum(BUCKETS),
        "table": lambda _: _enum(TABLE_NAMES),
        "window": lambda _: {"type": "string", "pattern": duration_pattern(q.max_window_seconds)},
        "status": lambda _: _listed({"type": "string", "pattern": name_list_pattern(GAP_STATUSES)}),
        "kind": lambda _: _listed({"type": "string", "pattern": name_list_pattern(GAP_KINDS)}),
        "date": lambda _: {"type": "string", "pattern": DATE_PATTERN},
        "before": lambda _: {"type": "string", "format": "date"},
    }


def _described(schema: Schema, description: str | None) -> Schema:
    return {**schema, "description": description} if description else schema


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _trades_query(q: QueryConfig) -> Schema:
    """The body of POST /v1/trades/query: the parameters of GET /v1/trades, lists as lists."""
    time = _nullable({"anyOf": [_TIME, *_EPOCH["anyOf"]]})
    columns = name_list_pattern(TABLE_COLUMNS[TRADES])
    return {
        "symbols": _listed({"type": "string", "pattern": symbol_pattern()}, q.max_symbols),
        "exchanges": _listed({"type": "string", "pattern": exchange_pattern()}, q.max_symbols),
        "start": time,
        "end": time,
        "as_of": time,
        "limit": _nullable({"type": "integer", "minimum": 1, "maximum": q.max_rows}),
        "cursor": _nullable({"type": "string", "pattern": CURSOR_PATTERN}),
        "order": _nullable(_enum(("asc", "desc"))),
        "columns": _listed({"type": "string", "pattern": columns}, 100),
        "snapshot_id": _nullable(_INT64),
        "format": _nullable(_enum(f.value for f in Format)),
    }


def apply_contract(
    doc: dict[str, Any], q: QueryConfig, *, ring_size: int | None, keys: bool
) -> dict[str, Any]:
    """A copy of `doc` with the server's constraints and (with `keys`) the key scheme."""
    doc = copy.deepcopy(doc)
    schemas = _parameter_schemas(q, ring_size)
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete") or not path.startswith(
                "/v1/"
            ):
                continue
            for param in op.get("parameters", []):
                make = schemas.get(param["name"])
                schema = make(path) if make is not None else None
                if schema is not None:
                    param["schema"] = _described(schema, param.get("description"))
                if param["name"] == "symbol" and path in _NEEDS_SYMBOL:
                    param["required"] = True
            if keys:
                op["security"] = [{SECURITY_SCHEME: []}]
    components = doc.setdefault("components", {})
    body = components.get("schemas", {}).get("TradesQuery")
    if body is not None:
        old = body.get("properties", {})
        body["properties"] = {
            name: _described(schema, old.get(name, {}).get("description"))
            for name, schema in _trades_query(q).items()
        }
        body["additionalProperties"] = False
    if keys:
        components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "An API key (api.api_keys, or api.admin_api_keys for /v1/admin)",
        }
    return doc


class ContractJsonRender(JsonRenderPlugin):
    """Serves the document at /schema/openapi.json (and /schema) with apply_contract done,
    for the config of the app it belongs to."""

    def __init__(self, state: ApiState) -> None:
        super().__init__()
        self._state = state
        self._rendered: dict[tuple[Any, ...], bytes] = {}

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        state = self._state
        q = state.query_pool.cfg if state.query_pool is not None else QueryConfig()
        ring = state.tracing.ring_size if state.tracing is not None else None
        keys = bool(state.config.api_keys or state.config.admin_api_keys)
        cache_key = (q, ring, keys)
        if cache_key not in self._rendered:
            doc = apply_contract(openapi_schema, q, ring_size=ring, keys=keys)
            self._rendered[cache_key] = self.render_json(request, doc)
        return self._rendered[cache_key]
