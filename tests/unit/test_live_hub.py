"""LiveHub and Fanout: live rows published at once per channel, backfilled rows and ledger rows
once committed, nothing published twice after a recovery, and subscribers that outlive the
hub of a capture round."""

from __future__ import annotations

import tracemalloc
from collections import deque
from typing import Any

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.live_hub import Fanout, LiveHub, Published
from k2d.config import LiveConfig
from k2d.messages import Committed, SequencedBatch
from k2d.model import Quote, SequenceEvent, Trade
from k2d.runtime import Registry
from k2d.telemetry.metrics import Metrics

T0 = 1_709_251_200_000_000


def trade(i: int, symbol: str = "BTCUSDT", provenance: str = "live") -> Trade:
    return Trade(
        message_id=f"BINANCE:{symbol}:trade:{i}",
        trade_id=str(i),
        symbol=symbol,
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=T0 + i,
        price="1.00000000",
        quantity="1.00000000",
        currency="USDT",
        side="BUY",
        source_sequence=i,
        ingestion_timestamp=T0 + i,
        provenance=provenance,
    )


def quote(i: int) -> Quote:
    return Quote(
        message_id=f"BINANCE:BTCUSDT:quote:{i}",
        symbol="BTCUSDT",
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=T0 + i,
        bid_price="1",
        bid_quantity="1",
        ask_price="2",
        ask_quantity="1",
        currency="USDT",
        source_sequence=i,
        ingestion_timestamp=T0 + i,
    )


def gap(status: str, kind: str = "gap", stream: str = "trade") -> SequenceEvent:
    return SequenceEvent(
        event_id="BINANCE:BTCUSDT:trade:gap:5",
        exchange="BINANCE",
        symbol="BTCUSDT",
        stream=stream,
        partition=0,
        kind=kind,
        status=status,
        first_missing=5,
        last_missing=6,
        missing_count=2,
        detected_at=T0,
    )


def batch(
    batch_id: int,
    trades: list[Trade] = (),  # type: ignore[assignment]
    quotes: list[Quote] = (),  # type: ignore[assignment]
    events: list[SequenceEvent] = (),  # type: ignore[assignment]
) -> SequencedBatch:
    return SequencedBatch(
        batch_id=batch_id,
        partition=0,
        trades=list(trades),
        quotes=list(quotes),
        events=list(events),
        dead_letters=[],
        watermarks={},
    )


def committed(table: str, *batch_ids: int) -> Committed:
    return Committed(
        table=table, snapshot_id=1, files=(), batch_ids=batch_ids, rows=0, committed_at=0
    )


class Recorder:
    def __init__(self) -> None:
        self.items: list[Published] = []

    def deliver(self, item: Published) -> None:
        self.items.append(item)

    def seen(self) -> list[tuple[str, str, list[Any]]]:
        return [
            (
                i.channel,
                i.kind,
                [getattr(r, "source_sequence", None) or getattr(r, "status", None) for r in i.rows],
            )
            for i in self.items
        ]


def hub(fanout: Fanout) -> LiveHub:
    return LiveHub(LiveConfig(), Metrics(Registry()), fanout)


def test_live_rows_go_to_the_subscribers_of_their_channel_at_once() -> None:
    fanout = Fanout()
    btc, eth, quotes = Recorder(), Recorder(), Recorder()
    fanout.subscribe("trades:BINANCE:BTCUSDT", btc)
    fanout.subscribe("trades:BINANCE:ETHUSDT", eth)
    fanout.subscribe("quotes:BINANCE:BTCUSDT", quotes)
    h = hub(fanout)
    h.add(batch(1, [trade(1), trade(1, "ETHUSDT"), trade(2)], [quote(1)]))
    assert btc.seen() == [("trades:BINANCE:BTCUSDT", "trades", [1, 2])]
    assert eth.seen() == [("trades:BINANCE:ETHUSDT", "trades", [1])]
    assert quotes.seen() == [("quotes:BINANCE:BTCUSDT", "quotes", [1])]
    fanout.unsubscribe("trades:BINANCE:BTCUSDT", btc)
    h.add(batch(2, [trade(3)]))
    assert len(btc.items) == 1
    # Every subscriber of a channel gets the same object: encoded once, shared by all.
    other = Recorder()
    fanout.subscribe("trades:BINANCE:ETHUSDT", other)
    h.add(batch(3, [trade(2, "ETHUSDT")]))
    assert eth.items[-1] is other.items[-1]


def test_backfilled_rows_and_ledger_rows_are_published_once_committed() -> None:
    fanout = Fanout()
    sub = Recorder()
    fanout.subscribe("trades:BINANCE:BTCUSDT", sub)
    h = hub(fanout)
    h.add(batch(1, [trade(4), trade(7)], events=[gap("open")]))
    assert sub.seen() == [("trades:BINANCE:BTCUSDT", "trades", [4, 7])]
    h.add(batch(2, [trade(5, provenance="backfill"), trade(6, provenance="backfill")]))
    h.add(batch(3, events=[gap("backfilled")]))
    assert len(sub.items) == 1  # nothing of them is committed yet
    h.committed(committed("trades", 1, 2, 3))
    h.committed(committed("sequence_events", 1, 2, 3))
    assert sub.seen()[1:] == [
        ("trades:BINANCE:BTCUSDT", "trades", [5, 6]),
        ("trades:BINANCE:BTCUSDT", "gap", ["open"]),
        ("trades:BINANCE:BTCUSDT", "gap", ["backfilled"]),
    ]
    assert sub.items[1].rows[0].provenance == "backfill"
    assert h.held_batches() == 0


def test_only_gaps_and_outages_of_subscribed_channels_are_streamed() -> None:
    fanout = Fanout()
    trades, quotes = Recorder(), Recorder()
    fanout.subscribe("trades:BINANCE:BTCUSDT", trades)
    fanout.subscribe("quotes:BINANCE:BTCUSDT", quotes)
    h = hub(fanout)
    info = gap("info", kind="duplicate")
    h.add(batch(1, events=[info, gap("open", kind="outage", stream="quote")]))
    h.committed(committed("sequence_events", 1))
    assert trades.items == []
    assert quotes.seen() == [("quotes:BINANCE:BTCUSDT", "gap", ["open"])]


def test_subscribers_outlive_a_round_and_replayed_rows_are_not_sent_again() -> None:
    fanout = Fanout()
    sub = Recorder()
    fanout.subscribe("trades:BINANCE:BTCUSDT", sub)
    hub(fanout).add(batch(1, [trade(1), trade(2), trade(3)]))
    # The round fails; the next replays the journal after the committed position (row 1).
    again = hub(fanout)
    again.add(batch(1, [trade(2, provenance="replay"), trade(3, provenance="replay")]))
    again.add(batch(2, [trade(4, provenance="replay"), trade(5)]))
    assert [s for _, _, s in sub.seen()] == [[1, 2, 3], [4, 5]]


def test_a_failing_subscriber_is_dropped_and_the_others_still_get_the_batch() -> None:
    fanout = Fanout()

    class Broken:
        def deliver(self, item: Published) -> None:
            raise RuntimeError("boom")

    good = Recorder()
    fanout.subscribe("trades:BINANCE:BTCUSDT", Broken())
    fanout.subscribe("trades:BINANCE:BTCUSDT", good)
    h = hub(fanout)
    h.add(batch(1, [trade(1)]))
    h.add(batch(2, [trade(2)]))
    assert [s for _, _, s in good.seen()] == [[1], [2]]
    assert fanout.subscribers("trades:BINANCE:BTCUSDT") == 1


def test_a_subscriber_may_leave_while_a_batch_is_handed_out() -> None:
    fanout = Fanout()
    seen: list[str] = []

    class Leaving:
        def __init__(self, name: str) -> None:
            self.name = name

        def deliver(self, item: Published) -> None:
            seen.append(self.name)
            fanout.unsubscribe(item.channel, self)

    for name in "abc":
        fanout.subscribe("trades:BINANCE:BTCUSDT", Leaving(name))
    hub(fanout).add(batch(1, [trade(1)]))
    assert seen == ["a", "b", "c"]
    assert fanout.subscribers("trades:BINANCE:BTCUSDT") == 0


def test_a_hub_without_a_fanout_still_serves_recent_rows() -> None:
    h = LiveHub(LiveConfig(), Metrics(Registry()))
    h.add(batch(1, [trade(1), trade(2, provenance="backfill")]))
    assert [t.source_sequence for t in h.recent_trades("BINANCE", "BTCUSDT")] == [1, 2]
    h.committed(committed("trades", 1))
    assert h.recent_trades("BINANCE", "BTCUSDT", uncommitted_only=True) == []


# --- rows held as Arrow --------------------------------------------------------------------


class OldHub:
    """What the hub held before its rows became Arrow: a deque of objects per symbol."""

    def __init__(self, cfg: LiveConfig) -> None:
        self.cfg = cfg
        self.rows: dict[tuple[str, str, str], deque[tuple[int, Any]]] = {}
        self.pending: dict[str, set[int]] = {"trades": set(), "quotes": set()}
        self.latest = 0

    def add(self, b: SequencedBatch) -> None:
        for table, rows in (("trades", b.trades), ("quotes", b.quotes)):
            if rows:
                self.pending[table].add(b.batch_id)
            for r in rows:
                key = (table, r.exchange, r.symbol)
                held = self.rows.setdefault(key, deque(maxlen=self.cfg.max_rows_per_symbol))
                held.append((b.batch_id, r))
                self.latest = max(self.latest, r.timestamp)
        oldest = self.latest - int(self.cfg.window_seconds * 1_000_000)
        for held in self.rows.values():
            while held and held[0][1].timestamp < oldest:
                held.popleft()

    def read(self, table: str, symbol: str, since: int, uncommitted: bool) -> list[Any]:
        held = self.rows.get((table, "BINANCE", symbol), deque())
        pending = self.pending[table]
        return [r for b, r in held if r.timestamp >= since and (not uncommitted or b in pending)]


_PRICES = ("1.00000000", "2.50000000", "61234.50000000")


@st.composite
def arrow_rows(draw: st.DrawFn, kind: str, i: int, ts: int, provenance: str) -> Any:
    """A trade or quote with the ways real rows vary: ids derived or not, nulls, big ints."""
    symbol = draw(st.sampled_from(("BTCUSDT", "ETHUSDT")))
    seq = draw(st.one_of(st.just(i), st.none(), st.just(i + 2**40)))
    derived = draw(st.booleans())
    venue_id = str(seq) if derived and seq is not None else f"x{i}"
    message_id = f"BINANCE:{symbol}:{kind}:{venue_id}"
    common: dict[str, Any] = {
        "message_id": message_id,
        "symbol": symbol,
        "exchange": "BINANCE",
        "asset_class": "crypto",
        "timestamp": ts,
        "currency": draw(st.sampled_from(("USDT", "USDT", "USD"))),
        "source_sequence": seq,
        "ingestion_timestamp": ts + draw(st.integers(0, 2**33)),
        "platform_sequence": i,
        "vendor_data": draw(st.one_of(st.none(), st.just('{"M":true}'), st.text(max_size=5))),
        "provenance": provenance,
    }
    if kind == "trade":
        return Trade(
            trade_id=venue_id,
            price=draw(st.one_of(st.sampled_from(_PRICES), st.decimals(0, 9, places=3).map(str))),
            quantity=draw(st.sampled_from(_PRICES)),
            side=draw(st.sampled_from(("BUY", "SELL"))),
            trade_conditions=draw(st.one_of(st.none(), st.just(()), st.just(("3", "XT")))),
            **common,
        )
    price = draw(st.one_of(st.none(), st.sampled_from(_PRICES)))
    return Quote(
        bid_price=price,
        bid_quantity=price,
        ask_price=draw(st.sampled_from(_PRICES)),
        ask_quantity=draw(st.one_of(st.none(), st.sampled_from(_PRICES))),
        **common,
    )


@st.composite
def hub_steps(draw: st.DrawFn) -> list[tuple[str, Any]]:
    steps: list[tuple[str, Any]] = []
    ts = T0
    i = 0
    for batch_id in range(1, draw(st.integers(1, 25)) + 1):
        rows: dict[str, list[Any]] = {"trade": [], "quote": []}
        for _ in range(draw(st.integers(0, 12))):
            i += 1
            kind = draw(st.sampled_from(("trade", "quote")))
            # Mostly forward in time; now and then a late row (a backfill) from the past.
            step = draw(st.sampled_from((1_000_000, 3_000_000, -50_000_000, 0)))
            ts = max(T0, ts + step)
            provenance = "backfill" if step < 0 else draw(st.sampled_from(("live", "replay")))
            rows[kind].append(draw(arrow_rows(kind, i, ts, provenance)))
        steps.append(("add", batch(batch_id, rows["trade"], rows["quote"])))
        if draw(st.booleans()):
            table = draw(st.sampled_from(("trades", "quotes")))
            ids = draw(st.lists(st.integers(1, batch_id), max_size=4))
            steps.append(("commit", committed(table, *ids)))
    return steps


@settings(max_examples=60, deadline=None)
@given(
    steps=hub_steps(),
    window=st.sampled_from((10.0, 40.0, 900.0)),
    max_rows=st.sampled_from((3, 7, 100_000)),
    seal_rows=st.sampled_from((1, 2, 5)),
    tail_pieces=st.sampled_from((1, 2, 3, 64)),
    seal_min_rows=st.sampled_from((1, 3, 8)),
    since_back=st.sampled_from((0, 5_000_000, 30_000_000)),
)
def test_the_hub_reads_back_exactly_the_rows_a_deque_of_objects_would_hold(
    steps: list[tuple[str, Any]],
    window: float,
    max_rows: int,
    seal_rows: int,
    tail_pieces: int,
    seal_min_rows: int,
    since_back: int,
) -> None:
    cfg = LiveConfig(window_seconds=window, max_rows_per_symbol=max_rows)
    h = LiveHub(
        cfg,
        Metrics(Registry()),
        seal_rows=seal_rows,
        tail_pieces=tail_pieces,
        seal_min_rows=seal_min_rows,
    )
    old = OldHub(cfg)

    for op, msg in steps:
        if op == "add":
            h.add(msg)
            old.add(msg)
        else:
            h.committed(msg)
            old.pending[msg.table].difference_update(msg.batch_ids)
        since = old.latest - since_back if since_back else 0
        for symbol in ("BTCUSDT", "ETHUSDT"):
            for uncommitted in (False, True):
                assert h.recent_trades(
                    "BINANCE", symbol, since, uncommitted_only=uncommitted
                ) == old.read("trades", symbol, since, uncommitted)
                assert h.recent_quotes(
                    "BINANCE", symbol, since, uncommitted_only=uncommitted
                ) == old.read("quotes", symbol, since, uncommitted)
        assert h.row_count() == sum(map(len, old.rows.values()))


def binance_trade(i: int) -> Trade:
    return Trade(
        message_id=f"BINANCE:BTCUSDT:trade:{i}",
        trade_id=str(i),
        symbol="BTCUSDT",
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=T0 + i * 1000,
        price=f"{61000 + i % 500}.{i % 100:02d}000000",
        quantity=f"0.{i % 997:05d}000",
        currency="USDT",
        side="BUY" if i % 3 else "SELL",
        source_sequence=i,
        ingestion_timestamp=T0 + i * 1000 + 150,
        platform_sequence=i,
        vendor_data=f'{{"E":{T0 // 1000 + i},"M":true}}',
    )


def test_a_full_window_costs_bytes_a_row_not_an_object() -> None:
    h = LiveHub(LiveConfig(), Metrics(Registry()))
    n = 50_000
    before = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        for start in range(0, n, 500):
            h.add(batch(start // 500 + 1, [binance_trade(i) for i in range(start, start + 500)]))
        python_bytes = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()

    # All the hub holds: Arrow's buffers, and Python's objects (the rows not yet sealed).
    per_row = (pa.total_allocated_bytes() - before + python_bytes) / n
    assert h.row_count() == n
    assert per_row < 60, f"{per_row:.0f} bytes a row"
    last = [binance_trade(i) for i in range(n - 3, n)]
    assert h.recent_trades("BINANCE", "BTCUSDT", T0 + (n - 3) * 1000) == last
