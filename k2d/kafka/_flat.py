"""Avro binary for the flat records k2d writes (strings, longs, ints, decimal bytes,
nullable unions of those, arrays of strings), without fastavro's per-call overhead.

fastavro encodes or decodes one such record in ~35-45 us here, which capped Kafka mode at
a few thousand trades/s per core; these run several times faster. They are used for the
current schemas only (a record written with a released older schema is resolved by
fastavro), and tests/kafka/test_codec.py checks they give fastavro's bytes and values.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

__all__ = ["FlatCodec", "flat_fields"]

# Field kinds.
_STRING, _LONG, _DECIMAL, _STRINGS = range(4)
_SMALL = [bytes([n]) for n in range(128)]


def flat_fields(doc: dict[str, Any]) -> list[tuple[str, int, bool, int]] | None:
    """(name, kind, nullable, decimal scale) per field, or None if a field is of a type
    this module does not handle."""
    out = []
    for field in doc["fields"]:
        t = field["type"]
        nullable = False
        if isinstance(t, list):
            if len(t) != 2 or t[0] != "null":
                return None
            nullable, t = True, t[1]
        name = t["type"] if isinstance(t, dict) else t
        logical = t.get("logicalType") if isinstance(t, dict) else None
        if name == "string" and logical is None:
            out.append((field["name"], _STRING, nullable, 0))
        elif name in ("long", "int") and logical in (None, "timestamp-micros"):
            out.append((field["name"], _LONG, nullable, 0))
        elif name == "bytes" and logical == "decimal":
            out.append((field["name"], _DECIMAL, nullable, int(t.get("scale", 0))))
        elif name == "array" and t.get("items") == "string":
            out.append((field["name"], _STRINGS, nullable, 0))
        else:
            return None
    return out


def _varint(n: int) -> bytes:
    """A long as Avro writes it: zigzag, then 7 bits a byte."""
    n = (n << 1) ^ (n >> 63)
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n > 127:
        out.append((n & 127) | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def _unscaled(text: str, scale: int) -> bytes:
    """A decimal string as Avro decimal bytes: the unscaled integer, two's complement,
    big-endian, in as few bytes as hold it (what fastavro and Java write)."""
    digits, _, fraction = text.lstrip("-").partition(".")
    if len(fraction) <= scale and digits.isdigit() and (not fraction or fraction.isdigit()):
        n = int(digits + fraction.ljust(scale, "0"))
        if text.startswith("-"):
            n = -n
    else:  # exponent notation, or more digits than the scale keeps: the exact way
        scaled = Decimal(text).scaleb(scale)
        if scaled != scaled.to_integral_value():
            raise ValueError(f"{text} has more decimal places than the scale {scale} keeps")
        n = int(scaled)
    return n.to_bytes(abs(n).bit_length() // 8 + 1, "big", signed=True)


def _decimal_text(unscaled: bytes, scale: int) -> str:
    n = int.from_bytes(unscaled, "big", signed=True)
    digits = str(abs(n)).rjust(scale + 1, "0")
    sign = "-" if n < 0 else ""
    return f"{sign}{digits[:-scale]}.{digits[-scale:]}" if scale else f"{sign}{digits}"


class FlatCodec:
    def __init__(self, fields: list[tuple[str, int, bool, int]]) -> None:
        self._fields = fields

    def encode(self, record: Any, header: bytes) -> bytes:
        out = [header]
        add = out.append
        for name, kind, nullable, scale in self._fields:
            value = getattr(record, name)
            if nullable:
                if value is None:
                    add(b"\x00")
                    continue
                add(b"\x02")
            if kind == _STRING:
                data = value.encode()
                add(_varint(len(data)))
                add(data)
            elif kind == _LONG:
                add(_varint(value))
            elif kind == _DECIMAL:
                data = _unscaled(value, scale)
                add(_varint(len(data)))
                add(data)
            else:
                if value:
                    add(_varint(len(value)))
                    for item in value:
                        data = item.encode()
                        add(_varint(len(data)))
                        add(data)
                add(b"\x00")
        return b"".join(out)

    def decode(self, data: bytes, pos: int) -> dict[str, Any]:
        """The record's fields (decimals as exact strings, timestamps as integers, arrays as
        tuples); raises ValueError on bytes that do not fit the schema exactly."""
        end = len(data)
        fields: dict[str, Any] = {}
        for name, kind, nullable, scale in self._fields:
            if nullable:
                if pos >= end:
                    raise ValueError("truncated record")
                branch = data[pos]
                pos += 1
                if branch == 0:
                    fields[name] = None
                    continue
                if branch != 2:
                    raise ValueError(f"union branch {branch} of {name}")
            if kind == _STRINGS:
                items: list[str] = []
                while True:
                    count, pos = _read_varint(data, pos, end)
                    if not count:
                        break
                    if count < 0:  # a block that gives its size in bytes too
                        count = -count
                        _, pos = _read_varint(data, pos, end)
                    for _ in range(count):
                        size, pos = _read_varint(data, pos, end)
                        if size < 0 or pos + size > end:
                            raise ValueError("length beyond the record")
                        items.append(data[pos : pos + size].decode())
                        pos += size
                fields[name] = tuple(items)
                continue
            # A one-byte varint (most lengths and small longs) without the call.
            b = data[pos] if pos < end else 256
            if b < 128:
                n = (b >> 1) ^ -(b & 1)
                pos += 1
            else:
                n, pos = _read_varint(data, pos, end)
            if kind == _LONG:
                fields[name] = n
                continue
            if n < 0 or pos + n > end:
                raise ValueError("length beyond the record")
            chunk = data[pos : pos + n]
            pos += n
            fields[name] = chunk.decode() if kind == _STRING else _decimal_text(chunk, scale)
        if pos != end:
            raise ValueError(f"{end - pos} trailing bytes")
        return fields


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        if pos >= end:
            raise ValueError("truncated record")
        b = data[pos]
        pos += 1
        n |= (b & 127) << shift
        if b < 128:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")
