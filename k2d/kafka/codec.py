"""Trade, Quote and SequenceEvent <-> Avro single-object encoding, schemas from schemas/*.avsc.

A record on the wire is 0xC3 0x01, the 8-byte CRC-64-AVRO fingerprint of its writer schema's
parsing canonical form (little-endian, as the Avro spec and Java write it), then the Avro
body. Decoding looks the fingerprint up among the current and released schemas
(schemas/history/) and resolves the body into the current schema, so a consumer reads
records written by any released version and refuses anything else by name.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from k2d.kafka._flat import FlatCodec, flat_fields
from k2d.model import Quote, SequenceEvent, Trade

__all__ = [
    "MAGIC",
    "SCHEMA_DIR",
    "SCHEMA_FILES",
    "AvroCodec",
    "CorruptRecordError",
    "MarketRecord",
    "UnknownSchemaError",
    "schema_fingerprint",
]

MarketRecord = Trade | Quote | SequenceEvent

MAGIC = b"\xc3\x01"
_HEADER = len(MAGIC) + 8
# The repo's schemas/ folder (the contract other teams' consumers read too), reached
# through the k2d/kafka/schemas link, which a built wheel holds as files.
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
SCHEMA_FILES: dict[type[MarketRecord], str] = {
    Trade: "trade_v2",
    Quote: "quote_v2",
    SequenceEvent: "sequence_event",
}
_DECIMALS = {"price", "quantity", "bid_price", "bid_quantity", "ask_price", "ask_quantity"}


class UnknownSchemaError(ValueError):
    """Bytes that are not single-object Avro, or written with a schema this codec lacks."""


class CorruptRecordError(ValueError):
    """A known schema's header followed by a body that does not decode with it."""


def schema_fingerprint(schema: dict[str, Any]) -> bytes:
    """The 8 bytes of a single-object header: CRC-64-AVRO of the parsing canonical form."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


@dataclass(frozen=True)
class _Writer:
    record_type: type[MarketRecord]
    name: str  # e.g. "trade_v2.1" (released) or "trade_v2" (current)
    # Read without logical types: timestamps stay integer microseconds (fastavro's datetimes
    # stop at year 9999) and decimals stay unscaled bytes, turned into exact strings here.
    raw: dict[str, Any]
    scales: dict[str, int]  # decimal field -> scale


class AvroCodec:
    """Encodes with the current schemas; decodes any current or released one by fingerprint."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        self._current: dict[type[MarketRecord], tuple[bytes, dict[str, Any]]] = {}
        self._readers: dict[type[MarketRecord], dict[str, Any]] = {}
        self._writers: dict[bytes, _Writer] = {}
        # The current schemas' fast path, by record type and by header.
        self._flat: dict[type[MarketRecord], FlatCodec] = {}
        self._flat_by_header: dict[bytes, FlatCodec] = {}
        for record_type, stem in SCHEMA_FILES.items():
            paths = [schema_dir / f"{stem}.avsc"]
            if not paths[0].is_file():
                raise FileNotFoundError(f"Avro schema {paths[0]} not found (schemas/ of k2d)")
            paths += sorted((schema_dir / "history").glob(f"{stem}.*.avsc"))
            for path in paths:
                doc = json.loads(path.read_text(encoding="utf-8"))
                header = MAGIC + schema_fingerprint(_parse(doc))
                if path == paths[0]:
                    self._current[record_type] = (header, _parse(doc))
                    self._readers[record_type] = _parse(_without_logical_types(doc))
                    fields = flat_fields(doc)
                    if fields is not None:
                        self._flat[record_type] = self._flat_by_header[header] = FlatCodec(fields)
                self._writers.setdefault(
                    header,
                    _Writer(
                        record_type,
                        path.name.removesuffix(".avsc"),
                        _parse(_without_logical_types(doc)),
                        _decimal_scales(doc),
                    ),
                )

    def schema(self, record_type: type[MarketRecord]) -> dict[str, Any]:
        """The current (parsed) schema records of this type are written with."""
        return self._current[record_type][1]

    def encode(self, record: MarketRecord) -> bytes:
        header, schema = self._current[type(record)]
        flat = self._flat.get(type(record))
        if flat is not None:
            return flat.encode(record, header)
        out = io.BytesIO()
        out.write(header)
        fastavro.schemaless_writer(out, schema, _to_avro(record), strict=True)
        return out.getvalue()

    def decode(self, data: bytes) -> MarketRecord:
        if len(data) < _HEADER or data[:2] != MAGIC:
            raise UnknownSchemaError(
                f"not Avro single-object encoding: starts with {data[:2].hex() or 'nothing'}, "
                f"expected {MAGIC.hex()} and an 8-byte schema fingerprint"
            )
        writer = self._writers.get(bytes(data[:_HEADER]))
        if writer is None:
            known = ", ".join(sorted(w.name for w in self._writers.values()))
            raise UnknownSchemaError(
                f"unknown writer schema fingerprint {data[2:_HEADER].hex()}: "
                f"not one of the current or released schemas ({known})"
            )
        flat = self._flat_by_header.get(bytes(data[:_HEADER]))
        if flat is not None:
            try:
                return writer.record_type(**flat.decode(data, _HEADER))
            except (ValueError, UnicodeDecodeError) as e:
                raise CorruptRecordError(f"{writer.name} record does not decode: {e}") from None
        body = io.BytesIO(data[_HEADER:])
        reader = self._readers[writer.record_type]
        try:
            fields = cast(dict[str, Any], fastavro.schemaless_reader(body, writer.raw, reader))
        except (EOFError, IndexError, ValueError, OverflowError) as e:
            raise CorruptRecordError(
                f"{writer.name} record does not decode: {type(e).__name__}: {e}"
            ) from None
        if body.tell() != len(data) - _HEADER:
            extra = len(data) - _HEADER - body.tell()
            raise CorruptRecordError(f"{writer.name} record has {extra} trailing bytes")
        for name, scale in writer.scales.items():
            if fields.get(name) is not None:
                fields[name] = _decimal_str(fields[name], scale)
        if fields.get("trade_conditions") is not None:
            fields["trade_conditions"] = tuple(fields["trade_conditions"])
        return writer.record_type(**fields)


def _parse(doc: dict[str, Any]) -> dict[str, Any]:
    return cast(dict[str, Any], parse_schema(doc))


def _without_logical_types(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_without_logical_types(v) for v in node]
    return node


def _decimal_scales(doc: dict[str, Any]) -> dict[str, int]:
    scales = {}
    for field in doc["fields"]:
        branches = field["type"] if isinstance(field["type"], list) else [field["type"]]
        for branch in branches:
            if isinstance(branch, dict) and branch.get("logicalType") == "decimal":
                scales[field["name"]] = int(branch.get("scale", 0))
    return scales


def _decimal_str(unscaled: bytes, scale: int) -> str:
    """Avro decimal bytes (big-endian two's complement) as an exact plain decimal string."""
    n = int.from_bytes(unscaled, "big", signed=True)
    digits = str(abs(n)).rjust(scale + 1, "0")
    sign = "-" if n < 0 else ""
    return f"{sign}{digits[:-scale]}.{digits[-scale:]}" if scale else f"{sign}{digits}"


def _to_avro(record: MarketRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in record.__struct_fields__:
        value = getattr(record, name)
        if name in _DECIMALS and value is not None:
            value = Decimal(value)
        elif name == "trade_conditions" and value is not None:
            value = list(value)
        out[name] = value
    return out
