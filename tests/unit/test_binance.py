"""Binance frame parsing: exact decimals, UTC microseconds, aggressor side, dead letters."""

from __future__ import annotations

import msgspec
import pytest

from k2d.model import now_us
from k2d.venues.binance import (
    BinanceParser,
    HistoricalTrade,
    ParsedFrames,
    combined_stream_url,
    trade_from_rest,
)

NOW = now_us()


def trade_frame(**over: object) -> bytes:
    data: dict[str, object] = {
        "e": "trade",
        "E": NOW // 1000,
        "s": "BTCUSDT",
        "t": 42,
        "p": "16500.12000000",
        "q": "0.00100000",
        "T": NOW // 1000 - 1,
        "m": True,
        "M": True,
    }
    data.update(over)
    return msgspec.json.encode({"stream": "btcusdt@trade", "data": data})


def parse(frame: bytes) -> ParsedFrames:
    out = ParsedFrames()
    parser = BinanceParser(["BTCUSDT", "ETHUSDT"])
    parser.parse(frame, NOW, out)
    parser.finish(out)
    return out


def test_trade_fields() -> None:
    out = parse(trade_frame())
    (t,) = out.trades
    assert t.message_id == "BINANCE:BTCUSDT:trade:42"
    assert (t.price, t.quantity) == ("16500.12000000", "0.00100000")
    assert t.timestamp == (NOW // 1000 - 1) * 1000
    assert t.side == "SELL", "m=true: buyer is maker, so the aggressor sold"
    assert t.source_sequence == 42 and t.currency == "USDT" and t.provenance == "live"
    assert parse(trade_frame(m=False)).trades[0].side == "BUY"


def test_book_ticker_fields() -> None:
    frame = msgspec.json.encode(
        {
            "stream": "ethusdt@bookTicker",
            "data": {
                "u": 400900217,
                "s": "ETHUSDT",
                "b": "25.35190000",
                "B": "31.21000000",
                "a": "25.36520000",
                "A": "40.66000000",
            },
        }
    )
    (q,) = parse(frame).quotes
    assert (q.bid_price, q.bid_quantity, q.ask_price, q.ask_quantity) == (
        "25.35190000",
        "31.21000000",
        "25.36520000",
        "40.66000000",
    )
    assert q.source_sequence == 400900217 and q.timestamp == NOW


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b'{"stream":"btcusdt@trade","data":{"e":"trade",', "bad_json"),
        (trade_frame(p=None), "missing_field"),
        (msgspec.json.encode({"stream": "btcusdt@trade", "data": {"e": "trade"}}), "missing_field"),
        (trade_frame(p="abc"), "invalid_number"),
        (trade_frame(p="1e5"), "invalid_number"),
        (trade_frame(p="-1.0"), "invalid_number"),
        (trade_frame(q="0.000000001"), "invalid_number"),
        (trade_frame(p="0.00000000"), "non_positive"),
        (trade_frame(T=NOW // 1000 - 86_400_000), "clock_skew"),
        (trade_frame(s="DOGEUSDT"), "unknown_symbol"),
        (msgspec.json.encode({"stream": "dogeusdt@trade", "data": {}}), "unknown_stream"),
        (b"[1,2,3]", "missing_field"),
    ],
)
def test_malformed_frames_become_dead_letters(frame: bytes, reason: str) -> None:
    out = parse(frame)
    assert out.trades == [] and out.quotes == []
    (d,) = out.dead_letters
    assert d.reason == reason
    assert d.raw == frame and d.received_at == NOW and d.source == "binance"


def test_empty_quote_side_is_null_not_zero() -> None:
    frame = msgspec.json.encode(
        {
            "stream": "ethusdt@bookTicker",
            "data": {
                "u": 7,
                "s": "ETHUSDT",
                "b": "0.00000000",
                "B": "0.00000000",
                "a": "25.36520000",
                "A": "40.66000000",
            },
        }
    )
    (q,) = parse(frame).quotes
    assert (q.bid_price, q.bid_quantity, q.ask_price) == (None, None, "25.36520000")


def test_one_bad_row_does_not_spoil_its_batch() -> None:
    parser = BinanceParser(["BTCUSDT"])
    out = ParsedFrames()
    for i, price in enumerate(["1.5", "x", "2.5", "0.0"]):
        parser.parse(trade_frame(t=i, p=price), NOW, out)
    parser.finish(out)
    assert [t.price for t in out.trades] == ["1.5", "2.5"]
    assert [d.reason for d in out.dead_letters] == ["invalid_number", "non_positive"]
    assert out.dead_letters[0].raw == trade_frame(t=1, p="x")


def test_oversized_frame_is_dead_lettered() -> None:
    out = ParsedFrames()
    BinanceParser(["BTCUSDT"], max_frame_bytes=100).parse(trade_frame(), NOW, out)
    assert out.dead_letters[0].reason == "frame_too_large"


def test_control_frames_are_not_market_data() -> None:
    parser = BinanceParser(["BTCUSDT"])
    out = ParsedFrames()
    assert parser.parse(b'{"result":null,"id":1}', NOW, out).kind == "reply"  # type: ignore[union-attr]
    ctl = parser.parse(b'{"e":"serverShutdown","E":1}', NOW, out)
    assert ctl is not None and ctl.kind == "server_shutdown"
    assert len(out) == 0


def test_rest_trade_has_the_same_message_id_as_the_live_one() -> None:
    item = HistoricalTrade(
        id=42, price="1.00000000", qty="2.00000000", time=NOW // 1000, isBuyerMaker=True
    )
    t = trade_from_rest(item, "BTCUSDT", NOW)
    assert t.message_id == parse(trade_frame()).trades[0].message_id
    assert t.provenance == "backfill" and t.side == "SELL"


def test_combined_stream_url() -> None:
    url = combined_stream_url("ws://127.0.0.1:9/", ["BTCUSDT"])
    assert url == "ws://127.0.0.1:9/stream?streams=btcusdt@trade/btcusdt@bookTicker"
