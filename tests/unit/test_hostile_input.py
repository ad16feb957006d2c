"""Hostile venue input, live or history: a dead letter with a reason, never an exception.

Every record that does get through must fit the tables' Arrow types (int64 ids, timestamps),
because that is where an unbounded Python int used to stop the ingest chain.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2d.model import now_us
from k2d.storage import dead_letters_to_arrow, quotes_to_arrow, trades_to_arrow
from k2d.venues.binance import (
    MAX_ID,
    MAX_TIME_US,
    REASONS,
    BinanceParser,
    ParsedFrames,
    decode_history,
    history_trades,
)

NOW = now_us()
NOW_MS = NOW // 1000
HUGE = 2**64 - 1


def trade(**over: Any) -> bytes:
    data: dict[str, Any] = {
        "e": "trade",
        "E": NOW_MS,
        "s": "BTCUSDT",
        "t": 42,
        "p": "16500.12000000",
        "q": "0.00100000",
        "T": NOW_MS - 1,
        "m": True,
        "M": True,
        **over,
    }
    return msgspec.json.encode({"stream": "btcusdt@trade", "data": data})


def book(**over: Any) -> bytes:
    data: dict[str, Any] = {
        "u": 400900217,
        "s": "BTCUSDT",
        "b": "25.35190000",
        "B": "31.21000000",
        "a": "25.36520000",
        "A": "40.66000000",
        **over,
    }
    return msgspec.json.encode({"stream": "btcusdt@bookTicker", "data": data})


def parse(*frames: bytes, **parser: Any) -> ParsedFrames:
    p = BinanceParser(["BTCUSDT"], **parser)
    out = ParsedFrames()
    for frame in frames:
        p.parse(frame, NOW, out)
    p.finish(out)
    return out


def assert_storable(out: ParsedFrames) -> None:
    """What the writer would do with the batch: build every table's Arrow columns."""
    assert trades_to_arrow(out.trades).num_rows == len(out.trades)
    assert quotes_to_arrow(out.quotes).num_rows == len(out.quotes)
    assert dead_letters_to_arrow(out.dead_letters).num_rows == len(out.dead_letters)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (trade(t=HUGE), "invalid_id"),
        (trade(t=2**63), "invalid_id"),
        (trade(t=-1), "invalid_id"),
        (trade(t=10**400), "invalid_id"),
        (book(u=HUGE), "invalid_id"),
        (book(u=-7), "invalid_id"),
        (trade(T=-1), "invalid_time"),
        (trade(T=10**400), "invalid_time"),  # used to raise OverflowError in the skew check
        (trade(E=10**400), "invalid_time"),
        (trade(E=-(10**40)), "invalid_time"),
        (trade(T=MAX_TIME_US // 1000 + 1), "invalid_time"),
    ],
)
def test_ids_and_times_no_table_can_hold_are_dead_letters(frame: bytes, reason: str) -> None:
    out = parse(frame)

    assert out.trades == [] and out.quotes == []
    [dead] = out.dead_letters
    assert dead.reason == reason
    assert reason in REASONS
    assert dead.raw == frame
    assert_storable(out)


def test_the_largest_int64_id_is_still_a_trade() -> None:
    out = parse(trade(t=MAX_ID), book(u=MAX_ID))

    assert [t.source_sequence for t in out.trades] == [MAX_ID]
    assert [q.source_sequence for q in out.quotes] == [MAX_ID]
    assert_storable(out)


def test_a_time_before_1970_is_dead_even_when_the_skew_check_would_let_it_through() -> None:
    out = parse(trade(T=-5, E=-4), max_clock_skew_s=1e12)

    assert [d.reason for d in out.dead_letters] == ["invalid_time"]
    assert out.trades == []


def test_a_hostile_frame_spoils_nothing_around_it() -> None:
    out = parse(trade(t=41), trade(t=HUGE), trade(t=42), book(u=HUGE), book(u=9))

    assert [t.source_sequence for t in out.trades] == [41, 42]
    assert [q.source_sequence for q in out.quotes] == [9]
    assert [d.reason for d in out.dead_letters] == ["invalid_id", "invalid_id"]
    assert_storable(out)


@settings(max_examples=300, deadline=None)
@given(
    t=st.one_of(st.integers(), st.integers(-(2**70), 2**70)),
    u=st.one_of(st.integers(), st.integers(-(2**70), 2**70)),
    trade_time=st.one_of(st.integers(), st.just(NOW_MS)),
    event_time=st.one_of(st.integers(), st.just(NOW_MS)),
)
def test_any_integer_anywhere_is_a_record_or_a_dead_letter(
    t: int, u: int, trade_time: int, event_time: int
) -> None:
    out = parse(trade(t=t, T=trade_time, E=event_time), book(u=u))

    assert len(out.trades) + len(out.quotes) + len(out.dead_letters) == 2
    assert {d.reason for d in out.dead_letters} <= set(REASONS)
    assert_storable(out)


def history_item(**over: Any) -> dict[str, Any]:
    return {
        "id": 100,
        "price": "16500.12000000",
        "qty": "0.00100000",
        "quoteQty": "16.50012000",
        "time": NOW_MS - 60_000,
        "isBuyerMaker": True,
        "isBestMatch": True,
        **over,
    }


@pytest.mark.parametrize(
    ("item", "reason", "closable"),
    [
        (history_item(price="not-a-price"), "invalid_number", True),
        (history_item(price="12345678901.00000000"), "invalid_number", True),
        (history_item(qty="0.000000001"), "invalid_number", True),
        (history_item(price="0.00000000"), "non_positive", True),
        (history_item(qty="0.00000000"), "non_positive", True),
        (history_item(time=-1), "invalid_time", True),
        (history_item(time=MAX_TIME_US // 1000 + 1), "invalid_time", True),
        (history_item(time=10**400), "invalid_time", True),
        (history_item(id=HUGE), "invalid_id", False),
        (history_item(id=-1), "invalid_id", False),
        (history_item(price=16500.12), "missing_field", True),  # a number, not a string
        ({"price": "1.0"}, "missing_field", False),
    ],
)
def test_a_bad_history_row_is_a_dead_letter_and_the_rest_of_the_page_is_kept(
    item: dict[str, Any], reason: str, closable: bool
) -> None:
    raw = msgspec.json.encode(item)
    body = b"[" + msgspec.json.encode(history_item(id=99)) + b"," + raw + b","
    body += msgspec.json.encode(history_item(id=101)) + b"]"

    trades, rejected = history_trades(decode_history(body), "BTCUSDT", NOW)

    assert [t.source_sequence for t in trades] == [99, 101]
    assert {t.provenance for t in trades} == {"backfill"}
    [row] = rejected
    assert row.dead_letter.reason == reason
    assert row.dead_letter.raw == raw  # the venue's bytes of that item, as JSON
    assert row.dead_letter.source == "backfill"
    assert row.trade_id == (item["id"] if closable else None)
    assert trades_to_arrow(trades).num_rows == 2
    assert dead_letters_to_arrow([row.dead_letter]).num_rows == 1


def test_a_body_that_is_no_list_is_not_a_page() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_history(b'{"code":-1121,"msg":"Invalid symbol."}')


_FAULTS = st.sampled_from(
    [
        {},
        {},
        {},
        {"p": "x"},
        {"p": "0.0"},
        {"q": "1e5"},
        {"t": -1},
        {"t": HUGE},
        {"T": NOW_MS - 86_400_000},
        {"T": -5},
        {"E": 10**20},
        {"s": "ETHUSDT"},
        {"M": None},
        {"m": 1},
        {"p": None},
        {"extra": [1, {"x": 2}]},
    ]
)
_BOOK_FAULTS = st.sampled_from(
    [{}, {}, {"b": "0.0", "B": "0.0"}, {"a": "0"}, {"b": "0", "a": "0"}, {"u": -7}, {"A": "x"}]
)


def _frame(kind: str, fault: dict[str, Any], n: int) -> bytes:
    if kind == "trade":
        return trade(**{"t": n, **fault})
    if kind == "book":
        return book(**{"u": n, **fault})
    return {
        "garbage": b'{"stream":"btcusdt@trade","data":{"e":',
        "other": msgspec.json.encode({"stream": "dogeusdt@trade", "data": {}}),
        "reply": b'{"result":null,"id":1}',
        "two": trade(t=n) + b"," + trade(t=n + 1),
        "list": b'{"stream":"btcusdt@trade","data":[1]}',
    }[kind]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["trade"] * 6 + ["book"] * 3 + ["garbage", "other", "reply", "two", "list"]
            ),
            _FAULTS,
            _BOOK_FAULTS,
        ),
        min_size=1,
        max_size=40,
    )
)
def test_frames_parsed_together_are_what_they_are_one_by_one(
    spec: list[tuple[str, dict[str, Any], dict[str, Any]]],
) -> None:
    """A batch decodes in one call when nothing in it needs a dead letter; whatever it holds,
    the rows, dead letters and their order are those of parsing each frame alone."""
    frames = [
        _frame(kind, fault if kind == "trade" else book_fault, i)
        for i, (kind, fault, book_fault) in enumerate(spec)
    ]
    together = parse(*frames)
    parser = BinanceParser(["BTCUSDT"])
    alone = ParsedFrames()
    for frame in frames:
        parser._parse_one(frame, NOW, alone)  # the one-by-one path: the reference
    parser.finish(alone)

    assert together.trades == alone.trades
    assert together.quotes == alone.quotes
    assert together.dead_letters == alone.dead_letters
    assert together.columns.keys() == alone.columns.keys()
    for table, columns in together.columns.items():
        assert columns.equals(alone.columns[table])
    assert_storable(together)


def test_a_clean_batch_is_decoded_in_one_call_and_makes_the_same_rows() -> None:
    frames = [trade(t=i, m=i % 2 == 0) for i in range(1, 50)] + [book(u=i) for i in range(9)]
    parser = BinanceParser(["BTCUSDT"])
    out = ParsedFrames()
    for frame in frames:
        parser.parse(frame, NOW, out)
    assert len(out.deferred) == len(frames), "market frames wait for one decode"
    parser.finish(out)

    assert [t.source_sequence for t in out.trades] == list(range(1, 50))
    assert [t.side for t in out.trades[:2]] == ["BUY", "SELL"]
    assert out.trades[0].vendor_data == f'{{"E":{NOW_MS},"M":true}}'
    assert out.trades[0].message_id == "BINANCE:BTCUSDT:trade:1"
    assert [q.message_id for q in out.quotes[:2]] == [
        "BINANCE:BTCUSDT:quote:0",
        "BINANCE:BTCUSDT:quote:1",
    ]
    assert out.dead_letters == []
