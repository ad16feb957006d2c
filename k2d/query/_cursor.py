"""Opaque keyset cursors: base64url JSON of (version, query fingerprint, pinned snapshots, key).

A cursor pins the snapshots the first page read, so that every later page reads the same
data: pages never repeat or skip a row while commits land. The fingerprint ties a cursor to
the query that made it, but it is no secret (anyone can compute it), so a cursor is trusted
no further than its shape: every value must be one the server could have written (64-bit
integers, timestamps a datetime can hold, strings), and anything else is 400 invalid_cursor
before it reaches SQL, where its values are bound as parameters like any other input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from k2d.query._errors import QueryError

__all__ = ["CursorData", "KeyBounds", "decode_cursor", "encode_cursor", "fingerprint"]

_VERSION = 1
_MAX_CURSOR = 2_048
_BASE64URL = re.compile("[A-Za-z0-9_-]+")
INT64 = (-(2**63), 2**63 - 1)
# Timestamps travel as epoch microseconds; these are the years 1 to 9999 (Python's datetime).
TIMESTAMP_US = (-62_135_596_800_000_000, 253_402_300_799_999_999)
# A key column's Python type, and for integers the closed range its values may take.
KeyBounds = tuple[type, tuple[int, int] | None]


class CursorData(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    version: int
    fingerprint: str
    snapshots: dict[str, int]
    key: list[int | str]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CursorData)


def fingerprint(*parts: Any) -> str:
    """A short digest of the parameters that define a query's rows (not its page)."""
    return hashlib.sha256(_encoder.encode(parts)).hexdigest()[:16]


def encode_cursor(fp: str, snapshots: Mapping[str, int], key: Sequence[int | str]) -> str:
    raw = _encoder.encode(CursorData(_VERSION, fp, dict(snapshots), list(key)))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(text: str, fp: str, key_types: Sequence[type | KeyBounds]) -> CursorData:
    """The cursor's data, checked against the query's fingerprint and key column types (an
    int column is a 64-bit integer unless bounds say otherwise)."""
    bad = QueryError(400, "invalid_cursor", "cursor is malformed or belongs to another query")
    if len(text) > _MAX_CURSOR or not _BASE64URL.fullmatch(text):
        raise bad
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = _decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise bad from None
    if data.version != _VERSION or data.fingerprint != fp or len(data.key) != len(key_types):
        raise bad
    if not all(INT64[0] <= v <= INT64[1] for v in data.snapshots.values()):
        raise bad
    for value, spec in zip(data.key, key_types, strict=True):
        typ, bounds = spec if isinstance(spec, tuple) else (spec, None)
        if type(value) is not typ:
            raise bad
        if isinstance(value, int):
            lo, hi = bounds or INT64
            if not lo <= value <= hi:
                raise bad
    return data
