"""On start the trackers resume from committed watermarks and the ledger's open entries."""

from __future__ import annotations

from pathlib import Path

from k2d.app import tracker_state
from k2d.config import StorageConfig
from k2d.messages import Watermark
from k2d.model import SequenceEvent
from k2d.storage import Warehouse, events_to_arrow, flush_properties

T0 = 1_700_000_000_000_000


def row(
    event_id: str,
    status: str,
    first: int,
    last: int,
    at: int,
    kind: str = "gap",
    stream: str = "trade",
) -> SequenceEvent:
    return SequenceEvent(
        event_id=event_id,
        exchange="BINANCE",
        symbol="BTCUSDT",
        stream=stream,
        partition=0,
        kind=kind,
        status=status,
        first_missing=first,
        last_missing=last,
        missing_count=last - first + 1,
        detected_at=T0,
        recorded_at=at,
        window_start=T0 if kind == "outage" else None,
        window_end=T0 + 5 if kind == "outage" else None,
    )


def test_tracker_state_has_watermarks_and_only_still_open_entries(tmp_path: Path) -> None:
    wh = Warehouse(StorageConfig(data_dir=str(tmp_path)))
    wh.ensure_tables()
    events = [
        row("g1", "open", 10, 20, T0 + 1),
        row("g1", "open", 15, 20, T0 + 3),  # narrowed by late data
        row("g2", "open", 30, 31, T0 + 1),
        row("g2", "backfilled", 30, 31, T0 + 2),
        row("o1", "open", 40, 45, T0 + 1, kind="outage"),
    ]
    wm = {
        "BINANCE:BTCUSDT:trade": Watermark(last_sequence=100, platform_sequence=90, last_seen_us=T0)
    }
    props = flush_properties(
        flush=1, tables=["sequence_events"], watermarks=wm, log_position={}, batch_ids=(1,)
    )
    wh.append("sequence_events", events_to_arrow(events), props)

    state = tracker_state(wh)

    assert state.watermarks["BINANCE:BTCUSDT:trade"].last_sequence == 100
    (gap,) = state.open_gaps["BINANCE:BTCUSDT:trade"]
    assert (gap.event_id, gap.first, gap.last) == ("g1", 15, 20)
    (outage,) = state.open_outages["BINANCE:BTCUSDT:trade"]
    assert (outage.first, outage.last, outage.start_us) == (40, 45, T0)
