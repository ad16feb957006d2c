"""The stream protocol's messages: strict Structs, rows rendered as the REST rows are, batches
encoded once and joined without re-encoding (JSON and MessagePack), the replay clock."""

from __future__ import annotations

import msgspec
import pytest

from k2d.api._stream import Pacer, parse_iso_us
from k2d.api._stream_protocol import (
    CLIENT_DECODER,
    Ack,
    Encoded,
    Error,
    Gap,
    Pong,
    Subscribe,
    Trades,
    decode_server,
    encode_gap,
    encode_message,
    encode_rows,
    iso_us,
    join_frames,
    order_for_joining,
    parse_channel,
    parse_since,
    quote_row,
    trade_row,
)
from k2d.model import Quote, Trade
from k2d.query import QueryError

T0 = 1_709_251_200_000_000  # 2024-03-01T00:00:00Z


def trade(i: int, symbol: str = "BTCUSDT", price: str = "61234.50000000") -> Trade:
    return Trade(
        message_id=f"BINANCE:{symbol}:trade:{i}",
        trade_id=str(i),
        symbol=symbol,
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=T0 + i * 1_000 + 123,
        price=price,
        quantity="0.5",
        currency="USDT",
        side="SELL",
        source_sequence=i,
        ingestion_timestamp=T0 + i * 1_000 + 456,
        platform_sequence=i,
    )


def test_rows_carry_the_rest_renderings() -> None:
    row = trade_row(trade(7, price="1.5"))
    assert row.timestamp == "2024-03-01T00:00:00.007123Z"
    assert row.ingestion_timestamp == "2024-03-01T00:00:00.007456Z"
    assert (row.price, row.quantity) == ("1.50000000", "0.50000000")  # DuckDB's decimal(18,8)
    assert trade_row(trade(1)).price == "61234.50000000"  # the venue's form, kept as is
    quote = Quote(
        message_id="BINANCE:BTCUSDT:quote:1",
        symbol="BTCUSDT",
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=T0,
        bid_price=None,
        bid_quantity=None,
        ask_price="100",
        ask_quantity="0002.5",
        currency="USDT",
        ingestion_timestamp=T0,
    )
    q = quote_row(quote)
    assert (q.bid_price, q.ask_price, q.ask_quantity) == (None, "100.00000000", "2.50000000")
    assert parse_iso_us(iso_us(T0 + 42)) == T0 + 42


def test_server_messages_decode_strictly() -> None:
    ack = Ack(op="subscribe", id=3, channels=["trades:BINANCE:BTCUSDT"])
    assert decode_server(encode_message(ack).decode()) == ack
    assert decode_server(encode_message(ack, "msgpack")) == ack
    assert decode_server(encode_message(Pong(time="x")).decode()) == Pong(time="x")
    with pytest.raises(msgspec.ValidationError):
        decode_server('{"type":"pong","time":"x","id":null,"extra":1}')
    with pytest.raises(msgspec.ValidationError):
        decode_server('{"type":"nope"}')


def test_client_messages_are_a_tagged_union() -> None:
    msg = CLIENT_DECODER.decode(b'{"op":"subscribe","channels":["trades:BINANCE:X"],"since":"-5m"}')
    assert msg == Subscribe(channels=["trades:BINANCE:X"], since="-5m")
    for bad in (b'{"op":"dance"}', b'{"op":"subscribe"}', b'{"op":"ping","x":1}', b"[]"):
        with pytest.raises(msgspec.DecodeError):
            CLIENT_DECODER.decode(bad)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_a_batch_encodes_to_the_message_msgspec_would_write(encoding: str) -> None:
    rows = [trade_row(trade(i)) for i in range(20)]  # > 15: a msgpack array16 header
    part = encode_rows("trades", "trades:BINANCE:BTCUSDT", rows, encoding)  # type: ignore[arg-type]
    data = part.message.decode() if encoding == "json" else part.message
    assert decode_server(data) == Trades(channel="trades:BINANCE:BTCUSDT", rows=rows)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_waiting_batches_join_into_one_message_per_channel(encoding: str) -> None:

    def part(ids: range, symbol: str = "BTCUSDT") -> Encoded:
        rows = [trade_row(trade(i, symbol)) for i in ids]
        return encode_rows("trades", f"trades:BINANCE:{symbol}", rows, encoding)  # type: ignore[arg-type]

    gap = encode_gap(
        Gap(
            channel="trades:BINANCE:BTCUSDT",
            event_id="g",
            kind="gap",
            status="open",
            first_missing=5,
            last_missing=6,
            missing_count=2,
            start=None,
            end=None,
            detected_at="t",
            resolved_at=None,
            detail="",
        ),
        encoding,  # type: ignore[arg-type]
    )
    ack = Encoded("ack", "", encode_message(Ack(op="ping"), encoding), b"", 0)  # type: ignore[arg-type]
    parts = [part(range(0, 3)), part(range(0, 2), "ETHUSDT"), part(range(3, 20)), gap, ack]
    parts += [part(range(20, 21)), part(range(2, 4), "ETHUSDT"), part(range(21, 23))]
    frames = join_frames(order_for_joining(parts), encoding)  # type: ignore[arg-type]
    decoded = [decode_server(f[0].decode() if encoding == "json" else f[0]) for f in frames]
    summary = [
        (
            type(m).__name__,
            getattr(m, "channel", ""),
            [r.source_sequence for r in getattr(m, "rows", [])],
        )
        for m in decoded
    ]
    assert summary == [
        ("Trades", "trades:BINANCE:BTCUSDT", list(range(0, 20))),  # two batches, one message
        ("Gap", "trades:BINANCE:BTCUSDT", []),  # after the rows before it in its channel
        ("Trades", "trades:BINANCE:ETHUSDT", [0, 1]),
        ("Ack", "", []),  # control messages stay where they were
        ("Trades", "trades:BINANCE:BTCUSDT", [20, 21, 22]),
        ("Trades", "trades:BINANCE:ETHUSDT", [2, 3]),
    ]
    assert frames[0][2] == {"live": 20}


def test_joined_messages_stay_under_the_size_bound() -> None:
    parts = [
        encode_rows("trades", "trades:BINANCE:BTCUSDT", [trade_row(trade(i))], "json")
        for i in range(100)
    ]
    frames = join_frames(parts, "json", max_bytes=2_000)
    assert len(frames) > 10
    assert all(len(f[0]) < 2_000 + 600 for f in frames)
    rows = [r.source_sequence for f in frames for r in decode_server(f[0].decode()).rows]  # type: ignore[union-attr]
    assert rows == list(range(100))


def test_channels_and_since_are_checked() -> None:
    c = parse_channel("trades:binance:btcusdt")
    assert (c.name, c.key) == ("trades:BINANCE:BTCUSDT", ("BINANCE", "BTCUSDT"))
    for bad in ("trade:BINANCE:X", "trades:BINANCE", "trades::X", "quotes:B:X Y"):
        with pytest.raises(QueryError) as info:
            parse_channel(bad)
        assert info.value.code == "invalid_channel"
    now = T0 + 3_600_000_000
    assert parse_since("-5m", now, 3_600) == now - 300_000_000
    assert parse_since("2024-03-01T00:30:00Z", now, 3_600) == T0 + 1_800_000_000
    assert parse_since(T0 // 1_000, now, 3_600) == T0
    with pytest.raises(QueryError, match="at most"):
        parse_since("-2h", now, 3_600)
    with pytest.raises(QueryError) as info:
        parse_since("2030-01-01", now, 3_600)
    assert info.value.code == "invalid_since"


def test_errors_name_their_code() -> None:
    msg = decode_server(encode_message(Error(code="slow_consumer", detail="x")).decode())
    assert isinstance(msg, Error) and msg.code == "slow_consumer"


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_replay_clock_runs_at_its_speed_and_stands_still_when_paused() -> None:
    clock = FakeClock()
    pacer = Pacer("10", T0, clock)
    clock.t += 0.5
    assert pacer.now() == T0 + 5_000_000  # half a second at speed 10: five seconds of data
    pacer.pause()
    clock.t += 3
    assert pacer.now() == T0 + 5_000_000
    pacer.resume()
    clock.t += 0.1
    assert pacer.now() == T0 + 6_000_000
    pacer.restart(T0)
    assert pacer.now() == T0
    assert Pacer("max", T0, clock).rate is None
