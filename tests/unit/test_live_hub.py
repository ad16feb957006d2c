"""LiveHub and Fanout: live rows published at once per channel, backfilled rows and ledger rows
once committed, nothing published twice after a recovery, and subscribers that outlive the
hub of a capture round."""

from __future__ import annotations

from typing import Any

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
