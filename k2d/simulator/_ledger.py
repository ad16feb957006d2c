"""What the simulator did to the wire, written as the manifest a test checks a daemon against."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec


class SymbolLedger:
    """Observable id range of one symbol and the faulted ids inside it (bounded lists)."""

    __slots__ = ("_cap", "dropped", "duplicated", "first_trade_id", "reordered", "truncated")

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self.first_trade_id: int | None = None
        self.dropped: list[int] = []
        self.duplicated: list[int] = []
        self.reordered: list[int] = []
        self.truncated = False

    def record(self, ids: list[int], trade_id: int) -> None:
        if len(ids) < self._cap:
            ids.append(trade_id)
        else:
            self.truncated = True

    def unrecord_reordered(self, trade_id: int) -> None:
        """Forget a reorder that never showed on the wire (sent in order, or sent to nobody)."""
        if self.reordered and self.reordered[-1] == trade_id:
            self.reordered.pop()

    def to_dict(self, last_trade_id: int) -> dict[str, Any]:
        first = self.first_trade_id
        return {
            "first_trade_id": first,
            "last_trade_id": last_trade_id if first is not None else None,
            "dropped": list(self.dropped),
            "duplicated": list(self.duplicated),
            "reordered": list(self.reordered),
            "truncated": self.truncated,
        }


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    return msgspec.json.encode(manifest) + b"\n"
