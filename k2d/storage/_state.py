"""The k2.* snapshot properties: what each commit says about the pipeline's position.

Every commit of a flush carries the same state: the merged watermarks and log position
after the flush, the flush's sequence number and the tables it commits. Iceberg has no
multi-table transaction, so a crash can land between the commits of one flush; recovery
then resumes from a state written before that flush (the oldest among its tables), which
replays rows some tables already hold (duplicates by message_id) instead of skipping rows
that others never got.

Several daemons can share one set of tables (Kafka mode: the members of one consumer
group, each with its partitions). Each keeps a lane of its own: its commits say which
member made them (`k2.member`), flushes are numbered per member, and every commit carries
the latest lane of each other member (`k2.lanes`), so one snapshot holds everyone's
state. A daemon alone (embedded mode) has the one unnamed lane "" and writes neither key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from k2d.messages import Watermark

__all__ = [
    "BATCH_IDS",
    "FLUSH",
    "FLUSH_PARTITIONS",
    "FLUSH_TABLES",
    "LANES",
    "LOG_POSITION",
    "MEMBER",
    "WATERMARKS",
    "K2State",
    "TableState",
    "flush_properties",
    "lanes_property",
    "merge_lanes",
    "merge_states",
    "table_state",
    "table_states",
]

WATERMARKS = "k2.watermarks"
LOG_POSITION = "k2.log_position"
BATCH_IDS = "k2.batch_ids"
FLUSH = "k2.flush"
FLUSH_TABLES = "k2.flush_tables"
MEMBER = "k2.member"
LANES = "k2.lanes"
# The tracker partitions whose batches a flush holds ("@P" of their log position keys).
FLUSH_PARTITIONS = "k2.flush_partitions"

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
    member: str = "",
    partitions: Iterable[int] = (),
) -> dict[str, str]:
    """Snapshot properties for one commit of flush number `flush` of `member`'s lane."""
    ids = list(batch_ids)
    span = {"count": len(ids), "min": min(ids, default=None), "max": max(ids, default=None)}
    props = {
        WATERMARKS: _encoder.encode(dict(watermarks)).decode(),
        LOG_POSITION: _encoder.encode(dict(log_position)).decode(),
        BATCH_IDS: _encoder.encode(span).decode(),
        FLUSH: str(flush),
        FLUSH_TABLES: ",".join(sorted(tables)),
    }
    if member:
        props[MEMBER] = member
        props[FLUSH_PARTITIONS] = ",".join(str(p) for p in sorted(set(partitions)))
    return props


@dataclass(frozen=True)
class TableState:
    """The k2 state recorded by one table's current snapshot."""

    table: str
    flush: int
    flush_tables: frozenset[str]
    timestamp_ms: int
    watermarks: dict[str, Watermark]
    log_position: dict[str, Any]
    member: str = ""
    # The tracker partitions of the flush (None: not recorded, i.e. all of them).
    partitions: frozenset[int] | None = None


@dataclass(frozen=True)
class K2State:
    watermarks: dict[str, Watermark]
    log_position: dict[str, Any]
    # The latest flush number seen, and each table's last committed flush (-1: never).
    flush: int
    table_flushes: dict[str, int]
    # False when a crash landed between the commits of the latest flush.
    complete: bool


class _Lane(msgspec.Struct, frozen=True):
    """Another member's latest state, as a commit carries it in `k2.lanes`."""

    flush: int
    flush_tables: list[str]
    timestamp_ms: int
    watermarks: dict[str, Watermark]
    log_position: dict[str, Any]
    partitions: list[int] | None = None


_lanes_decoder = msgspec.json.Decoder(dict[str, _Lane])


def table_state(table: str, props: Mapping[str, str], timestamp_ms: int) -> TableState | None:
    """Decode a snapshot's own k2 state (its member's); None for a snapshot that has none."""
    if WATERMARKS not in props and LOG_POSITION not in props:
        return None
    members = frozenset(t for t in props.get(FLUSH_TABLES, "").split(",") if t)
    parts = props.get(FLUSH_PARTITIONS)
    return TableState(
        table=table,
        flush=int(props.get(FLUSH, "0")),
        flush_tables=members or frozenset({table}),
        timestamp_ms=timestamp_ms,
        watermarks=_watermarks_decoder.decode(props.get(WATERMARKS, "{}")),
        log_position=_position_decoder.decode(props.get(LOG_POSITION, "{}")),
        member=props.get(MEMBER, ""),
        partitions=None if parts is None else frozenset(int(p) for p in parts.split(",") if p),
    )


def table_states(table: str, props: Mapping[str, str], timestamp_ms: int) -> list[TableState]:
    """Every lane a snapshot carries: its own member's first, then the copies of others'."""
    own = table_state(table, props, timestamp_ms)
    out = [] if own is None else [own]
    for member, lane in _lanes_decoder.decode(props.get(LANES, "{}")).items():
        out.append(
            TableState(
                table=table,
                flush=lane.flush,
                flush_tables=frozenset(lane.flush_tables) or frozenset({table}),
                timestamp_ms=lane.timestamp_ms,
                watermarks=lane.watermarks,
                log_position=lane.log_position,
                member=member,
                partitions=None if lane.partitions is None else frozenset(lane.partitions),
            )
        )
    return out


def lanes_property(states: Iterable[TableState], member: str) -> dict[str, str]:
    """`k2.lanes` for a commit of `member`: every other member's latest state (empty when
    there is none, as for a daemon alone)."""
    lanes = {
        s.member: _Lane(
            flush=s.flush,
            flush_tables=sorted(s.flush_tables),
            timestamp_ms=s.timestamp_ms,
            watermarks=s.watermarks,
            log_position=s.log_position,
            partitions=None if s.partitions is None else sorted(s.partitions),
        )
        for s in states
        if s.member != member
    }
    return {LANES: _encoder.encode(lanes).decode()} if lanes else {}


def _partition(key: str) -> int | None:
    """The tracker partition of a log position key (`...@P`)."""
    _, _, part = key.rpartition("@")
    return int(part) if part.isdigit() else None


def _progress(state: K2State, partition: int) -> int:
    """How far a lane got in a shared partition: the sum of its Kafka offsets there."""
    total = -1
    for key, value in state.log_position.items():
        if _partition(key) == partition and key.startswith("kafka:") and isinstance(value, dict):
            total = max(total, 0) + int(value.get("offset", 0))
    return total


def merge_lanes(
    lanes: Mapping[str, K2State],
    own: str,
    partitions: int,
    partition_of: Callable[[str, str, int], int],
) -> tuple[dict[str, Watermark], dict[str, Any]]:
    """The state to resume from for member `own`: its own lane, with each shared partition
    (0 .. partitions-1) taken from the lane that got furthest in it. Kafka offsets only grow
    and a member that takes a partition over starts where the last owner committed, so the
    furthest lane holds the partition's latest state. Keys of other partitions (a member's
    local tracker) come from its own lane alone, or the unnamed lane of a daemon that ran
    alone before."""
    base = lanes.get(own) or lanes.get("") or K2State({}, {}, 0, {}, True)
    watermarks = dict(base.watermarks)
    position = dict(base.log_position)
    for p in range(partitions):
        best = max(lanes.values(), key=lambda s: _progress(s, p), default=None)
        if best is None or best is base or _progress(best, p) <= _progress(base, p):
            continue
        for key, value in best.log_position.items():
            if _partition(key) == p:
                position[key] = value
        for key, mark in best.watermarks.items():
            exchange, symbol, _ = key.split(":", 2)
            if partition_of(exchange, symbol, partitions) == p:
                watermarks[key] = mark
    return watermarks, position


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
