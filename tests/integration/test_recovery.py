"""Recovery reads only what it needs: the journal position of live partitions, and the part
of the ledger that can still hold an open entry."""

from __future__ import annotations

from pathlib import Path

from k2d.config import StorageConfig
from k2d.journal import JournalPosition
from k2d.messages import Watermark
from k2d.model import SequenceEvent
from k2d.recovery import committed_position, ledger_horizon, tracker_state
from k2d.storage import Warehouse, events_to_arrow, flush_properties

DAY = 86_400_000_000
T0 = 1_700_000_000_000_000
KEY = "BINANCE:BTCUSDT:trade"


def gap(event_id: str, detected: int, status: str = "open") -> SequenceEvent:
    return SequenceEvent(
        event_id=event_id,
        exchange="BINANCE",
        symbol="BTCUSDT",
        stream="trade",
        partition=0,
        kind="gap",
        status=status,
        first_missing=10,
        last_missing=20,
        missing_count=11,
        detected_at=detected,
        recorded_at=detected + 1,
    )


def test_journal_keys_of_removed_partitions_do_not_pin_the_replay() -> None:
    log_position = {
        "journal:feed-binance@0": {"segment": 9, "offset": 500},
        "journal:feed-binance@1": {"segment": 9, "offset": 400},
        # Left by a run with four partitions; this one has two.
        "journal:feed-binance@3": {"segment": 2, "offset": 100},
        "journal:other@0": {"segment": 1, "offset": 1},
    }
    assert committed_position(log_position, "journal:feed-binance", 2) == JournalPosition(9, 400)
    assert committed_position(log_position, "journal:feed-binance", 4) == JournalPosition(2, 100)
    assert committed_position({}, "journal:feed-binance", 2) is None


def test_the_ledger_horizon_comes_from_the_watermarks() -> None:
    def wm(open_since: int | None) -> Watermark:
        return Watermark(
            last_sequence=1, platform_sequence=1, last_seen_us=T0, open_since=open_since
        )

    assert ledger_horizon({}) == 0
    assert ledger_horizon({"a": wm(0), "b": wm(0)}) == 0
    assert ledger_horizon({"a": wm(T0 + 5), "b": wm(T0 + 2), "c": wm(0)}) == T0 + 2
    assert ledger_horizon({"a": wm(T0), "b": wm(None)}) is None, "an older k2d: read it all"


def write(wh: Warehouse, events: list[SequenceEvent], open_since: int | None, flush: int) -> None:
    wm = {
        KEY: Watermark(
            last_sequence=100, platform_sequence=1, last_seen_us=T0, open_since=open_since
        )
    }
    props = flush_properties(
        flush=flush, tables=["sequence_events"], watermarks=wm, log_position={}, batch_ids=(flush,)
    )
    wh.append("sequence_events", events_to_arrow(events), props)


def test_restore_reads_the_ledger_only_from_the_oldest_open_entry(tmp_path: Path) -> None:
    wh = Warehouse(StorageConfig(data_dir=str(tmp_path)))
    wh.ensure_tables()
    # A year-old entry left open by an older k2d, then one open entry today.
    write(wh, [gap("old", T0 - 365 * DAY), gap("today", T0)], open_since=None, flush=1)
    assert {g.event_id for g in tracker_state(wh).open_gaps[KEY]} == {"old", "today"}

    write(wh, [gap("later", T0 + 10)], open_since=T0, flush=2)
    restored = {g.event_id for g in tracker_state(wh).open_gaps[KEY]}
    assert restored == {"today", "later"}, "partitions before the horizon are not read"

    write(wh, [gap("today", T0, "backfilled"), gap("later", T0 + 10, "backfilled")], 0, 3)
    assert tracker_state(wh).open_gaps == {}
