"""Opaque keyset cursors: base64url JSON of (version, query fingerprint, pinned snapshots, key).

A cursor pins the snapshots the first page read, so that every later page reads the same
data: pages never repeat or skip a row while commits land. The fingerprint ties a cursor to
the query that made it; a cursor is never trusted beyond its shape, since its values are
bound as parameters like any other input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from k2d.query._errors import QueryError

__all__ = ["CursorData", "decode_cursor", "encode_cursor", "fingerprint"]

_VERSION = 1
_MAX_CURSOR = 2_048


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


def decode_cursor(text: str, fp: str, key_types: Sequence[type]) -> CursorData:
    """The cursor's data, checked against the query's fingerprint and key column types."""
    bad = QueryError(400, "invalid_cursor", "cursor is malformed or belongs to another query")
    if not text or len(text) > _MAX_CURSOR:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = _decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise bad from None
    if data.version != _VERSION or data.fingerprint != fp or len(data.key) != len(key_types):
        raise bad
    for value, typ in zip(data.key, key_types, strict=True):
        if type(value) is not typ:
            raise bad
    return data
