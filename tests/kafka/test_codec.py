"""The Avro codec alone (no broker): exact round trips, the single-object header, old
writers' records read through the current schema, unknown writers refused by name."""

from __future__ import annotations

import io
import json
import shutil
from decimal import Decimal
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import parse_schema
from hypothesis import given, settings
from hypothesis import strategies as st

from k2d.kafka import AvroCodec, CorruptRecordError, UnknownSchemaError, schema_fingerprint
from k2d.kafka.codec import SCHEMA_DIR
from k2d.model import Quote, SequenceEvent, Trade

CODEC = AvroCodec()
LONG = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# Any timestamp an int64 holds, not only years 1-9999 (a hostile venue time must not crash).
MICROS = LONG
TEXT = st.text(max_size=12)
DECIMAL = st.builds(
    lambda units, neg: ("-" if neg and units else "") + f"{Decimal(units).scaleb(-8):f}",
    st.integers(min_value=0, max_value=10**18 - 1),
    st.booleans(),
)
SHORT_DECIMAL = st.sampled_from(["0.1", "65000", "1e-8", "42.00000001", "0"])


def trades() -> st.SearchStrategy[Trade]:
    return st.builds(
        Trade,
        message_id=TEXT,
        trade_id=TEXT,
        symbol=TEXT,
        exchange=TEXT,
        asset_class=TEXT,
        timestamp=MICROS,
        price=DECIMAL | SHORT_DECIMAL,
        quantity=DECIMAL,
        currency=TEXT,
        side=st.sampled_from(["BUY", "SELL"]),
        trade_conditions=st.none() | st.lists(TEXT, max_size=3).map(tuple),
        source_sequence=st.none() | LONG,
        ingestion_timestamp=MICROS,
        platform_sequence=LONG,
        vendor_data=st.none() | TEXT.map(lambda t: json.dumps({"v": t})),
        provenance=st.sampled_from(["live", "backfill", "batch", "replay"]),
    )


def quotes() -> st.SearchStrategy[Quote]:
    return st.builds(
        Quote,
        message_id=TEXT,
        symbol=TEXT,
        exchange=TEXT,
        asset_class=TEXT,
        timestamp=MICROS,
        bid_price=st.none() | DECIMAL,
        bid_quantity=st.none() | DECIMAL,
        ask_price=st.none() | DECIMAL,
        ask_quantity=st.none() | DECIMAL,
        currency=TEXT,
        source_sequence=st.none() | LONG,
        ingestion_timestamp=MICROS,
        platform_sequence=LONG,
        vendor_data=st.none() | TEXT,
        provenance=st.sampled_from(["live", "backfill"]),
    )


def events() -> st.SearchStrategy[SequenceEvent]:
    optional = st.none() | LONG
    return st.builds(
        SequenceEvent,
        event_id=TEXT,
        exchange=TEXT,
        symbol=TEXT,
        stream=st.sampled_from(["trade", "quote"]),
        partition=st.integers(min_value=-(2**31), max_value=2**31 - 1),
        kind=st.sampled_from(["gap", "duplicate", "out_of_order", "session_reset", "outage"]),
        status=st.sampled_from(["open", "backfilled", "unrecoverable", "info"]),
        first_missing=optional,
        last_missing=optional,
        missing_count=LONG,
        detected_at=MICROS,
        resolved_at=optional,
        window_start=optional,
        window_end=optional,
        detail=TEXT,
        recorded_at=MICROS,
    )


def assert_same(sent: Trade | Quote | SequenceEvent, got: object) -> None:
    """Equal field by field; decimals equal as numbers and written with exactly 8 places."""
    assert type(got) is type(sent)
    for name in sent.__struct_fields__:
        a, b = getattr(sent, name), getattr(got, name)
        if isinstance(a, str) and name.endswith(("price", "quantity")):
            assert isinstance(b, str)
            assert Decimal(b) == Decimal(a), name
            assert len(b.partition(".")[2]) == 8, b
        else:
            assert b == a, name


@settings(max_examples=300, deadline=None)
@given(st.one_of(trades(), quotes(), events()))
def test_every_record_round_trips_exactly(record: Trade | Quote | SequenceEvent) -> None:
    assert_same(record, CODEC.decode(CODEC.encode(record)))


def test_header_is_single_object_encoding_with_the_schema_fingerprint() -> None:
    # The Avro spec's own example: the fingerprint of "int" in little-endian byte order.
    assert schema_fingerprint(parse_schema("int")).hex() == "8f5c393f1ad57572"
    trade = sample_trade()
    data = CODEC.encode(trade)
    schema = parse_schema(json.loads((SCHEMA_DIR / "trade_v2.avsc").read_text()))
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == schema_fingerprint(schema)
    body = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema)
    assert body["price"] == Decimal("65000.12345678")
    assert body["symbol"] == "BTCUSDT"


def test_unknown_schema_and_foreign_bytes_are_refused_by_name() -> None:
    data = bytearray(CODEC.encode(sample_trade()))
    data[5] ^= 0xFF
    with pytest.raises(UnknownSchemaError, match=r"unknown writer schema fingerprint [0-9a-f]{16}"):
        CODEC.decode(bytes(data))
    with pytest.raises(UnknownSchemaError, match="not Avro single-object encoding"):
        CODEC.decode(b'{"price": "1"}')
    with pytest.raises(UnknownSchemaError, match="not Avro single-object encoding"):
        CODEC.decode(b"")


@pytest.mark.parametrize(
    ("cut", "junk"),
    [(30, b""), (10, b"\xff" * 40), (10, b"\x01" * 5), (None, b"junk")],
    ids=["truncated", "garbage", "negative-length", "trailing-bytes"],
)
def test_a_corrupt_body_is_refused_by_name(cut: int | None, junk: bytes) -> None:
    data = CODEC.encode(sample_trade())[:cut] + junk
    with pytest.raises(CorruptRecordError, match="trade_v2"):
        CODEC.decode(data)


def test_more_than_eight_decimal_places_is_refused_not_rounded() -> None:
    with pytest.raises(ValueError, match=r"[Ss]cale"):
        CODEC.encode(sample_trade(price="0.123456789"))


def test_a_record_written_by_a_released_schema_decodes_into_the_current_one(
    tmp_path: Path,
) -> None:
    # A released v2.0 without `provenance` and `vendor_data`, next to the real schemas.
    shutil.copytree(SCHEMA_DIR, tmp_path / "schemas")
    old = json.loads((SCHEMA_DIR / "trade_v2.avsc").read_text())
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("provenance", "vendor_data")]
    (tmp_path / "schemas" / "history" / "trade_v2.0.avsc").write_text(json.dumps(old))
    codec = AvroCodec(tmp_path / "schemas")
    parsed = parse_schema(old)
    row = {f: getattr(sample_trade(), f) for f in Trade.__struct_fields__}
    row = {k: v for k, v in row.items() if k not in ("provenance", "vendor_data")}
    row.update(
        price=Decimal(row["price"]), quantity=Decimal(row["quantity"]), trade_conditions=None
    )
    out = io.BytesIO()
    out.write(b"\xc3\x01" + schema_fingerprint(parsed))
    fastavro.schemaless_writer(out, parsed, row)

    got = codec.decode(out.getvalue())

    assert isinstance(got, Trade)
    assert (got.provenance, got.vendor_data) == ("live", None)
    assert (got.price, got.timestamp) == ("65000.12345678", 1_700_000_000_123_456)
    with pytest.raises(UnknownSchemaError, match="unknown writer schema"):
        CODEC.decode(out.getvalue())  # the shipped codec does not know that schema


def sample_trade(price: str = "65000.12345678") -> Trade:
    return Trade(
        message_id="BINANCE:BTCUSDT:trade:1",
        trade_id="1",
        symbol="BTCUSDT",
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=1_700_000_000_123_456,
        price=price,
        quantity="0.00100000",
        currency="USDT",
        side="SELL",
        source_sequence=1,
        ingestion_timestamp=1_700_000_000_223_456,
        vendor_data='{"m": true}',
    )


@settings(max_examples=300, deadline=None)
@given(st.one_of(trades(), quotes(), events()))
def test_the_fast_path_writes_fastavros_bytes_and_reads_them_back(
    record: Trade | Quote | SequenceEvent,
) -> None:
    """k2d/kafka/_flat.py encodes the current schemas itself: byte for byte what fastavro
    writes from the .avsc (with its logical types), and it reads fastavro's bytes."""
    header, schema = CODEC._current[type(record)]
    fields = {name: getattr(record, name) for name in record.__struct_fields__}
    for name in ("price", "quantity", "bid_price", "bid_quantity", "ask_price", "ask_quantity"):
        if fields.get(name) is not None:
            fields[name] = Decimal(fields[name])
    if fields.get("trade_conditions") is not None:
        fields["trade_conditions"] = list(fields["trade_conditions"])
    out = io.BytesIO()
    out.write(header)
    fastavro.schemaless_writer(out, schema, fields)
    assert CODEC.encode(record) == out.getvalue()
    assert_same(record, CODEC.decode(out.getvalue()))
