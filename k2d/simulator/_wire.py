"""Binance spot market-stream messages, encoded once and framed once for every subscriber."""

from __future__ import annotations

import struct

import msgspec

_encoder = msgspec.json.Encoder()

DAY_MS = 86_400_000
UNITS = 100_000_000  # prices and quantities are integers of 1e-8, printed with 8 decimals
HUGE_ID = 2**64 - 1  # the `huge_id` fault's id: fits JSON and uint64, not an int64 column
ID_JUMP = 1_000_000  # how far ahead the `id_jump` fault's trade id is


class TradeEvent(msgspec.Struct):
    """`<symbol>@trade` payload; field order is Binance's."""

    e: str
    E: int
    s: str
    t: int
    p: str
    q: str
    T: int
    m: bool
    M: bool


class BookTickerEvent(msgspec.Struct):
    """`<symbol>@bookTicker` payload (spot: no event type or time)."""

    u: int
    s: str
    b: str
    B: str
    a: str
    A: str


class ShutdownEvent(msgspec.Struct):
    """Sent unwrapped on every connection before a planned close."""

    e: str
    E: int


class ErrorBody(msgspec.Struct):
    code: int
    msg: str


class ErrorReply(msgspec.Struct):
    error: ErrorBody
    id: int | str | None


class ResultReply(msgspec.Struct):
    result: list[str] | None
    id: int | str | None


def decimal8(units: int) -> str:
    """Format an integer count of 1e-8 as Binance does, e.g. 1650012000000 -> '16500.12000000'."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), UNITS)
    return f"{sign}{whole}.{frac:08d}"


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final, uncompressed RFC 6455 text frame, as a server sends it."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


def combined_prefix(stream: str) -> bytes:
    """The part of a combined-stream wrapper before the payload."""
    return b'{"stream":"' + stream.encode() + b'","data":'


def encode_trade(
    symbol: str, trade_id: int, price: int, qty: int, maker: bool, time_ms: int
) -> bytes:
    # Binance's event time trails the trade time by a millisecond or so.
    event = TradeEvent(
        "trade", time_ms + 1, symbol, trade_id, decimal8(price), decimal8(qty), time_ms, maker, True
    )
    return _encoder.encode(event)


def encode_quote(
    update_id: int, symbol: str, bid: int, bid_qty: int, ask: int, ask_qty: int
) -> bytes:
    event = BookTickerEvent(
        update_id, symbol, decimal8(bid), decimal8(bid_qty), decimal8(ask), decimal8(ask_qty)
    )
    return _encoder.encode(event)


def encode_shutdown(time_ms: int) -> bytes:
    return _encoder.encode(ShutdownEvent("serverShutdown", time_ms))


def encode_result(request_id: int | str | None, result: list[str] | None) -> bytes:
    return _encoder.encode(ResultReply(result, request_id))


def encode_error(request_id: int | str | None, code: int, msg: str) -> bytes:
    return _encoder.encode(ErrorReply(ErrorBody(code, msg), request_id))


JUNK_KINDS = (
    "bad_json",
    "missing_field",
    "non_numeric_price",
    "zero_price",
    "negative_price",
    "timestamp_far_off",
    "unknown_symbol",
)


def encode_junk(
    kind: str, symbol: str, trade_id: int, price: int, qty: int, maker: bool, time_ms: int
) -> bytes:
    """A malformed trade payload of the given kind; it reuses an id, never takes a new one."""
    fields: dict[str, object] = {
        "e": "trade",
        "E": time_ms + 1,
        "s": symbol,
        "t": trade_id,
        "p": decimal8(price),
        "q": decimal8(qty),
        "T": time_ms,
        "m": maker,
        "M": True,
    }
    if kind == "bad_json":
        whole = _encoder.encode(fields)
        return whole[: len(whole) // 2]
    if kind == "missing_field":
        del fields["p"]
    elif kind == "non_numeric_price":
        fields["p"] = "not-a-price"
    elif kind == "zero_price":
        fields["p"] = decimal8(0)
    elif kind == "negative_price":
        fields["p"] = decimal8(-price)
    elif kind == "timestamp_far_off":
        fields["E"] = time_ms + 1 + DAY_MS
        fields["T"] = time_ms + DAY_MS
    elif kind == "unknown_symbol":
        fields["s"] = "ZZZNOTLISTED"
    else:
        raise ValueError(f"unknown junk kind {kind!r}")
    return _encoder.encode(fields)
