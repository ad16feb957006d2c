"""Binance spot protocol: stream URLs, frame parsing into Trade/Quote, REST history parsing.

Parsing is on the hot path (every frame), so payloads are decoded by typed msgspec
decoders and validated with precompiled regexes; anything wrong becomes a DeadLetter
with a reason from REASONS, never an exception.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field, fields
from itertools import compress
from operator import attrgetter
from types import ModuleType
from typing import Any, ClassVar, Self, cast
from urllib.parse import quote

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from k2d.columns import (
    QUOTE_COLUMNS,
    SMALL_BATCH_ROWS,
    TRADE_COLUMNS,
    by_stream,
    columns_to_records,
)
from k2d.model import DeadLetter, Quote, Trade, quote_message_id, trade_message_id

_binance_scan: ModuleType | None
try:
    from k2d.venues import _binance_scan
except ImportError:  # installed without a C compiler: the Python parser takes every batch
    _binance_scan = None

__all__ = [
    "EXCHANGE",
    "REASONS",
    "BinanceParser",
    "Control",
    "HistoricalTrade",
    "HistoryPage",
    "ParsedFrames",
    "RejectedRow",
    "combined_stream_url",
    "decode_history",
    "historical_trades_url",
    "history_trades",
    "quote_currency",
    "trade_from_rest",
]

EXCHANGE = "BINANCE"
REASONS = (
    "bad_json",
    "missing_field",
    "invalid_number",
    "non_positive",
    "clock_skew",
    "unknown_symbol",
    "unknown_stream",
    "frame_too_large",
    "invalid_id",
    "invalid_time",
)
# Ids and times are stored as int64 (Arrow, Iceberg long and timestamptz): a venue id outside
# 0..2^63-1, or a time that is no timestamp (before 1970 or after year 9999, in microseconds),
# would stop the writer, so such input is a dead letter like any other bad value.
MAX_ID = 2**63 - 1
MAX_TIME_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
_QUOTE_CURRENCIES = ("USDT", "USDC", "FDUSD", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY")


def quote_currency(symbol: str) -> str:
    for ccy in _QUOTE_CURRENCIES:
        if symbol.endswith(ccy) and len(symbol) > len(ccy):
            return ccy
    return "UNKNOWN"


def combined_stream_url(ws_url: str, symbols: Iterable[str]) -> str:
    streams = "/".join(f"{s.lower()}@{kind}" for s in symbols for kind in ("trade", "bookTicker"))
    return f"{ws_url.rstrip('/')}/stream?streams={quote(streams, safe='/@')}"


def historical_trades_url(rest_url: str, symbol: str, from_id: int, limit: int) -> str:
    base = rest_url.rstrip("/")
    return f"{base}/api/v3/historicalTrades?symbol={symbol}&fromId={from_id}&limit={limit}"


class _TradePayload(msgspec.Struct, gc=False):
    e: str
    E: int
    s: str
    t: int
    p: str
    q: str
    T: int
    m: bool
    M: bool = True


class _BookTickerPayload(msgspec.Struct, gc=False):
    u: int
    s: str
    b: str
    B: str
    a: str
    A: str


class _Envelope(msgspec.Struct, gc=False):
    stream: str
    data: msgspec.Raw


class _Data(msgspec.Struct, gc=False):
    """A trade's or a bookTicker's payload, whichever it is: a batch of frames of both kinds
    decodes in one call. gc=False: a batch is thousands of them, which the cycle collector
    would otherwise walk again and again while they are made."""

    e: str | None = None
    E: int | None = None
    s: str | None = None
    t: int | None = None
    p: str | None = None
    q: str | None = None
    T: int | None = None
    m: bool | None = None
    M: bool | None = None
    u: int | None = None
    b: str | None = None
    B: str | None = None
    a: str | None = None
    A: str | None = None


class _Frame(msgspec.Struct, gc=False):
    stream: str
    data: _Data


_STREAM = attrgetter("stream")
_DATA = attrgetter("data")
_TRADE_FIELDS = tuple(map(attrgetter, ("e", "E", "s", "t", "p", "q", "T", "m", "M")))
_QUOTE_FIELDS = tuple(map(attrgetter, ("u", "s", "b", "B", "a", "A")))
# Frames of the combined stream start so (the venue writes compact JSON); others, such as
# subscription replies and serverShutdown, are parsed at once.
_MARKET = b'{"stream":'
# Market frames that wait for one decode, at most (a feed's batch is usually smaller).
_DEFER_MAX = 4_096
# With the C scanner (k2d/venues/_binance_scan.c) a batch's market frames wait for finish(),
# which scans them all at once; this bounds them should a caller never call it.
_SCAN_DEFER_MAX = 65_536
_SIDES = pa.array(["BUY", "SELL"], pa.string())  # by `m`: true, the buyer was the maker: SELL


class _Control(msgspec.Struct, omit_defaults=True):
    e: str | None = None
    E: int | None = None
    id: int | str | None = None
    result: msgspec.Raw | None = None
    error: msgspec.Raw | None = None


class HistoricalTrade(msgspec.Struct):
    """One item of GET /api/v3/historicalTrades (and /api/v3/trades)."""

    id: int
    price: str
    qty: str
    time: int
    isBuyerMaker: bool
    isBestMatch: bool = True
    quoteQty: str | None = None


@dataclass(frozen=True)
class Control:
    """A non-market frame: a subscription reply, or the venue announcing a shutdown."""

    kind: str  # "reply", "server_shutdown", "error"
    detail: str = ""


class _Columns:
    """A list per field, one entry a row, until BinanceParser.finish()."""

    symbol: list[str]
    id: list[int]
    kind: ClassVar[str]  # "trade" or "quote"

    def extend(self, other: Self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            getattr(self, f.name).extend(getattr(other, f.name))

    def without(self, drop: Container[int]) -> Self:
        """These rows less the rows numbered in `drop`."""
        keep = [i not in drop for i in range(len(self.id))]
        return type(self)(
            **{f.name: list(compress(getattr(self, f.name), keep)) for f in fields(self)}  # type: ignore[arg-type]
        )

    def by_symbol(self) -> Self:
        """These rows with each symbol's rows together, the symbols in the order each first
        comes and each one's rows in batch order: what k2d.columns.by_stream makes of their
        table, in Python, which costs less than its Arrow calls for a few hundred rows."""
        groups: dict[str, list[int]] = {}
        for i, symbol in enumerate(self.symbol):
            rows = groups.get(symbol)
            if rows is None:
                groups[symbol] = [i]
            else:
                rows.append(i)
        if len(groups) == 1:
            return self
        order = [i for rows in groups.values() for i in rows]
        if all(map(operator.eq, order, range(len(order)))):
            return self
        pick = operator.itemgetter(*order)
        return type(self)(**{f.name: list(pick(getattr(self, f.name))) for f in fields(self)})  # type: ignore[arg-type]

    def message_ids(self, start: int) -> list[str]:
        """message_id of the rows from `start` on, as the model's functions make them."""
        make = trade_message_id if self.kind == "trade" else quote_message_id
        rows = zip(self.symbol[start:], self.id[start:], strict=True)
        return [make(EXCHANGE, s, i) for s, i in rows]


@dataclass
class _TradeColumns(_Columns):
    """Trades of a batch."""

    kind = "trade"
    symbol: list[str] = field(default_factory=list)
    id: list[int] = field(default_factory=list)
    time_ms: list[int] = field(default_factory=list)
    event_ms: list[int] = field(default_factory=list)
    price: list[str] = field(default_factory=list)
    qty: list[str] = field(default_factory=list)
    maker: list[bool] = field(default_factory=list)
    best: list[bool] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    frame: list[bytes] = field(default_factory=list)


@dataclass
class _QuoteColumns(_Columns):
    """Quotes of a batch."""

    kind = "quote"
    symbol: list[str] = field(default_factory=list)
    id: list[int] = field(default_factory=list)
    bid: list[str] = field(default_factory=list)
    bid_qty: list[str] = field(default_factory=list)
    ask: list[str] = field(default_factory=list)
    ask_qty: list[str] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    frame: list[bytes] = field(default_factory=list)


@dataclass
class ParsedFrames:
    """Accumulator for one batch of parsed frames, in venue order per symbol.

    Market frames wait in `deferred` until the parser decodes them together (or a frame of
    another kind comes, which keeps the order of dead letters); rows gather a list per
    field; BinanceParser.finish() checks them and leaves them in `columns` as Arrow
    (k2d.columns: "trades", "quotes"). No record object is made on the way."""

    dead_letters: list[DeadLetter] = field(default_factory=list)
    max_event_us: int = 0
    columns: dict[str, pa.Table] = field(default_factory=dict)
    deferred: list[bytes] = field(default_factory=list)
    deferred_at: list[int] = field(default_factory=list)
    trade_rows: _TradeColumns = field(default_factory=_TradeColumns)
    quote_rows: _QuoteColumns = field(default_factory=_QuoteColumns)

    # Rows finish() has moved into `columns`.
    finished: int = 0

    def __len__(self) -> int:
        # Called for every frame: plain lengths, no Arrow.
        return (
            len(self.deferred)
            + len(self.dead_letters)
            + len(self.trade_rows.id)
            + len(self.quote_rows.id)
            + self.finished
        )

    @property
    def trade_count(self) -> int:
        table = self.columns.get("trades")
        return len(self.trade_rows.id) + (table.num_rows if table is not None else 0)

    @property
    def quote_count(self) -> int:
        table = self.columns.get("quotes")
        return len(self.quote_rows.id) + (table.num_rows if table is not None else 0)

    def message_ids(self, table: str, start: int) -> list[str]:
        """message_id of the rows of `table` parsed (not yet finished) from `start` on."""
        rows = self.trade_rows if table == "trades" else self.quote_rows
        return rows.message_ids(start)

    def drop(self, table: str, rows: Container[int]) -> None:
        """Forget rows of `table` parsed (not yet finished), by number."""
        if table == "trades":
            self.trade_rows = self.trade_rows.without(rows)
        else:
            self.quote_rows = self.quote_rows.without(rows)

    @property
    def trades(self) -> list[Trade]:
        """The trades as records, once finish() has made them columns."""
        table = self.columns.get("trades")
        return [] if table is None else columns_to_records(table, Trade)

    @property
    def quotes(self) -> list[Quote]:
        table = self.columns.get("quotes")
        return [] if table is None else columns_to_records(table, Quote)


class BinanceParser:
    """Turns raw combined-stream frames into records. One instance per feed."""

    def __init__(
        self,
        symbols: Iterable[str],
        *,
        source: str = "binance",
        max_clock_skew_s: float = 300.0,
        max_frame_bytes: int = 65_536,
        provenance: str = "live",
    ) -> None:
        self.symbols = frozenset(symbols)
        self.source = source
        self.provenance = provenance
        self._max_skew_us = int(max_clock_skew_s * 1_000_000)
        self._max_frame = max_frame_bytes
        self._currency = {s: quote_currency(s) for s in self.symbols}
        self._trade_streams = {f"{s.lower()}@trade": s for s in self.symbols}
        self._quote_streams = {f"{s.lower()}@bookTicker": s for s in self.symbols}
        self._envelope = msgspec.json.Decoder(_Envelope)
        self._trade = msgspec.json.Decoder(_TradePayload)
        self._book = msgspec.json.Decoder(_BookTickerPayload)
        self._control = msgspec.json.Decoder(_Control)
        self._batch = msgspec.json.Decoder(list[_Frame])
        # What the C scanner needs, built once: symbols by index, the stream names to
        # (kind, index) as the dicts above have them, each symbol's message_id prefixes.
        names = sorted(self.symbols)
        index = {s: i for i, s in enumerate(names)}
        self._scan_args = (
            {
                **{k.encode(): (0, index[s]) for k, s in self._trade_streams.items()},
                **{k.encode(): (1, index[s]) for k, s in self._quote_streams.items()},
            },
            [s.encode() for s in names],
            [f"{EXCHANGE}:{s}:trade:".encode() for s in names],
            [f"{EXCHANGE}:{s}:quote:".encode() for s in names],
            self._max_skew_us,
            self._max_frame,
        )
        self._names = pa.array(names, pa.string())
        self._currencies = pa.array([self._currency[s] for s in names], pa.string())
        self._defer_max = _DEFER_MAX if _binance_scan is None else _SCAN_DEFER_MAX

    def _dead(
        self, out: ParsedFrames, frame: bytes, received_us: int, reason: str, detail: str
    ) -> None:
        out.dead_letters.append(
            DeadLetter(
                received_at=received_us,
                source=self.source,
                exchange=EXCHANGE,
                reason=reason,
                raw=frame[: self._max_frame],
                detail=detail[:500],
            )
        )

    def parse(self, frame: bytes, received_us: int, out: ParsedFrames) -> Control | None:
        """Parse one frame into `out`; return a Control for non-market frames. A market
        frame waits in `out.deferred`, to be decoded with the frames after it (settle)."""
        if frame.startswith(_MARKET) and len(frame) <= self._max_frame:
            out.deferred.append(frame)
            out.deferred_at.append(received_us)
            if len(out.deferred) >= self._defer_max:
                self.settle(out)
            return None
        self.settle(out)
        return self._parse_one(frame, received_us, out)

    def parse_many(self, frames: list[bytes], received: list[int], out: ParsedFrames) -> None:
        """parse() each frame, for a replay (of the journal), where a control frame needs no
        answer. With the C scanner, all are deferred at once, no Python call a frame: the
        scanner takes only market frames within max_frame_bytes, and any other sends the
        batch the Python parser's way, which judges each frame as parse() would."""
        if _binance_scan is not None and len(out.deferred) + len(frames) <= self._defer_max:
            out.deferred += frames
            out.deferred_at += received
            return
        for frame, at in zip(frames, received, strict=True):
            self.parse(frame, at, out)

    def settle(self, out: ParsedFrames) -> None:
        """Parse the frames waiting in `out.deferred`: all at once when every one of them is
        a well-formed trade or quote of a subscribed symbol, else one by one, each fault with
        its dead letter, exactly as `parse` would have taken them one at a time."""
        waiting, waiting_at = out.deferred, out.deferred_at
        out.deferred, out.deferred_at = [], []
        for start in range(0, len(waiting), _DEFER_MAX):
            frames = waiting[start : start + _DEFER_MAX]
            received = waiting_at[start : start + _DEFER_MAX]
            if not self._take_all(frames, received, out):
                for frame, at in zip(frames, received, strict=True):
                    self._parse_one(frame, at, out)

    def _take_all(self, frames: list[bytes], received: list[int], out: ParsedFrames) -> bool:
        """Decode `frames` as one JSON array and append them as rows, if nothing in them
        needs a dead letter; False, with nothing appended, otherwise. Every check of
        _parse_trade and _parse_quote is made here on whole columns, in C (builtins over
        lists), not frame by frame."""
        if max(map(len, frames)) > self._max_frame:
            return False  # parse_many defers every frame: this one is a dead letter
        try:
            decoded = self._batch.decode(b"[" + b",".join(frames) + b"]")
        except msgspec.DecodeError:
            return False
        if len(decoded) != len(frames):
            return False  # a frame that holds more than one value
        streams = list(map(_STREAM, decoded))
        data = list(map(_DATA, decoded))
        trade_symbols = list(map(self._trade_streams.get, streams))
        if None not in trade_symbols:
            trades, quotes = _TradeColumns(), None
            symbols = cast(list[str], trade_symbols)
            if not self._check_trades(data, symbols, frames, received, trades):
                return False
        else:
            is_trade = list(map(operator.is_not, trade_symbols, itertools.repeat(None)))
            is_quote = list(map(operator.not_, is_trade))
            found = list(map(self._quote_streams.get, compress(streams, is_quote)))
            if None in found:
                return False  # a stream not subscribed
            quote_symbols = cast(list[str], found)
            trades, quotes = _TradeColumns(), _QuoteColumns()
            if not self._check_quotes(
                list(compress(data, is_quote)),
                quote_symbols,
                list(compress(frames, is_quote)),
                list(compress(received, is_quote)),
                quotes,
            ):
                return False
            if any(is_trade) and not self._check_trades(
                list(compress(data, is_trade)),
                cast(list[str], list(compress(trade_symbols, is_trade))),
                list(compress(frames, is_trade)),
                list(compress(received, is_trade)),
                trades,
            ):
                return False
        if trades.id:
            out.trade_rows.extend(trades)
            out.max_event_us = max(out.max_event_us, max(trades.time_ms) * 1000)
        if quotes is not None and quotes.id:
            out.quote_rows.extend(quotes)
        return True

    def _check_trades(
        self,
        data: list[_Data],
        symbols: list[str],
        frames: list[bytes],
        received: list[int],
        into: _TradeColumns,
    ) -> bool:
        e, event, s, ids, price, qty, times, maker, best = (
            list(map(get, data)) for get in _TRADE_FIELDS
        )
        if any(None in column for column in (e, event, s, ids, price, qty, times, maker, best)):
            return False  # a field missing (or null), or M not given: the one-by-one path
        if s != symbols or min(ids) < 0 or max(ids) > MAX_ID:
            return False
        top_ms = MAX_TIME_US // 1000
        if min(times) < 0 or max(times) > top_ms or min(event) < 0 or max(event) > top_ms:
            return False
        skew = list(map(operator.sub, map(operator.mul, times, itertools.repeat(1000)), received))
        if min(skew) < -self._max_skew_us or max(skew) > self._max_skew_us:
            return False
        into.symbol, into.id, into.time_ms, into.event_ms = symbols, ids, times, event
        into.price, into.qty, into.maker, into.best = price, qty, maker, best
        into.received, into.frame = received, frames
        return True

    def _check_quotes(
        self,
        data: list[_Data],
        symbols: list[str],
        frames: list[bytes],
        received: list[int],
        into: _QuoteColumns,
    ) -> bool:
        ids, s, bid, bid_qty, ask, ask_qty = (list(map(get, data)) for get in _QUOTE_FIELDS)
        if any(None in column for column in (ids, s, bid, bid_qty, ask, ask_qty)):
            return False
        if s != symbols or min(ids) < 0 or max(ids) > MAX_ID:
            return False
        into.symbol, into.id, into.bid, into.bid_qty = symbols, ids, bid, bid_qty
        into.ask, into.ask_qty, into.received, into.frame = ask, ask_qty, received, frames
        return True

    def _parse_one(self, frame: bytes, received_us: int, out: ParsedFrames) -> Control | None:
        if len(frame) > self._max_frame:
            self._dead(out, frame, received_us, "frame_too_large", f"{len(frame)} bytes")
            return None
        try:
            env = self._envelope.decode(frame)
        except msgspec.DecodeError as e:
            return self._parse_other(frame, received_us, out, e)
        stream = env.stream
        symbol = self._trade_streams.get(stream)
        if symbol is not None:
            self._parse_trade(frame, env.data, symbol, received_us, out)
            return None
        symbol = self._quote_streams.get(stream)
        if symbol is not None:
            self._parse_quote(frame, env.data, symbol, received_us, out)
            return None
        self._dead(out, frame, received_us, "unknown_stream", f"stream {stream!r} not subscribed")
        return None

    def _parse_other(
        self, frame: bytes, received_us: int, out: ParsedFrames, err: msgspec.DecodeError
    ) -> Control | None:
        try:
            ctl = self._control.decode(frame)
        except msgspec.DecodeError:
            ctl = None
        if ctl is not None:
            if ctl.e == "serverShutdown":
                return Control("server_shutdown")
            if ctl.id is not None and ctl.error is not None:
                return Control("error", bytes(ctl.error).decode(errors="replace"))
            if ctl.id is not None:
                return Control("reply")
        reason = "bad_json" if not _is_json(frame) else "missing_field"
        self._dead(out, frame, received_us, reason, str(err))
        return None

    def _parse_trade(
        self, frame: bytes, raw: msgspec.Raw, symbol: str, received_us: int, out: ParsedFrames
    ) -> None:
        try:
            t = self._trade.decode(raw)
        except msgspec.ValidationError as e:
            self._dead(out, frame, received_us, "missing_field", str(e))
            return
        except msgspec.DecodeError as e:
            self._dead(out, frame, received_us, "bad_json", str(e))
            return
        if t.s != symbol:
            self._dead(out, frame, received_us, "unknown_symbol", f"symbol {t.s!r} on {symbol}")
            return
        if not 0 <= t.t <= MAX_ID:
            self._dead(out, frame, received_us, "invalid_id", f"trade id {_int_text(t.t)}")
            return
        ts = t.T * 1000
        if not (0 <= ts <= MAX_TIME_US and 0 <= t.E * 1000 <= MAX_TIME_US):
            detail = f"trade time {_int_text(t.T)} event time {_int_text(t.E)} (ms)"
            self._dead(out, frame, received_us, "invalid_time", detail)
            return
        if abs(ts - received_us) > self._max_skew_us:
            self._dead(
                out,
                frame,
                received_us,
                "clock_skew",
                f"trade time {ts} is {(ts - received_us) / 1e6:.1f}s from receive time",
            )
            return
        if ts > out.max_event_us:
            out.max_event_us = ts
        rows = out.trade_rows
        rows.symbol.append(symbol)
        rows.id.append(t.t)
        rows.time_ms.append(t.T)
        rows.event_ms.append(t.E)
        rows.price.append(t.p)
        rows.qty.append(t.q)
        rows.maker.append(t.m)
        rows.best.append(t.M)
        rows.received.append(received_us)
        rows.frame.append(frame)

    def _parse_quote(
        self, frame: bytes, raw: msgspec.Raw, symbol: str, received_us: int, out: ParsedFrames
    ) -> None:
        try:
            b = self._book.decode(raw)
        except msgspec.ValidationError as e:
            self._dead(out, frame, received_us, "missing_field", str(e))
            return
        except msgspec.DecodeError as e:
            self._dead(out, frame, received_us, "bad_json", str(e))
            return
        if b.s != symbol:
            self._dead(out, frame, received_us, "unknown_symbol", f"symbol {b.s!r} on {symbol}")
            return
        if not 0 <= b.u <= MAX_ID:
            self._dead(out, frame, received_us, "invalid_id", f"update id {_int_text(b.u)}")
            return
        rows = out.quote_rows
        rows.symbol.append(symbol)
        rows.id.append(b.u)
        rows.bid.append(b.b)
        rows.bid_qty.append(b.B)
        rows.ask.append(b.a)
        rows.ask_qty.append(b.A)
        rows.received.append(received_us)
        rows.frame.append(frame)

    def finish(self, out: ParsedFrames) -> None:
        """Check the batch's decimals, dead-letter the rows that fail, and leave the rest in
        out.columns as Arrow (k2d.columns), each symbol's rows together.

        A large batch is checked by Arrow's regex, a column at a time; a small one (a feed's
        10 ms batch) by compiled Python regexes, which for tens of rows cost less than the
        Arrow calls' own overhead (k2d.columns.SMALL_BATCH_ROWS).

        A batch of market frames only, all well formed, goes through the C scanner instead
        (when k2d was built with it): the same rows, with no Python object per frame.
        """
        if (
            out.deferred
            and _binance_scan is not None
            and not (out.trade_rows.id or out.quote_rows.id or out.columns)
            and self._take_scanned(out)
        ):
            return
        self.settle(out)
        if out.trade_rows.id:
            rows, out.trade_rows = out.trade_rows, _TradeColumns()
            _add(out, "trades", self._trade_table(rows, out))
        if out.quote_rows.id:
            quotes, out.quote_rows = out.quote_rows, _QuoteColumns()
            _add(out, "quotes", self._quote_table(quotes, out))

    def _take_scanned(self, out: ParsedFrames) -> bool:
        """The waiting frames scanned in C into Arrow tables, each symbol's rows together;
        False, with nothing taken, when one of them needs the Python parser's judgement."""
        assert _binance_scan is not None
        found = _binance_scan.scan(out.deferred, out.deferred_at, *self._scan_args)
        if found is None:
            return False
        out.deferred, out.deferred_at = [], []
        max_time_ms, trades, quotes = found
        if trades is not None:
            out.max_event_us = max(out.max_event_us, max_time_ms * 1000)
            _add(out, "trades", self._scanned_trades(trades))
        if quotes is not None:
            _add(out, "quotes", self._scanned_quotes(quotes))
        return True

    def _scanned_trades(self, buffers: tuple[Any, ...]) -> pa.Table:
        n, sym, seq, recv, ts, maker, msg_o, msg, id_o, ids, p_o, p, q_o, q, v_o, v = buffers
        symbol = _fixed_width(pa.int32(), n, sym)
        return pa.Table.from_arrays(
            [
                _text(n, msg_o, msg),
                _text(n, id_o, ids),
                self._names.take(symbol),
                pa.repeat(EXCHANGE, n),
                pa.repeat("crypto", n),
                _fixed_width(pa.int64(), n, ts),
                _text(n, p_o, p),
                _text(n, q_o, q),
                self._currencies.take(symbol),
                _SIDES.take(_fixed_width(pa.uint8(), n, maker)),
                pa.nulls(n, pa.list_(pa.string())),
                _fixed_width(pa.int64(), n, seq),
                _fixed_width(pa.int64(), n, recv),
                pa.repeat(0, n),
                _text(n, v_o, v),
                pa.repeat(self.provenance, n),
            ],
            schema=TRADE_COLUMNS,
        )

    def _scanned_quotes(self, buffers: tuple[Any, ...]) -> pa.Table:
        n, sym, seq, recv, msg_o, msg, b_o, b, bq_o, bq, a_o, a, aq_o, aq = buffers
        symbol = _fixed_width(pa.int32(), n, sym)
        received = _fixed_width(pa.int64(), n, recv)
        return pa.Table.from_arrays(
            [
                _text(n, msg_o, msg),
                self._names.take(symbol),
                pa.repeat(EXCHANGE, n),
                pa.repeat("crypto", n),
                received,
                _text(n, b_o, b),
                _text(n, bq_o, bq),
                _text(n, a_o, a),
                _text(n, aq_o, aq),
                self._currencies.take(symbol),
                _fixed_width(pa.int64(), n, seq),
                received,
                pa.repeat(0, n),
                pa.nulls(n, pa.string()),
                pa.repeat(self.provenance, n),
            ],
            schema=QUOTE_COLUMNS,
        )

    def _trade_table(self, rows: _TradeColumns, out: ParsedFrames) -> pa.Table:
        """The rows that pass the decimal checks, each symbol's together (by_stream)."""
        # A small batch's decimals are checked, and its rows put in symbol order, in Python
        # before Arrow is built; a large one's by Arrow (a regex a column; by_stream's sort
        # and take of the built table), which costs ~250 us however few the rows.
        small = len(rows.id) <= SMALL_BATCH_ROWS
        if small:
            bad = _bad_decimal_lists(rows.price, rows.qty, nullable=False)
        else:
            price, qty = pa.array(rows.price, pa.string()), pa.array(rows.qty, pa.string())
            bad = _bad_decimal_arrays(price, qty, nullable=False)
        if bad:
            for i, reason in bad.items():
                detail = f"price {rows.price[i]!r} quantity {rows.qty[i]!r}"
                self._dead(out, rows.frame[i], rows.received[i], reason, detail)
            rows = rows.without(bad)
            if not rows.id:
                return TRADE_COLUMNS.empty_table()
        n = len(rows.id)
        if small:
            rows = rows.by_symbol()
        if bad or small:
            price, qty = pa.array(rows.price, pa.string()), pa.array(rows.qty, pa.string())
        ids = pa.array(rows.id, pa.int64())
        trade_id = ids.cast(pa.string())
        symbol = pa.array(rows.symbol, pa.string())
        best = pc.if_else(pa.array(rows.best, pa.bool_()), "true", "false")
        event = pa.array(rows.event_ms, pa.int64()).cast(pa.string())
        table = pa.Table.from_arrays(
            [
                pc.binary_join_element_wise(f"{EXCHANGE}:", symbol, ":trade:", trade_id, ""),
                trade_id,
                symbol,
                pa.repeat(EXCHANGE, n),
                pa.repeat("crypto", n),
                pc.multiply(pa.array(rows.time_ms, pa.int64()), 1000),
                price,
                qty,
                pa.array(map(self._currency.__getitem__, rows.symbol), pa.string(), size=n),
                # m=true: the buyer is the maker, so the aggressor sold.
                pc.if_else(pa.array(rows.maker, pa.bool_()), "SELL", "BUY"),
                pa.nulls(n, pa.list_(pa.string())),
                ids,
                pa.array(rows.received, pa.int64()),
                pa.repeat(0, n),
                pc.binary_join_element_wise('{"E":', event, ',"M":', best, "}", ""),
                pa.repeat(self.provenance, n),
            ],
            schema=TRADE_COLUMNS,
        )
        return table if small else by_stream_if_any(table)

    def _quote_table(self, rows: _QuoteColumns, out: ParsedFrames) -> pa.Table:
        """The quotes that pass the decimal checks (an empty side nulled), each symbol's
        together (by_stream)."""
        n = len(rows.id)
        bid, ask = rows.bid, rows.ask
        small = n <= SMALL_BATCH_ROWS  # as in _trade_table
        if small:
            bad = _bad_decimal_lists(bid + ask, rows.bid_qty + rows.ask_qty, nullable=True)
        else:
            bad = _bad_decimal_arrays(
                pa.array(bid + ask, pa.string()),
                pa.array(rows.bid_qty + rows.ask_qty, pa.string()),
                nullable=True,
            )
        bid_qty, ask_qty = rows.bid_qty, rows.ask_qty
        if bad:
            dead: dict[int, str] = {}
            nulled_bid, nulled_ask = list(bid), list(ask)
            nulled_bid_qty, nulled_ask_qty = list(bid_qty), list(ask_qty)
            for i in range(n):
                bid_bad, ask_bad = bad.get(i), bad.get(n + i)
                if "invalid_number" in (bid_bad, ask_bad):
                    dead[i] = "invalid_number"
                    detail = "bid/ask not decimal(18,8)"
                    self._dead(out, rows.frame[i], rows.received[i], "invalid_number", detail)
                    continue
                # A zero price is how the venue shows an empty side: store null, not zero.
                if bid_bad and ask_bad:
                    dead[i] = "non_positive"
                    detail = "both sides empty"
                    self._dead(out, rows.frame[i], rows.received[i], "non_positive", detail)
                    continue
                if bid_bad:
                    nulled_bid[i] = nulled_bid_qty[i] = None  # type: ignore[call-overload]
                if ask_bad:
                    nulled_ask[i] = nulled_ask_qty[i] = None  # type: ignore[call-overload]
            rows.bid, rows.ask = nulled_bid, nulled_ask
            rows.bid_qty, rows.ask_qty = nulled_bid_qty, nulled_ask_qty
            rows = rows.without(dead)
            n = len(rows.id)
            if not n:
                return QUOTE_COLUMNS.empty_table()
        if small:
            rows = rows.by_symbol()
        ids = pa.array(rows.id, pa.int64())
        symbol = pa.array(rows.symbol, pa.string())
        received = pa.array(rows.received, pa.int64())
        # bookTicker carries no event time: the receive time is the quote's time.
        table = pa.Table.from_arrays(
            [
                pc.binary_join_element_wise(
                    f"{EXCHANGE}:", symbol, ":quote:", ids.cast(pa.string()), ""
                ),
                symbol,
                pa.repeat(EXCHANGE, n),
                pa.repeat("crypto", n),
                received,
                pa.array(rows.bid, pa.string()),
                pa.array(rows.bid_qty, pa.string()),
                pa.array(rows.ask, pa.string()),
                pa.array(rows.ask_qty, pa.string()),
                pa.array(map(self._currency.__getitem__, rows.symbol), pa.string(), size=n),
                ids,
                received,
                pa.repeat(0, n),
                pa.nulls(n, pa.string()),
                pa.repeat(self.provenance, n),
            ],
            schema=QUOTE_COLUMNS,
        )
        return table if small else by_stream_if_any(table)


def _text(n: int, offsets: bytes, data: bytes) -> pa.Array:
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _fixed_width(kind: pa.DataType, n: int, data: bytes) -> pa.Array:
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(data)])


def by_stream_if_any(rows: pa.Table) -> pa.Table:
    """`rows` with each symbol's rows together (k2d.columns.by_stream): every stage after
    the parser splits a batch by symbol, and then only slices it."""
    return by_stream(rows).columns if rows.num_rows else rows


def _add(out: ParsedFrames, table: str, rows: pa.Table) -> None:
    had = out.columns.get(table)
    out.columns[table] = rows if had is None else pa.concat_tables([had, rows])
    out.finished += rows.num_rows


# Exact decimal(18,8): at most 10 integer digits and 8 fractional digits, no sign or exponent.
# RE2's \d (Arrow's regex) is [0-9]; Python's would take other scripts' digits too.
_DECIMAL_RE = r"^\d{1,10}(\.\d{1,8})?$"
_DECIMAL = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,8})?").fullmatch
_NONZERO = re.compile(r"[1-9]").search


def _bad_decimal_lists(
    prices: Sequence[str | None], qtys: Sequence[str | None], *, nullable: bool
) -> dict[int, str]:
    """_bad_decimal_arrays for a few rows, in Python: the same reasons for the same values
    (a null, where `nullable`, is well formed and not positive)."""
    bad: dict[int, str] = {}
    for i, (p, q) in enumerate(zip(prices, qtys, strict=True)):
        if p is None or q is None:
            if not nullable:
                raise ValueError("a null price or quantity where none is allowed")
            well_formed = True
            positive = p is not None and _NONZERO(p) is not None
        else:
            well_formed = _DECIMAL(p) is not None and _DECIMAL(q) is not None
            positive = _NONZERO(p) is not None and (nullable or _NONZERO(q) is not None)
        if not well_formed:
            bad[i] = "invalid_number"
        elif not positive:
            bad[i] = "non_positive"
    return bad


def _bad_decimal_arrays(p_arr: pa.Array, q_arr: pa.Array, *, nullable: bool) -> dict[int, str]:
    """Row index -> reason, for rows whose price or quantity is not a decimal(18,8), or
    whose price (and, for trades, quantity) is not positive."""
    well_formed = pc.and_(
        pc.match_substring_regex(p_arr, _DECIMAL_RE), pc.match_substring_regex(q_arr, _DECIMAL_RE)
    )
    positive = pc.match_substring_regex(p_arr, "[1-9]")
    if not nullable:
        positive = pc.and_(positive, pc.match_substring_regex(q_arr, "[1-9]"))
    else:
        well_formed = pc.fill_null(well_formed, True)
        positive = pc.fill_null(positive, False)
    if pc.all(well_formed).as_py() and pc.all(positive).as_py():
        return {}
    bad: dict[int, str] = {}
    for i, (ok, pos) in enumerate(zip(well_formed.to_pylist(), positive.to_pylist(), strict=True)):
        if not ok:
            bad[i] = "invalid_number"
        elif not pos:
            bad[i] = "non_positive"
    return bad


@dataclass
class HistoryPage:
    """One historicalTrades answer, item by item: one bad item spoils only itself."""

    items: list[HistoricalTrade] = field(default_factory=list)
    raws: list[bytes] = field(default_factory=list)  # the venue's bytes of each item
    # Items that are not a trade at all: (bytes, why, their id if one could be read).
    undecodable: list[tuple[bytes, str, int | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items) + len(self.undecodable)


class _ItemId(msgspec.Struct):
    id: int


_history_list = msgspec.json.Decoder(list[msgspec.Raw])
_history_item = msgspec.json.Decoder(HistoricalTrade)
_history_id = msgspec.json.Decoder(_ItemId)


def decode_history(body: bytes) -> HistoryPage:
    """Split a historicalTrades body into items; raises msgspec.DecodeError if the body is
    not a JSON list at all."""
    page = HistoryPage()
    for raw in _history_list.decode(body):
        item_bytes = bytes(raw)
        try:
            page.items.append(_history_item.decode(item_bytes))
        except msgspec.DecodeError as exc:
            try:
                item_id: int | None = _history_id.decode(item_bytes).id
            except msgspec.DecodeError:
                item_id = None
            page.undecodable.append((item_bytes, str(exc), item_id))
            continue
        page.raws.append(item_bytes)
    return page


@dataclass(frozen=True)
class RejectedRow:
    """A history item that cannot be stored: its dead letter, and its venue id when that is a
    valid id (the id can then be closed as unrecoverable: asking again brings the same row)."""

    trade_id: int | None
    dead_letter: DeadLetter


def history_trades(
    page: HistoryPage,
    symbol: str,
    received_us: int,
    *,
    source: str = "backfill",
    provenance: str = "backfill",
) -> tuple[list[Trade], list[RejectedRow]]:
    """A page's items as Trades (venue order), after the checks a live frame goes through
    (except clock skew: history is old by nature); the others as RejectedRows."""
    rejected: list[RejectedRow] = []

    def reject(raw: bytes, trade_id: int | None, reason: str, detail: str) -> None:
        letter = DeadLetter(
            received_at=received_us,
            source=source,
            exchange=EXCHANGE,
            reason=reason,
            raw=raw,
            detail=f"{symbol} history: {detail}"[:500],
        )
        ok_id = trade_id if trade_id is not None and 0 <= trade_id <= MAX_ID else None
        rejected.append(RejectedRow(ok_id, letter))

    for raw, detail, item_id in page.undecodable:
        reject(raw, item_id, "missing_field", detail)
    candidates: list[tuple[HistoricalTrade, bytes]] = []
    for item, raw in zip(page.items, page.raws, strict=True):
        if not 0 <= item.id <= MAX_ID:
            reject(raw, None, "invalid_id", f"trade id {_int_text(item.id)}")
        elif not 0 <= item.time * 1000 <= MAX_TIME_US:
            reject(raw, item.id, "invalid_time", f"trade time {_int_text(item.time)} (ms)")
        else:
            candidates.append((item, raw))
    if not candidates:
        return [], rejected
    bad = _bad_decimal_arrays(
        pa.array([item.price for item, _ in candidates], pa.string()),
        pa.array([item.qty for item, _ in candidates], pa.string()),
        nullable=False,
    )
    trades: list[Trade] = []
    for i, (item, raw) in enumerate(candidates):
        reason = bad.get(i)
        if reason is None:
            trades.append(trade_from_rest(item, symbol, received_us, provenance))
        else:
            reject(raw, item.id, reason, f"price {item.price!r} quantity {item.qty!r}")
    return trades, rejected


def trade_from_rest(
    item: HistoricalTrade, symbol: str, received_us: int, provenance: str = "backfill"
) -> Trade:
    """A REST history item as a Trade, with the same message_id as the live frame. Unchecked:
    history_trades is the way in for items straight from the venue."""
    return Trade(
        message_id=trade_message_id(EXCHANGE, symbol, item.id),
        trade_id=str(item.id),
        symbol=symbol,
        exchange=EXCHANGE,
        asset_class="crypto",
        timestamp=item.time * 1000,
        price=item.price,
        quantity=item.qty,
        currency=quote_currency(symbol),
        side="SELL" if item.isBuyerMaker else "BUY",
        source_sequence=item.id,
        ingestion_timestamp=received_us,
        vendor_data=f'{{"M":{"true" if item.isBestMatch else "false"}}}',
        provenance=provenance,
    )


def _int_text(n: int) -> str:
    """An int for a message; a hostile one may be too long for str() (4300-digit limit)."""
    if -(10**30) < n < 10**30:
        return str(n)
    return f"{'-' if n < 0 else ''}<{n.bit_length()}-bit integer>"


def _is_json(frame: bytes) -> bool:
    try:
        msgspec.json.decode(frame)
    except msgspec.DecodeError:
        return False
    return True
