"""What the simulator did to the wire, written as the manifest a test checks a daemon against."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import msgspec


class SymbolLedger:
    """Observable id range of one symbol and the faulted ids inside it (bounded lists)."""

    __slots__ = (
        "_cap",
        "dropped",
        "duplicated",
        "first_trade_id",
        "quotes",
        "reordered",
        "truncated",
    )

    def __init__(self, cap: int, record_quotes: bool = False) -> None:
        self._cap = cap
        self.first_trade_id: int | None = None
        self.dropped: list[int] = []
        self.duplicated: list[int] = []
        self.reordered: list[int] = []
        # Update ids of the quotes sent, when asked for (None: not recorded).
        self.quotes: list[int] | None = [] if record_quotes else None
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
        } | ({"quote_ids": list(self.quotes)} if self.quotes is not None else {})


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file.
    The temporary name is unique, so two writers never rename each other's file away."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the manifest from other users
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    return msgspec.json.encode(manifest) + b"\n"
