"""The C frame scanner (k2d/venues/_binance_scan.c): the same rows as the Python parser.

Every batch here is parsed twice, once as k2d parses it (the scanner where it can) and
once with the scanner taken away, and the two results must be equal: tables, dead letters
and the newest trade time.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2d.model import now_us
from k2d.venues import binance
from k2d.venues.binance import BinanceParser, ParsedFrames

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLBTC", "BNBUSDT"]
NOW = now_us()
SCAN = binance._binance_scan


@pytest.fixture(autouse=True)
def _scanner_built() -> None:
    if SCAN is None:
        why = "k2d.venues._binance_scan was not built: install a C compiler and reinstall k2d"
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(why)


def trade(symbol: str, trade_id: int, i: int, *, maker: bool = True, best: bool = True) -> bytes:
    ms = NOW // 1000 - 5_000 + i
    return (
        b'{"stream":"%s@trade","data":{"e":"trade","E":%d,"s":"%s","t":%d,"p":"20000.12345678",'
        b'"q":"0.001","T":%d,"m":%s,"M":%s}}'
        % (
            symbol.lower().encode(),
            ms + 1,
            symbol.encode(),
            trade_id,
            ms,
            b"true" if maker else b"false",
            b"true" if best else b"false",
        )
    )


def quote(symbol: str, update_id: int, bid_qty: bytes = b"2") -> bytes:
    return (
        b'{"stream":"%s@bookTicker","data":{"u":%d,"s":"%s","b":"100.5","B":"%s","a":"101",'
        b'"A":"3.25"}}' % (symbol.lower().encode(), update_id, symbol.encode(), bid_qty)
    )


# One fault each, as a venue or a broken link could send it; each sends the batch the
# Python parser's way (a dead letter, a nulled side, or only the slower path).
FAULTS = {
    "negative price": lambda f: f.replace(b'"p":"', b'"p":"-'),
    "cut short": lambda f: f[:-3],
    "other symbol": lambda f: f.replace(b'"s":"', b'"s":"X'),
    "leading zero": lambda f: f.replace(b'"t":', b'"t":0').replace(b'"u":', b'"u":0'),
    "reply": lambda f: b'{"result":null,"id":1}',
    "no M": lambda f: f.replace(b',"M":true', b"").replace(b',"M":false', b""),
    "empty bid": lambda f: f.replace(b'"b":"100.5"', b'"b":"0"'),
    "whitespace": lambda f: f.replace(b"}}", b" }}"),
    "escape": lambda f: f.replace(b'"e":"trade"', b'"e":"tr\\u0061de"'),
    "float id": lambda f: f.replace(b'"t":', b'"t":1.0,"x":').replace(b'"u":', b'"u":1.5,"x":'),
    "huge id": lambda f: f.replace(b'"t":', b'"t":99999999999999999999').replace(
        b'"u":', b'"u":99999999999999999999'
    ),
    "unknown stream": lambda f: f.replace(b"@", b"x@"),
    "far future": lambda f: f.replace(b'"T":', b'"T":9'),
    "nine decimals": lambda f: f.replace(b'"p":"20000.12345678"', b'"p":"20000.123456789"'),
    "extra field": lambda f: f.replace(b'"s":', b'"z":1,"s":'),
    "duplicate field": lambda f: f.replace(b'"s":', b'"t":1,"u":1,"s":'),
}


def batch(rnd: random.Random, n: int, fault_rate: float) -> list[bytes]:
    ids = {s: rnd.randrange(1, 10**9) for s in SYMBOLS}
    frames = []
    for i in range(n):
        symbol = rnd.choice(SYMBOLS)
        ids[symbol] += 1
        if rnd.random() < 0.4:
            frame = quote(symbol, ids[symbol], b"0.00000000" if rnd.random() < 0.1 else b"2")
        else:
            frame = trade(symbol, ids[symbol], i, maker=rnd.random() < 0.5, best=rnd.random() < 0.9)
        if rnd.random() < fault_rate:
            frame = rnd.choice(list(FAULTS.values()))(frame)
        frames.append(frame)
    return frames


def parsed(frames: list[bytes], monkeypatch: pytest.MonkeyPatch, *, scan: bool) -> ParsedFrames:
    with monkeypatch.context() as m:
        m.setattr(binance, "_binance_scan", SCAN if scan else None)
        parser = BinanceParser(SYMBOLS, source="test", provenance="replay")
        out = ParsedFrames()
        for frame in frames:
            parser.parse(frame, NOW, out)
        parser.finish(out)
    return out


def assert_same(frames: list[bytes], monkeypatch: pytest.MonkeyPatch) -> ParsedFrames:
    fast, slow = parsed(frames, monkeypatch, scan=True), parsed(frames, monkeypatch, scan=False)
    assert fast.columns.keys() == slow.columns.keys()
    for table in fast.columns:
        assert fast.columns[table].equals(slow.columns[table]), table
    assert fast.dead_letters == slow.dead_letters
    assert fast.max_event_us == slow.max_event_us
    return fast


@pytest.mark.parametrize("n", [1, 30, 256, 257, 5_000])
def test_well_formed_batches_scan_to_the_same_rows(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(n)
    frames = batch(rnd, n, 0.0)
    frames = [f for f in frames if b'"B":"0.00000000"' not in f]  # empty sides: Python's
    args = BinanceParser(SYMBOLS)._scan_args
    assert SCAN.scan(frames, [NOW] * len(frames), *args) is not None, "the scanner took it"
    out = assert_same(frames, monkeypatch)
    assert out.trade_count + out.quote_count == len(frames)
    for rows in out.columns.values():
        # Each symbol's rows together, in the order each symbol first comes, ids rising.
        order = rows.column("symbol").to_pylist()
        firsts = list(dict.fromkeys(order))
        assert order == sorted(order, key=firsts.index)
        ids = rows.column("source_sequence").to_pylist()
        for symbol in firsts:
            mine = [i for i, s in zip(ids, order, strict=True) if s == symbol]
            assert mine == sorted(mine)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_goes_the_python_way(fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    good = [trade("BTCUSDT", 1, 0), quote("ETHUSDT", 7)]
    frames = [*good, FAULTS[fault](good[0]), FAULTS[fault](good[1]), trade("BTCUSDT", 2, 1)]
    faulty = [f for f in frames if f not in good and f != frames[-1]]
    args = BinanceParser(SYMBOLS)._scan_args
    for frame in faulty:
        assert SCAN.scan([frame], [NOW], *args) is None, frame
    assert_same(frames, monkeypatch)


def test_random_batches_with_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(14)
    for _ in range(150):
        n = rnd.choice([1, 5, 40, 300, 2_000])
        assert_same(batch(rnd, n, rnd.choice([0.0, 0.002, 0.05, 0.3])), monkeypatch)


def test_clock_skew_and_receive_times_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = BinanceParser(SYMBOLS, max_clock_skew_s=1.0)
    frame = trade("BTCUSDT", 1, 0)  # its trade time is ~5 s before NOW
    assert SCAN.scan([frame], [NOW], *parser._scan_args) is None
    assert SCAN.scan([frame], [2**64], *parser._scan_args) is None  # not an int64
    assert SCAN.scan([frame], [2**63 - 1], *parser._scan_args) is None  # no clock's time
    assert SCAN.scan([frame], [NOW - 5_000_000], *parser._scan_args) is not None
    with pytest.raises(TypeError):
        SCAN.scan(["text"], [NOW], *parser._scan_args)


@pytest.mark.parametrize("scan", [True, False], ids=["scanner", "python"])
def test_parse_many_is_parse_frame_by_frame(scan: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay hands the parser a batch's frames in one call: the same rows and dead
    letters as one call a frame, control frames and frames over max_frame_bytes included."""
    rnd = random.Random(7)
    monkeypatch.setattr(binance, "_binance_scan", SCAN if scan else None)
    reasons: set[str] = set()
    for _ in range(60):
        frames = batch(rnd, rnd.choice([1, 20, 300, 3_000]), rnd.choice([0.0, 0.0, 0.01, 0.2]))
        if rnd.random() < 0.3:
            big = trade("BTCUSDT", 10**12, 0).replace(b'"e":"trade"', b'"e":"' + b"x" * 600 + b'"')
            frames.insert(rnd.randrange(len(frames) + 1), big)
        received = [NOW] * len(frames)
        one, many = ParsedFrames(), ParsedFrames()
        parser = BinanceParser(SYMBOLS, max_frame_bytes=512)
        for frame in frames:
            parser.parse(frame, NOW, one)
        parser.finish(one)
        parser.parse_many(frames, received, many)
        parser.finish(many)
        assert many.columns.keys() == one.columns.keys()
        for table in one.columns:
            assert many.columns[table].equals(one.columns[table]), table
        assert many.dead_letters == one.dead_letters
        assert many.max_event_us == one.max_event_us
        reasons |= {d.reason for d in one.dead_letters}
    assert {"frame_too_large", "bad_json", "unknown_symbol"} <= reasons, reasons


# monkeypatch is only used through its context(), undone within each example.
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pick=st.integers(0, 3),
    edits=st.lists(
        st.tuples(
            st.integers(0, 200), st.sampled_from(["put", "cut", "add"]), st.binary(max_size=3)
        ),
        max_size=4,
    ),
)
def test_any_bytes_scan_safely_to_the_python_parsers_rows(
    pick: int, edits: list[tuple[int, str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames bent at random bytes: the scanner reads none past its end (or it would crash
    this process), and the rows, dead letters and times are the Python parser's."""
    base = [
        trade("BTCUSDT", 5, 0),
        trade("SOLBTC", 9, 1, maker=False, best=False),
        quote("ETHUSDT", 3),
        quote("BNBUSDT", 4, b"0"),
    ][pick]
    frame = bytearray(base)
    for at, how, data in edits:
        at = min(at, len(frame))
        if how == "put":
            frame[at : at + len(data)] = data
        elif how == "cut":
            del frame[at : at + 1 + len(data)]
        else:
            frame[at:at] = data
    assert_same([trade("BTCUSDT", 4, 0), bytes(frame), quote("ETHUSDT", 2)], monkeypatch)
