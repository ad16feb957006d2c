"""Recovery: what every start of the capture chain does before its first frame.

The same steps run at process start and after any failure inside the chain, so that the
tables end up exactly as if the process had been killed at that moment and restarted:
roll back a flush that was cut short, restore the trackers from the committed snapshot and
the ledger, and reopen the journal to replay what follows the committed position.
Blocking throughout (pyiceberg, SQLite, file I/O): callers run it in a worker thread.
"""

from __future__ import annotations

import logging
import socket
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from k2d.config import Config
from k2d.journal import Journal, JournalOptions, JournalPosition, last_record
from k2d.messages import Watermark
from k2d.model import partition_of
from k2d.sequence import OpenGap, OpenOutage, TrackerState
from k2d.storage import Warehouse

__all__ = [
    "FEED",
    "Recovered",
    "committed_position",
    "instance_id",
    "journal_key",
    "lane",
    "ledger_horizon",
    "open_journal",
    "recover",
    "shared_partitions",
    "tracker_partitions",
    "tracker_state",
]

log = logging.getLogger(__name__)

FEED = "feed-binance"


@dataclass
class Recovered:
    """Where the chain resumes: tracker state, and the journal to replay after
    `replay_after`. `last_capture_us` is when the last frame that survived was received:
    the silence since then becomes an outage in the ledger."""

    trackers: TrackerState
    journal: Journal | None
    replay_after: JournalPosition | None
    last_capture_us: int | None
    # Tables whose part of a cut-short flush was undone, with the snapshot that undid it.
    rolled_back: dict[str, int]
    # Why capture stopped before this start, for the outage row.
    down_reason: str = "daemon down"


def tracker_partitions(cfg: Config) -> int:
    """Trackers that own symbols: one per Kafka partition in Kafka mode (the local tracker
    that follows the feed's journal comes on top), else `pipeline.partitions`."""
    return cfg.kafka.partitions if cfg.kafka.enabled else cfg.pipeline.partitions


def lane(cfg: Config) -> str:
    """This daemon's lane in the tables' k2 state: in Kafka mode its member id in the
    group (several daemons may share the tables), else the one unnamed lane."""
    if not cfg.kafka.enabled:
        return ""
    return cfg.kafka.instance_id or instance_id(cfg)


def shared_partitions(cfg: Config) -> int:
    """Partitions whose state other daemons may carry on (Kafka's); 0 in embedded mode."""
    return cfg.kafka.partitions if cfg.kafka.enabled else 0


def instance_id(cfg: Config) -> str:
    """A stable member id for this daemon: its host and data dir."""
    where = str(cfg.storage.data_path().resolve()).encode()
    return f"k2d-{socket.gethostname()}-{zlib.crc32(where):08x}"


def journal_key(cfg: Config) -> tuple[str, int]:
    """The log_position key whose least per-tracker value is where the journal's replay
    starts, and how many trackers count. In Kafka mode that is the position up to which
    Kafka acknowledged the feed's data, carried by the local tracker alone."""
    if cfg.kafka.enabled:
        return f"produced:{FEED}", cfg.kafka.partitions + 1
    return f"journal:{FEED}", cfg.pipeline.partitions


def recover(cfg: Config, warehouse: Warehouse, after: str | None = None) -> Recovered:
    """Undo a cut-short flush, then read the committed state and open the journal. `after`
    names the failure this recovery follows (None: the process start)."""
    member = lane(cfg)
    rolled = {
        t: warehouse.current_snapshot_id(t) for t in warehouse.roll_back_incomplete_flush(member)
    }
    state = tracker_state(warehouse, tracker_partitions(cfg), member, shared_partitions(cfg))
    journal = replay_after = None
    last_capture: int | None = None
    if cfg.journal.enabled and cfg.feeds.binance.enabled:
        journal, replay_after = open_journal(cfg, state.log_position)
        try:
            last = last_record(journal.directory, FEED)
        except BaseException:
            journal.close()  # or its lock would refuse the next recovery's open
            raise
        last_capture = last[1] if last else None
    elif state.watermarks:
        # No journal: what was not committed is gone; the outage starts at the last commit.
        last_capture = max(w.last_seen_us for w in state.watermarks.values()) or None
    reason = f"capture restarted after: {after}" if after else "daemon down"
    return Recovered(state, journal, replay_after, last_capture, rolled, reason[:500])


def open_journal(
    cfg: Config, log_position: dict[str, Any]
) -> tuple[Journal, JournalPosition | None]:
    """Open the feed's journal (repairing a torn tail) and say where its replay starts."""
    committed = committed_position(log_position, *journal_key(cfg))
    jc = cfg.journal
    journal = Journal(
        jc.path(cfg.storage),
        FEED,
        JournalOptions(
            segment_bytes=jc.segment_bytes,
            buffer_bytes=jc.buffer_bytes,
            fsync_interval=jc.fsync_interval,
            max_frame_bytes=jc.max_frame_bytes,
        ),
    )
    journal.open(committed=committed)
    log.info("journal %s: replay after %s", journal.path, committed)
    return journal, committed


def committed_position(
    log_position: dict[str, Any], key: str, partitions: int
) -> JournalPosition | None:
    """The journal position every tracker has committed: the least of the per-partition
    ones. Keys of partitions that no longer exist (after lowering `pipeline.partitions`)
    are ignored, or they would pin replay and retention at their old position forever."""
    found = []
    for k, v in log_position.items():
        name, _, part = k.rpartition("@")
        if name == key and part.isdigit() and int(part) < partitions and isinstance(v, dict):
            found.append(JournalPosition.from_json(v))
    return min(found) if found else None


def ledger_horizon(watermarks: dict[str, Watermark]) -> int | None:
    """The detected_at from which the ledger can hold an open entry: 0 when none is open,
    None when a watermark does not say (written by an older k2d: read the whole ledger)."""
    if not watermarks:
        return 0
    since = []
    for w in watermarks.values():
        if w.open_since is None:
            return None
        if w.open_since:
            since.append(w.open_since)
    return min(since, default=0)


def tracker_state(
    warehouse: Warehouse, partitions: int = 1, member: str = "", shared: int = 0
) -> TrackerState:
    """Committed watermarks plus the ledger's open gaps and outages, for the trackers
    (`member`, `shared`: see lane() and shared_partitions()).

    Only the part of the ledger that can hold an open entry is read (the watermarks say
    since when), so a restart costs the same on the first day and after a year."""
    watermarks, log_position = warehouse.latest_k2_state(member, shared)
    state = TrackerState(watermarks=watermarks, log_position=log_position)
    horizon = ledger_horizon(watermarks)
    rows = [] if horizon == 0 else warehouse.open_ledger_rows(since_us=horizon)
    for row in rows:
        key = f"{row['exchange']}:{row['symbol']}:{row['stream']}"
        detected = _us(row["detected_at"])
        if row["kind"] == "gap" and row["first_missing"] is not None:
            state.open_gaps.setdefault(key, []).append(
                OpenGap(
                    row["event_id"],
                    row["first_missing"],
                    row["last_missing"],
                    detected,
                    emitted=True,
                    partition=partition_of(row["exchange"], row["symbol"], partitions),
                    span=(row["span_first"], row["span_last"]),
                )
            )
        elif row["kind"] == "outage":
            first, last = row["first_missing"], row["last_missing"]
            state.open_outages.setdefault(key, []).append(
                OpenOutage(
                    row["event_id"],
                    _us(row["window_start"]),
                    _us(row["window_end"]),
                    detected,
                    row["detail"],
                    after=None if first is None else first - 1,
                    first=first,
                    last=last,
                )
            )
    return state


def _us(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000)
    return int(value)
