"""Binance frame parsing: exact decimals, UTC microseconds, aggressor side, dead letters."""

from __future__ import annotations

import msgspec
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2d.columns import by_stream
from k2d.model import now_us
from k2d.venues import binance
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


def _interleaved(n: int) -> list[bytes]:
    """n frames of three symbols in turn, trades and quotes, a few with bad decimals."""
    frames = []
    for i in range(n):
        symbol = ("BTCUSDT", "ETHUSDT", "SOLUSDT")[i % 3]
        stream = symbol.lower()
        if i % 4 == 3:
            side = "0.00000000" if i % 8 == 3 else "10.5"  # one empty side: stored as null
            data = {"u": i, "s": symbol, "b": side, "B": "1.0", "a": "11.5", "A": "2.0"}
            frames.append(msgspec.json.encode({"stream": f"{stream}@bookTicker", "data": data}))
        else:
            price = {5: "x", 10: "0.0"}.get(i % 12, f"{1 + i}.25")
            frames.append(trade_frame(s=symbol, t=i, p=price).replace(b"btcusdt", stream.encode()))
    return frames


def _finished(frames: list[bytes]) -> ParsedFrames:
    parser = BinanceParser(["BTCUSDT", "ETHUSDT", "SOLUSDT"])
    out = ParsedFrames()
    for frame in frames:
        parser.parse(frame, NOW, out)
    parser.finish(out)
    return out


@pytest.mark.parametrize("n", [1, 2, 7, 40, 300, 700])
def test_small_and_large_batches_leave_the_same_rows_in_stream_order(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small batch is checked and put in symbol order in Python, a large one by Arrow: the
    rows, their order (each symbol's together, as by_stream leaves them) and the dead letters
    are the same either way."""
    frames = _interleaved(n)
    python_way = _finished(frames)
    monkeypatch.setattr(binance, "SMALL_BATCH_ROWS", -1)
    arrow_way = _finished(frames)

    assert python_way.dead_letters == arrow_way.dead_letters
    assert python_way.columns.keys() == arrow_way.columns.keys()
    for name, table in python_way.columns.items():
        assert table.equals(arrow_way.columns[name])
        assert by_stream(table).columns.equals(table), "each symbol's rows together"
    if n >= 40:
        assert len(python_way.dead_letters) == len([i for i in range(n) if i % 12 in (5, 10)])
        assert len({q.symbol for q in python_way.quotes}) == 3
        assert any(q.bid_price is None for q in python_way.quotes)


_DECIMAL_TEXT = st.one_of(
    st.text(alphabet="0123456789.", max_size=21),
    st.text(alphabet="0123456789.-+e x\n\t\u0661\U0001d7d9", max_size=8),
    st.sampled_from(["0", "0.00000000", "1.123456789", "12345678901", "1234567890.12345678"]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.none() | _DECIMAL_TEXT, st.none() | _DECIMAL_TEXT), max_size=6),
    st.booleans(),
)
def test_decimals_are_judged_alike_in_python_and_in_arrow(
    pairs: list[tuple[str | None, str | None]], nullable: bool
) -> None:
    if not nullable:
        pairs = [(p or "1", q or "1") for p, q in pairs]
    prices, qtys = [p for p, _ in pairs], [q for _, q in pairs]
    in_python = binance._bad_decimal_lists(prices, qtys, nullable=nullable)
    in_arrow = binance._bad_decimal_arrays(
        pa.array(prices, pa.string()), pa.array(qtys, pa.string()), nullable=nullable
    )
    assert in_python == in_arrow


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
