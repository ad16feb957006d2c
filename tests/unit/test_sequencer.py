"""SequenceTracker: gaps, duplicates, reorders, resets — checked through the ledger rows."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.sequencer import SequenceTracker
from k2d.config import SequencerConfig
from k2d.messages import GapRequest, GapResolution, Outage, RecordBatch
from k2d.model import SequenceEvent, Trade
from k2d.sequence import StreamBook
from k2d.storage import batch_columns
from k2d.telemetry.metrics import Metrics

CFG = SequencerConfig(gap_grace=0.0)


def trade(seq: int, symbol: str = "BTCUSDT", provenance: str = "live") -> Trade:
    return Trade(
        message_id=f"BINANCE:{symbol}:trade:{seq}",
        trade_id=str(seq),
        symbol=symbol,
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=1_700_000_000_000_000 + seq,
        price="1.00000000",
        quantity="1.00000000",
        currency="USDT",
        side="BUY",
        source_sequence=seq,
        ingestion_timestamp=1_700_000_000_000_000,
        provenance=provenance,
    )


def open_gap_ids(events: list[SequenceEvent]) -> set[int]:
    """Ledger semantics: the latest row per event_id is its status."""
    latest: dict[str, SequenceEvent] = {}
    for e in events:
        if e.kind == "gap":
            latest[e.event_id] = e
    ids: set[int] = set()
    for e in latest.values():
        if e.status == "open":
            assert e.first_missing is not None and e.last_missing is not None
            ids.update(range(e.first_missing, e.last_missing + 1))
    return ids


def run_tracker(
    batches: list[list[int]], cfg: SequencerConfig = CFG, clock_step: int = 1
) -> tuple[list[int], list[SequenceEvent]]:
    ticks = itertools.count(1_700_000_000_000_000, clock_step)
    tracker = SequenceTracker(0, cfg, Metrics(), itertools.count(), clock=lambda: next(ticks))
    stored: list[int] = []
    events: list[SequenceEvent] = []
    for ids in batches:
        out = tracker.process(RecordBatch(source="test", trades=[trade(i) for i in ids]))
        stored.extend(int(t.trade_id) for t in out.trades)
        events.extend(out.events)
    events.extend(tracker.flush_all().events)
    return stored, events


@st.composite
def venue_stream(draw: st.DrawFn) -> tuple[list[list[int]], set[int]]:
    n = draw(st.integers(min_value=1, max_value=300))
    start = draw(st.integers(min_value=1, max_value=10**9))
    ids = list(range(start, start + n))
    wire: list[int] = []
    for i in ids:
        action = draw(st.sampled_from(["send", "send", "send", "drop", "dup"]))
        if action == "send":
            wire.append(i)
        elif action == "dup":
            wire.extend([i, i])
    # Local reorders: swap neighbours, as a venue or a reconnect overlap would.
    for _ in range(draw(st.integers(min_value=0, max_value=len(wire) // 3 + 1))):
        if len(wire) >= 2:
            j = draw(st.integers(min_value=0, max_value=len(wire) - 2))
            wire[j], wire[j + 1] = wire[j + 1], wire[j]
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(wire)), max_size=5)))
    batches = [wire[a:b] for a, b in itertools.pairwise([0, *cuts, len(wire)])]
    return batches, set(wire)


@settings(max_examples=300, deadline=None)
@given(venue_stream())
def test_open_gaps_are_exactly_the_missing_ids_and_no_duplicate_is_stored(
    case: tuple[list[list[int]], set[int]],
) -> None:
    batches, received = case
    stored, events = run_tracker(batches)
    assert len(stored) == len(set(stored)), "a duplicate reached the writer"
    assert set(stored) == received
    if received:
        expected_missing = set(range(min(received), max(received) + 1)) - received
        assert open_gap_ids(events) == expected_missing


def test_in_order_stream_opens_no_gap() -> None:
    stored, events = run_tracker([[1, 2, 3], [4, 5]])
    assert stored == [1, 2, 3, 4, 5]
    assert [e for e in events if e.kind == "gap"] == []


def test_gap_is_opened_with_its_range_then_closed_by_late_arrival() -> None:
    stored, events = run_tracker([[10, 11, 15], [16], [12, 13, 14]])
    gaps = [e for e in events if e.kind == "gap"]
    assert gaps[0].status == "open"
    assert (gaps[0].first_missing, gaps[0].last_missing, gaps[0].missing_count) == (12, 14, 3)
    assert gaps[-1].status == "backfilled" and gaps[-1].event_id == gaps[0].event_id
    assert open_gap_ids(events) == set()
    assert sorted(stored) == list(range(10, 17))


def test_reorder_inside_grace_period_never_reaches_the_ledger() -> None:
    cfg = SequencerConfig(gap_grace=10.0)
    stored, events = run_tracker([[1, 3], [2, 4]], cfg=cfg)
    assert sorted(stored) == [1, 2, 3, 4]
    assert [e for e in events if e.kind == "gap"] == []


def test_duplicates_are_dropped_and_counted_in_an_info_row() -> None:
    stored, events = run_tracker([[1, 2, 2, 3], [3, 1]])
    assert stored == [1, 2, 3]
    dups = [e for e in events if e.kind == "duplicate"]
    assert len(dups) == 1 and dups[0].status == "info" and dups[0].missing_count == 3


def test_session_reset_after_quiet_period_restarts_the_sequence() -> None:
    cfg = SequencerConfig(gap_grace=0.0, reset_quiet_period=1.0, reset_min_drop=100)
    # Each tracker batch advances the clock by 2 s: longer than the quiet period.
    stored, events = run_tracker([[5000, 5001], [7, 8, 9]], cfg=cfg, clock_step=2_000_000)
    assert stored == [5000, 5001, 7, 8, 9]
    resets = [e for e in events if e.kind == "session_reset"]
    assert len(resets) == 1 and resets[0].first_missing == 7


def test_far_lower_id_without_silence_is_a_duplicate_not_a_reset() -> None:
    cfg = SequencerConfig(gap_grace=0.0, reset_quiet_period=300.0, reset_min_drop=100)
    stored, events = run_tracker([[5000, 5001], [7]], cfg=cfg)
    assert stored == [5000, 5001]
    assert not [e for e in events if e.kind == "session_reset"]


def test_split_gap_keeps_both_halves_open() -> None:
    _stored, events = run_tracker([[1, 10], [5]])
    assert open_gap_ids(events) == {2, 3, 4, 6, 7, 8, 9}


def test_quotes_only_need_to_grow() -> None:
    book = StreamBook(("BINANCE", "BTCUSDT", "quote"), 0, CFG, contiguous=False)
    events: list[SequenceEvent] = []
    verdicts = [book.check(u, 1, "live", events) for u in (10, 25, 25, 20, 40)]
    assert verdicts == [True, True, False, False, True]
    book.emit_pending(1, events, force=True)
    assert [e.kind for e in events if e.kind == "gap"] == []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.none() | st.integers(95, 130) | st.sampled_from([10**7, 2 * 10**7]), max_size=8),
    st.booleans(),
)
def test_a_batch_goes_on_alike_as_a_list_and_as_arrow(
    ids: list[int | None], contiguous: bool
) -> None:
    """Small batches' ids are checked as Python lists, large ones as Arrow arrays."""
    from k2d.messages import Watermark

    wm = Watermark(last_sequence=100, platform_sequence=100, last_seen_us=1)
    book = StreamBook(("BINANCE", "BTCUSDT", "t"), 0, CFG, contiguous=contiguous, watermark=wm)
    as_arrow = book.goes_on(pa.array(ids, pa.int64()))
    assert book.goes_on(ids) == as_arrow
    if ids and None not in ids and contiguous:
        assert as_arrow == (ids == list(range(101, 101 + len(ids))))


def test_restored_watermark_drops_replayed_ids_and_opens_downtime_gap() -> None:
    from k2d.messages import Watermark

    wm = Watermark(last_sequence=100, platform_sequence=100, last_seen_us=1)
    book = StreamBook(("BINANCE", "BTCUSDT", "trade"), 0, CFG, contiguous=True, watermark=wm)
    events: list[SequenceEvent] = []
    assert [book.check(i, 2, "live", events) for i in (99, 100, 105)] == [False, False, True]
    book.emit_pending(2, events, force=True)
    assert open_gap_ids(events) == {101, 102, 103, 104}


# -- backfill requests, resolutions and outages ----------------------------------------------


def latest(events: list[SequenceEvent]) -> dict[str, SequenceEvent]:
    out: dict[str, SequenceEvent] = {}
    for e in events:
        out[e.event_id] = e
    return out


def make_tracker(clock_start: int = 1_700_000_000_000_000) -> tuple[SequenceTracker, Any]:
    ticks = itertools.count(clock_start, 1_000)
    send, recv = anyio.create_memory_object_stream[GapRequest](10)
    tracker = SequenceTracker(
        0, CFG, Metrics(), itertools.count(), clock=lambda: next(ticks), gap_requests=send
    )
    return tracker, recv


def test_an_emitted_gap_is_requested_from_the_backfiller_once() -> None:
    tracker, requests = make_tracker()
    tracker.process(RecordBatch(source="t", trades=[trade(1), trade(5)]))
    tracker.process(RecordBatch(source="t", trades=[trade(6)]))
    req = requests.receive_nowait()
    assert (req.symbol, req.stream, req.first, req.last) == ("BTCUSDT", "trade", 2, 4)
    with pytest.raises(anyio.WouldBlock):
        requests.receive_nowait()


def test_unrecoverable_part_is_closed_and_the_rest_stays_open_until_backfilled() -> None:
    tracker, _ = make_tracker()
    events = tracker.process(RecordBatch(source="t", trades=[trade(9), trade(21)])).events
    res = GapResolution(
        exchange="BINANCE",
        symbol="BTCUSDT",
        stream="trade",
        first=10,
        last=14,
        status="unrecoverable",
        reason="venue history starts at id 15",
    )
    events += tracker.process(RecordBatch(source="backfill", resolutions=[res])).events
    rows = latest(events)
    gone = [e for e in rows.values() if e.status == "unrecoverable"]
    assert [(e.first_missing, e.last_missing, e.detail) for e in gone] == [
        (10, 14, "venue history starts at id 15")
    ]
    assert open_gap_ids(events) == {15, 16, 17, 18, 19, 20}
    fill = [trade(i, provenance="backfill") for i in range(15, 21)]
    out = tracker.process(RecordBatch(source="backfill", trades=fill))
    events += out.events
    assert [int(t.trade_id) for t in out.trades] == list(range(15, 21))
    assert open_gap_ids(events) == set()
    assert any(e.status == "backfilled" for e in latest(events).values())


def test_trade_outage_gets_its_id_range_from_the_next_trade_and_closes_with_the_gap() -> None:
    tracker, _ = make_tracker()
    events = tracker.process(RecordBatch(source="t", trades=[trade(100)])).events
    outage = Outage(
        source="feed",
        exchange="BINANCE",
        symbols=("BTCUSDT",),
        streams=("trade", "quote"),
        start_us=1,
        end_us=2,
        reason="disconnect",
    )
    events += tracker.process(RecordBatch(source="t", outages=[outage], trades=[trade(105)])).events
    rows = [e for e in latest(events).values() if e.kind == "outage"]
    by_stream = {e.stream: e for e in rows}
    assert by_stream["quote"].status == "unrecoverable"
    assert (
        by_stream["trade"].status,
        by_stream["trade"].first_missing,
        by_stream["trade"].last_missing,
    ) == ("open", 101, 104)
    assert (by_stream["trade"].window_start, by_stream["trade"].window_end) == (1, 2)
    fill = [trade(i, provenance="backfill") for i in range(101, 105)]
    events += tracker.process(RecordBatch(source="backfill", trades=fill)).events
    trade_outage = latest(events)[by_stream["trade"].event_id]
    assert trade_outage.status == "backfilled"


def test_outage_that_missed_no_trade_closes_at_once() -> None:
    tracker, _ = make_tracker()
    tracker.process(RecordBatch(source="t", trades=[trade(100)]))
    outage = Outage(
        source="feed",
        exchange="BINANCE",
        symbols=("BTCUSDT",),
        streams=("trade",),
        start_us=1,
        end_us=2,
        reason="disconnect",
    )
    events = tracker.process(RecordBatch(source="t", outages=[outage], trades=[trade(101)])).events
    (row,) = [e for e in latest(events).values() if e.kind == "outage"]
    assert row.status == "backfilled" and "no trades missed" in row.detail


def test_gaps_inside_the_grace_period_survive_a_restart_through_the_watermark() -> None:
    cfg = SequencerConfig(gap_grace=60.0)
    book = StreamBook(("BINANCE", "BTCUSDT", "trade"), 0, cfg, contiguous=True)
    events: list[SequenceEvent] = []
    assert all(book.check(i, 1, "live", events) for i in (1, 2, 6))
    wm = book.watermark()
    assert wm.pending_gaps == ((3, 5, 1),) and events == []
    # The process dies; a new book resumes from the committed watermark alone.
    again = StreamBook(("BINANCE", "BTCUSDT", "trade"), 0, cfg, contiguous=True, watermark=wm)
    assert again.check(4, 2, "backfill", events)
    assert not again.check(2, 2, "replay", events)
    again.emit_pending(3, events, force=True)
    assert open_gap_ids(events) == {3, 5}


@settings(max_examples=300, deadline=None)
@given(venue_stream())
def test_a_closing_row_names_its_whole_range_and_every_id_in_it_is_stored(
    case: tuple[list[list[int]], set[int]],
) -> None:
    batches, _received = case
    stored, events = run_tracker(batches)
    closed = [e for e in events if e.kind == "gap" and e.status == "backfilled"]
    for row in closed:
        assert row.first_missing is not None and row.last_missing is not None, row
        assert row.missing_count == row.last_missing - row.first_missing + 1
        ids = set(range(row.first_missing, row.last_missing + 1))
        assert ids <= set(stored), f"{row.event_id} says backfilled for ids never stored"
    latest: dict[str, SequenceEvent] = {}
    for e in events:
        if e.kind == "gap":
            latest[e.event_id] = e
    still_open = open_gap_ids(events)
    for row in latest.values():
        if row.status == "backfilled":
            assert row.first_missing is not None and row.last_missing is not None
            ids = set(range(row.first_missing, row.last_missing + 1))
            assert not ids & still_open, "a closed range overlaps one the ledger shows open"


def test_backfilled_row_carries_the_range_the_gap_opened_with() -> None:
    _, events = run_tracker([[10, 15], [12], [11, 13, 14]])
    rows = [e for e in events if e.kind == "gap"]
    assert (rows[0].status, rows[0].first_missing, rows[0].last_missing) == ("open", 11, 14)
    closing = [e for e in rows if e.status == "backfilled"]
    spans = sorted((e.first_missing, e.last_missing, e.missing_count) for e in closing)
    # 12 split the gap: the head keeps the event (11..11), the tail is its own (13..14).
    assert spans == [(11, 11, 1), (13, 14, 2)]


def test_a_jump_beyond_max_jump_is_a_new_session_not_a_gap() -> None:
    cfg = SequencerConfig(gap_grace=0.0, max_jump=1_000)
    stored, events = run_tracker([[1, 2, 3], [10**12], [10**12 + 1, 10**12 + 2]], cfg)
    assert stored == [1, 2, 3, 10**12, 10**12 + 1, 10**12 + 2]
    assert [e for e in events if e.kind == "gap"] == []
    (reset,) = [e for e in events if e.kind == "session_reset"]
    assert (reset.status, reset.first_missing, reset.last_missing) == ("info", 4, 10**12 - 1)


def test_a_stray_id_far_ahead_does_not_swallow_the_trades_after_it() -> None:
    cfg = SequencerConfig(gap_grace=0.0, max_jump=1_000)
    ids = [*list(range(1, 101)), 2**62, *list(range(101, 201))]
    stored, events = run_tracker([ids[:50], ids[50:120], ids[120:]], cfg)
    assert set(range(1, 201)) <= set(stored), "live trades after the stray id were dropped"
    assert [e for e in events if e.kind == "gap"] == []
    details = [e.detail for e in events if e.kind == "session_reset"]
    assert len(details) == 2 and "stray id" in details[1]


def test_replayed_records_never_start_a_session_after_a_long_silence() -> None:
    cfg = SequencerConfig(gap_grace=0.0, reset_quiet_period=1.0, reset_min_drop=10)
    ticks = itertools.count(1_700_000_000_000_000, 10_000_000)  # 10 s between batches
    tracker = SequenceTracker(0, cfg, Metrics(), itertools.count(), clock=lambda: next(ticks))
    tracker.process(RecordBatch(source="t", trades=[trade(i) for i in range(100, 200)]))
    out = tracker.process(
        RecordBatch(source="t", trades=[trade(i, provenance="replay") for i in range(150, 160)])
    )
    assert out.trades == [], "replayed ids already stored are duplicates"
    assert [e for e in out.events if e.kind == "session_reset"] == []


def test_watermark_says_since_when_the_ledger_has_an_open_entry() -> None:
    ticks = itertools.count(1_700_000_000_000_000, 1)
    tracker = SequenceTracker(0, CFG, Metrics(), itertools.count(), clock=lambda: next(ticks))
    out = tracker.process(RecordBatch(source="t", trades=[trade(1), trade(2)]))
    assert out.watermarks["BINANCE:BTCUSDT:trade"].open_since == 0
    out = tracker.process(RecordBatch(source="t", trades=[trade(5)]))
    (gap,) = [e for e in out.events if e.kind == "gap"]
    assert out.watermarks["BINANCE:BTCUSDT:trade"].open_since == gap.detected_at
    out = tracker.process(RecordBatch(source="t", trades=[trade(3), trade(4)]))
    assert out.watermarks["BINANCE:BTCUSDT:trade"].open_since == 0


def _tracker() -> SequenceTracker:
    ticks = itertools.count(1_700_000_000_000_000, 7)
    cfg = SequencerConfig(gap_grace=0.0, max_jump=50, max_reorder=20)
    return SequenceTracker(0, cfg, Metrics(), itertools.count(), clock=lambda: next(ticks))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(["BTCUSDT", "ETHUSDT", "SOLUSDT"]),
                st.sampled_from(["next"] * 8 + ["skip", "back", "jump", "dup"]),
                st.sampled_from(["live"] * 4 + ["replay", "backfill"]),
            ),
            min_size=1,
            max_size=30,
        ),
        min_size=1,
        max_size=8,
    )
)
def test_a_batch_of_columns_is_checked_as_its_records_are(
    batches: list[list[tuple[str, str, str]]],
) -> None:
    """The feed hands the tracker Arrow columns; whatever the ids do, the rows kept, their
    numbers, the ledger rows and the watermarks are those of the same batch as records
    (each symbol's rows in their order: the columns keep a symbol's rows together)."""
    as_records, as_columns = _tracker(), _tracker()
    last: dict[str, int] = {}
    for spec in batches:
        rows = []
        for symbol, move, provenance in spec:
            top = last.get(symbol, 100)
            seq = {"next": top + 1, "skip": top + 3, "back": top - 2, "jump": top + 80}.get(
                move, top
            )
            last[symbol] = max(top, seq)
            rows.append(trade(seq, symbol, provenance))
        columns = batch_columns(RecordBatch(source="test", trades=rows), "trades")
        want = as_records.process(RecordBatch(source="test", trades=rows))
        got = as_columns.process(RecordBatch(source="test", columns={"trades": columns}))

        # Each symbol's rows (and ledger rows) in order; the columns hold a symbol's together.
        def by_symbol(rows: list[Any]) -> list[Any]:
            return sorted(rows, key=lambda r: r.symbol)

        assert by_symbol(got.trades) == by_symbol(want.trades)
        assert by_symbol(got.events) == by_symbol(want.events)
        assert got.watermarks == want.watermarks


def test_an_in_order_batch_of_columns_numbers_each_symbol_on() -> None:
    tracker = _tracker()
    first = [trade(i, s) for i in (1, 2) for s in ("BTCUSDT", "ETHUSDT")]
    tracker.process(RecordBatch(source="test", trades=first))
    rows = [trade(i, s) for i in (3, 4, 5) for s in ("ETHUSDT", "BTCUSDT")]
    columns = batch_columns(RecordBatch(source="test", trades=rows), "trades")

    out = tracker.process(RecordBatch(source="test", columns={"trades": columns}))

    assert out.columns["trades"].num_rows == 6 and out.events == []
    assert [(t.symbol, t.source_sequence, t.platform_sequence) for t in out.trades] == [
        ("ETHUSDT", 3, 3),
        ("ETHUSDT", 4, 4),
        ("ETHUSDT", 5, 5),
        ("BTCUSDT", 3, 3),
        ("BTCUSDT", 4, 4),
        ("BTCUSDT", 5, 5),
    ]
