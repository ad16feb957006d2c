"""The k2.* snapshot properties: what each commit says about the pipeline's position.

Every commit of a flush carries the same state: the merged watermarks and log position
after the flush, the flush's sequence number and the tables it commits. Iceberg has no
multi-table transaction, so a crash can land between the commits of one flush; recovery
then resumes from a state written before that flush (the oldest among its tables), which
replays rows some tables already hold (duplicates by message_id) instead of skipping rows
that others never got.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from k2d.messages import Watermark

__all__ = [
    "BATCH_IDS",
    "FLUSH",
    "FLUSH_TABLES",
    "LOG_POSITION",
    "WATERMARKS",
    "K2State",
    "TableState",
    "flush_properties",
    "merge_states",
    "table_state",
]

WATERMARKS = "k2.watermarks"
LOG_POSITION = "k2.log_position"
BATCH_IDS = "k2.batch_ids"
FLUSH = "k2.flush"
FLUSH_TABLES = "k2.flush_tables"

_watermarks_decoder = msgspec.json.Decoder(dict[str, Watermark])
_position_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()


def flush_properties(
    *,
    flush: int,
    tables: Iterable[str],
    watermarks: Mapping[str, Watermark],
    log_position: Mapping[str, Any],
    batch_ids: Iterable[int],
) -> dict[str, str]:
    """Snapshot properties for one commit of flush number `flush`."""
    ids = list(batch_ids)
    span = {"count": len(ids), "min": min(ids, default=None), "max": max(ids, default=None)}
    return {
        WATERMARKS: _encoder.encode(dict(watermarks)).decode(),
        LOG_POSITION: _encoder.encode(dict(log_position)).decode(),
        BATCH_IDS: _encoder.encode(span).decode(),
        FLUSH: str(flush),
        FLUSH_TABLES: ",".join(sorted(tables)),
    }


@dataclass(frozen=True)
class TableState:
    """The k2 state recorded by one table's current snapshot."""

    table: str
    flush: int
    flush_tables: frozenset[str]
    timestamp_ms: int
    watermarks: dict[str, Watermark]
    log_position: dict[str, Any]


@dataclass(frozen=True)
class K2State:
    watermarks: dict[str, Watermark]
    log_position: dict[str, Any]
    # The latest flush number seen, and each table's last committed flush (-1: never).
    flush: int
    table_flushes: dict[str, int]
    # False when a crash landed between the commits of the latest flush.
    complete: bool


def table_state(table: str, props: Mapping[str, str], timestamp_ms: int) -> TableState | None:
    """Decode a snapshot's k2 properties; None for a snapshot that has none."""
    if WATERMARKS not in props and LOG_POSITION not in props:
        return None
    members = frozenset(t for t in props.get(FLUSH_TABLES, "").split(",") if t)
    return TableState(
        table=table,
        flush=int(props.get(FLUSH, "0")),
        flush_tables=members or frozenset({table}),
        timestamp_ms=timestamp_ms,
        watermarks=_watermarks_decoder.decode(props.get(WATERMARKS, "{}")),
        log_position=_position_decoder.decode(props.get(LOG_POSITION, "{}")),
    )


def _newest_first(s: TableState) -> tuple[int, int]:
    return (-s.flush, -s.timestamp_ms)


def merge_states(states: Iterable[TableState], tables: Iterable[str] = ()) -> K2State:
    """The position to resume from, given each table's latest state."""
    by_table = {s.table: s for s in states}
    flushes = {t: -1 for t in tables} | {t: s.flush for t, s in by_table.items()}
    if not by_table:
        return K2State(
            watermarks={}, log_position={}, flush=0, table_flushes=flushes, complete=True
        )
    latest = min(by_table.values(), key=_newest_first)
    members = [by_table[t] for t in latest.flush_tables if t in by_table]
    missing = len(members) < len(latest.flush_tables)
    if not missing and all(s.flush == latest.flush for s in members):
        return K2State(
            watermarks=latest.watermarks,
            log_position=latest.log_position,
            flush=latest.flush,
            table_flushes=flushes,
            complete=True,
        )
    # A crash landed between the commits of the latest flush. Only states written before it
    # are safe for every table: keys first seen in this flush are left out on purpose.
    basis = [s for s in members if s.flush < latest.flush]
    if missing:
        # A table of the flush has never committed: use the newest state from before it.
        before = sorted((s for s in by_table.values() if s.flush < latest.flush), key=_newest_first)
        basis.extend(before[:1])
    watermarks: dict[str, Watermark] = {}
    position: dict[str, Any] = {}
    # Newest first, so that per key the oldest state's value is the one that stays.
    for s in sorted(basis, key=_newest_first):
        watermarks.update(s.watermarks)
        position.update(s.log_position)
    return K2State(
        watermarks=watermarks,
        log_position=position,
        flush=latest.flush,
        table_flushes=flushes,
        complete=False,
    )
