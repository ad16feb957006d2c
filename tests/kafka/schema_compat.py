"""Backward compatibility of Avro schemas, checked two ways: by structure (Avro's resolution
rules, stricter where a consumer would silently lose data) and by data (records generated
for every field of the old schema, read with the new one)."""

from __future__ import annotations

import io
import random
from decimal import Decimal
from typing import Any

import fastavro
from fastavro.schema import parse_schema

__all__ = ["compatibility_problems", "generate_records", "read_with_new"]

# Writer type -> reader types that may read it (Avro spec, "Schema Resolution").
_PROMOTIONS = {
    "int": {"int", "long", "float", "double"},
    "long": {"long", "float", "double"},
    "float": {"float", "double"},
    "double": {"double"},
    "string": {"string", "bytes"},
    "bytes": {"bytes", "string"},
    "boolean": {"boolean"},
    "null": {"null"},
}


def _branches(t: Any) -> list[Any]:
    return t if isinstance(t, list) else [t]


def _describe(t: Any) -> str:
    if isinstance(t, dict):
        logical = t.get("logicalType")
        if logical == "decimal":
            return f"decimal({t.get('precision')},{t.get('scale', 0)})"
        if logical:
            return f"{t['type']}/{logical}"
        if t["type"] == "array":
            return f"array<{_describe(t['items'])}>"
        if t["type"] == "map":
            return f"map<{_describe(t['values'])}>"
        return str(t.get("name", t["type"]))
    if isinstance(t, list):
        return "[" + ", ".join(_describe(b) for b in t) + "]"
    return str(t)


def _plain(t: Any) -> Any:
    """{"type": "long"} is "long"; a logical or complex type stays as it is."""
    if isinstance(t, dict) and "logicalType" not in t and t["type"] in _PROMOTIONS:
        return t["type"]
    return t


def _readable(writer: Any, reader: Any) -> bool:
    """Can a value written as `writer` (one non-union type) be read as `reader`?"""
    writer, reader = _plain(writer), _plain(reader)
    if isinstance(reader, list):
        return any(_readable(writer, r) for r in reader)
    if isinstance(writer, dict) and isinstance(reader, dict):
        if writer.get("logicalType") != reader.get("logicalType"):
            return False
        if writer.get("logicalType") == "decimal":
            # A changed scale or precision re-scales every stored value: never allowed.
            return (writer.get("precision"), writer.get("scale", 0)) == (
                reader.get("precision"),
                reader.get("scale", 0),
            ) and writer["type"] == reader["type"]
        if writer["type"] != reader["type"]:
            return False
        if writer["type"] == "array":
            return all(_readable(w, reader["items"]) for w in _branches(writer["items"]))
        if writer["type"] == "map":
            return all(_readable(w, reader["values"]) for w in _branches(writer["values"]))
        if writer["type"] == "record":
            return not compatibility_problems(writer, reader)
        if writer["type"] in ("enum", "fixed"):
            return writer == reader
        return writer["type"] in _PROMOTIONS.get(writer["type"], set())
    if isinstance(writer, dict) or isinstance(reader, dict):
        # A logical type on one side only (e.g. long -> timestamp-micros) changes meaning.
        return False
    return reader in _PROMOTIONS.get(writer, {writer})


def compatibility_problems(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why a reader with `new` could not read data written with `old` ([] if it can)."""
    problems = []
    if old.get("name") != new.get("name"):
        problems.append(f"record renamed: {old.get('name')} -> {new.get('name')}")
    old_fields = {f["name"]: f for f in old["fields"]}
    new_fields = {f["name"]: f for f in new["fields"]}
    for name, f in old_fields.items():
        if name not in new_fields and "default" not in f:
            problems.append(f"{name}: removed, and it had no default")
    for name, f in new_fields.items():
        if name not in old_fields:
            if "default" not in f:
                problems.append(f"{name}: added without a default")
            continue
        before, after = old_fields[name]["type"], f["type"]
        for branch in _branches(before):
            if not _readable(branch, after):
                problems.append(
                    f"{name}: type changed from {_describe(before)} to {_describe(after)}, "
                    "not an allowed promotion"
                )
                break
    return problems


def _value(t: Any, rng: random.Random, branch: int) -> Any:
    if isinstance(t, list):
        return _value(t[branch % len(t)], rng, branch)
    if isinstance(t, dict):
        logical = t.get("logicalType")
        if logical == "decimal":
            digits = rng.randrange(10 ** t["precision"])
            return Decimal(digits * rng.choice((1, -1))).scaleb(-t.get("scale", 0))
        if logical in ("timestamp-micros", "timestamp-millis"):
            return rng.randrange(
                0, 253_402_300_799_000_000 if logical.endswith("micros") else 10**12
            )
        kind = t["type"]
        if kind == "array":
            return [_value(t["items"], rng, branch) for _ in range(rng.randrange(4))]
        if kind == "map":
            return {f"k{i}": _value(t["values"], rng, branch) for i in range(rng.randrange(4))}
        if kind == "record":
            return {f["name"]: _value(f["type"], rng, branch) for f in t["fields"]}
        if kind == "enum":
            return rng.choice(t["symbols"])
        return _value(kind, rng, branch)
    if t == "null":
        return None
    if t == "string":
        return "".join(rng.choice("abcXYZ:0189 é€") for _ in range(rng.randrange(12)))
    if t == "bytes":
        return rng.randbytes(rng.randrange(8))
    if t in ("int", "long"):
        bits = 31 if t == "int" else 63
        return rng.randrange(-(2**bits), 2**bits)
    if t in ("float", "double"):
        return rng.uniform(-1e6, 1e6)
    if t == "boolean":
        return rng.random() < 0.5
    raise ValueError(f"no generator for Avro type {t!r}")


def generate_records(schema: dict[str, Any], n: int, seed: int = 13) -> list[dict[str, Any]]:
    """`n` records with random values in every field; record i takes union branch i of each
    union, so every branch of every field (null and not null) is written."""
    rng = random.Random(seed)
    return [{f["name"]: _value(f["type"], rng, i) for f in schema["fields"]} for i in range(n)]


def read_with_new(
    old: dict[str, Any], new: dict[str, Any], records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Write `records` with `old` (fastavro), read each back with `new` as reader schema."""
    writer, reader = parse_schema(old), parse_schema(new)
    out = []
    for record in records:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, record, strict=True)
        buf.seek(0)
        out.append(fastavro.schemaless_reader(buf, writer, reader))
    return out
