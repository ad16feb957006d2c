"""schemas/*.avsc: the Kafka contract matches the Iceberg tables and the model, every schema
is released under schemas/history/, and each one reads data written by every released one."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pyiceberg.types import (
    DecimalType,
    IcebergType,
    IntegerType,
    ListType,
    LongType,
    StringType,
    TimestamptzType,
)

from k2d.model import Quote, SequenceEvent, Trade
from k2d.storage._schemas import QUOTES, SEQUENCE_EVENTS, TABLES, TRADES
from tests.kafka.schema_compat import compatibility_problems, generate_records, read_with_new

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
CURRENT = {"trade_v2": TRADES, "quote_v2": QUOTES, "sequence_event": SEQUENCE_EVENTS}
MODELS = {"trade_v2": Trade, "quote_v2": Quote, "sequence_event": SequenceEvent}


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def released(stem: str) -> list[Path]:
    return sorted((SCHEMAS / "history").glob(f"{stem}.*.avsc"))


def iceberg_type(avro: Any) -> tuple[type[IcebergType], bool]:
    """(Iceberg type class, nullable) for an Avro field type."""
    nullable = isinstance(avro, list) and "null" in avro
    if isinstance(avro, list):
        (avro,) = [b for b in avro if b != "null"]
    if isinstance(avro, dict):
        logical = avro.get("logicalType")
        if logical == "decimal":
            assert (avro["precision"], avro["scale"]) == (18, 8)
            return DecimalType, nullable
        if logical == "timestamp-micros":
            return TimestamptzType, nullable
        if avro["type"] == "array":
            assert avro["items"] == "string"
            return ListType, nullable
        avro = avro["type"]
    return {"string": StringType, "long": LongType, "int": IntegerType}[avro], nullable


@pytest.mark.parametrize("stem", sorted(CURRENT))
def test_schema_fields_are_the_table_columns_and_the_model_fields(stem: str) -> None:
    schema = load(SCHEMAS / f"{stem}.avsc")
    table = TABLES[CURRENT[stem]].schema
    assert schema["namespace"] == "com.k2.marketdata"
    assert [f["name"] for f in schema["fields"]] == [f.name for f in table.fields]
    assert [f["name"] for f in schema["fields"]] == list(MODELS[stem].__struct_fields__)
    for field in schema["fields"]:
        column = table.find_field(field["name"])
        typ, nullable = iceberg_type(field["type"])
        assert isinstance(column.field_type, typ), field["name"]
        assert nullable == (not column.required), field["name"]
        if nullable:
            assert field.get("default", "missing") is None, f"{field['name']}: default null"


@pytest.mark.parametrize("stem", sorted(CURRENT))
def test_every_current_schema_is_released(stem: str) -> None:
    current = load(SCHEMAS / f"{stem}.avsc")
    assert any(load(p) == current for p in released(stem)), (
        f"schemas/{stem}.avsc differs from every schemas/history/{stem}.N.avsc: "
        f"copy it to the next N when releasing it"
    )


@pytest.mark.parametrize(
    ("stem", "old"),
    [(stem, path) for stem in sorted(CURRENT) for path in released(stem)],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_current_schema_reads_every_released_one(stem: str, old: Path) -> None:
    writer, reader = load(old), load(SCHEMAS / f"{stem}.avsc")
    assert compatibility_problems(writer, reader) == []
    records = generate_records(writer, 60)
    back = read_with_new(writer, reader, records)
    shared = {f["name"] for f in writer["fields"]} & {f["name"] for f in reader["fields"]}
    added = {f["name"]: f["default"] for f in reader["fields"] if f["name"] not in shared}
    for sent, got in zip(records, back, strict=True):
        assert {k: _plain(got[k]) for k in shared} == {k: _plain(sent[k]) for k in shared}
        assert {k: got[k] for k in added} == added


def _plain(value: Any) -> Any:
    """fastavro reads timestamp-micros back as datetimes; compare them as microseconds."""
    if isinstance(value, datetime):
        return (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return value


def test_generated_records_cover_every_field_null_and_not() -> None:
    schema = load(SCHEMAS / "quote_v2.avsc")
    records = generate_records(schema, 60)
    for field in schema["fields"]:
        values = [r[field["name"]] for r in records]
        assert any(v is not None for v in values), field["name"]
        if isinstance(field["type"], list):
            assert any(v is None for v in values), field["name"]


def _changed(stem: str, edit: Any) -> dict[str, Any]:
    schema = copy.deepcopy(load(SCHEMAS / f"{stem}.avsc"))
    edit(schema)
    return schema


def _field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in schema["fields"] if f["name"] == name)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (
            lambda s: s["fields"].append({"name": "venue", "type": "string"}),
            "venue: added without a default",
        ),
        (
            lambda s: s["fields"].remove(_field(s, "side")),
            "side: removed, and it had no default",
        ),
        (
            lambda s: _field(s, "trade_id").update(type="long"),
            "trade_id: type changed from string to long",
        ),
        (
            lambda s: _field(s, "price")["type"].update(scale=6),
            "price: type changed from decimal(18,8) to decimal(18,6)",
        ),
        (
            lambda s: _field(s, "source_sequence").update(type="long", default=0),
            "source_sequence: type changed from [null, long] to long",
        ),
    ],
    ids=["added-required", "removed-required", "string-to-long", "rescaled", "made-required"],
)
def test_an_incompatible_change_is_caught(edit: Any, problem: str) -> None:
    old = load(SCHEMAS / "trade_v2.avsc")
    new = _changed("trade_v2", edit)
    problems = compatibility_problems(old, new)
    assert any(p.startswith(problem) for p in problems), problems


def test_an_incompatible_change_fails_on_data_too() -> None:
    old = load(SCHEMAS / "trade_v2.avsc")
    new = _changed("trade_v2", lambda s: s["fields"].append({"name": "venue", "type": "string"}))
    with pytest.raises(Exception, match="venue"):
        read_with_new(old, new, generate_records(old, 1))


def test_compatible_changes_pass() -> None:
    old = load(SCHEMAS / "sequence_event.avsc")

    def edit(s: dict[str, Any]) -> None:
        s["fields"].append({"name": "note", "type": ["null", "string"], "default": None})
        _field(s, "partition").update(type="long")  # int -> long is a promotion
        s["fields"].remove(_field(s, "detail"))  # had a default

    new = _changed("sequence_event", edit)
    assert compatibility_problems(old, new) == []
    back = read_with_new(old, new, generate_records(old, 10))
    assert all(r["note"] is None and "detail" not in r for r in back)


def test_the_package_reaches_the_one_set_of_schemas_the_repo_publishes() -> None:
    """k2d/kafka/schemas links to the top-level schemas/ (a wheel holds it as files, see
    pyproject's package-data), so the codec and other teams' consumers read the same files."""
    from k2d.kafka.codec import SCHEMA_DIR

    top = Path(__file__).resolve().parents[2] / "schemas"
    assert SCHEMA_DIR.resolve() == top.resolve()
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.avsc")) == [
        "quote_v2.avsc",
        "sequence_event.avsc",
        "trade_v2.avsc",
    ]
