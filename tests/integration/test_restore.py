"""On start the trackers resume from committed watermarks and the ledger's open entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from k2d.config import StorageConfig
from k2d.messages import Watermark
from k2d.model import SequenceEvent
from k2d.recovery import tracker_state
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


def test_a_flush_cut_short_by_a_crash_is_rolled_back_on_every_table(tmp_path: Path) -> None:
    from k2d.model import Trade
    from k2d.storage import trades_to_arrow

    def trades(ids: range) -> Any:
        return trades_to_arrow(
            [
                Trade(
                    message_id=f"BINANCE:BTCUSDT:trade:{i}",
                    trade_id=str(i),
                    symbol="BTCUSDT",
                    exchange="BINANCE",
                    asset_class="crypto",
                    timestamp=T0 + i,
                    price="1.00000000",
                    quantity="1.00000000",
                    currency="USDT",
                    side="BUY",
                    source_sequence=i,
                    ingestion_timestamp=T0,
                )
                for i in ids
            ]
        )

    def wm(seq: int) -> dict[str, Watermark]:
        return {
            "BINANCE:BTCUSDT:trade": Watermark(
                last_sequence=seq, platform_sequence=seq, last_seen_us=T0
            )
        }

    wh = Warehouse(StorageConfig(data_dir=str(tmp_path)))
    wh.ensure_tables()
    both = ["trades", "sequence_events"]
    p1 = flush_properties(
        flush=1, tables=both, watermarks=wm(9), log_position={"j": 1}, batch_ids=(1,)
    )
    wh.append("trades", trades(range(0, 10)), p1)
    wh.append("sequence_events", events_to_arrow([row("g", "open", 3, 3, T0)]), p1)
    # Flush 2 reaches trades, then the process dies before sequence_events commits.
    p2 = flush_properties(
        flush=2, tables=both, watermarks=wm(19), log_position={"j": 2}, batch_ids=(2,)
    )
    wh.append("trades", trades(range(10, 20)), p2)

    # A batch load lands after the crash, before the restart: it must survive the undo.
    wh.append("trades", trades(range(100, 105)), {"k2.batch_files": "{}"})

    assert wh.roll_back_incomplete_flush() == ["trades"]

    ids = sorted(wh.load_table("trades").scan().to_arrow().column("source_sequence").to_pylist())
    assert ids == [*range(0, 10), *range(100, 105)]
    state = wh.k2_state()
    assert state.complete
    assert state.log_position == {"j": 1}
    assert state.watermarks["BINANCE:BTCUSDT:trade"].last_sequence == 9
    assert wh.roll_back_incomplete_flush() == []
