"""The stream protocol of /v1/stream (and the NDJSON of /v1/replay): every message is a
msgspec Struct, client messages a tagged union on `op`, server messages on `type`.

Rows carry the field names of the REST JSON rows, with the same renderings (decimals as
exact strings at scale 8, times ISO-8601 with microseconds and `Z`), so one parser reads
both. A batch of rows is encoded once per channel and encoding (`Encoded`); a connection
that has several batches of a channel waiting sends them as one message by joining the
encoded rows, never encoding them again. docs/stream-protocol.md is the prose version;
k2d/api/_asyncapi.py publishes these Structs as an AsyncAPI 3 document.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import msgspec

from k2d.model import Quote, SequenceEvent, Trade
from k2d.query import EXCHANGE_SYNTAX, SYMBOL_SYNTAX, QueryError, parse_time

__all__ = [
    "CLIENT_DECODER",
    "CLOSE_CODES",
    "SPEEDS",
    "Ack",
    "Channel",
    "ClientMessage",
    "Encoded",
    "Encoding",
    "End",
    "Error",
    "Frame",
    "Gap",
    "Pause",
    "Ping",
    "Pong",
    "QuoteRow",
    "Quotes",
    "Replay",
    "Resume",
    "Seek",
    "ServerMessage",
    "Subscribe",
    "TradeRow",
    "Trades",
    "Unsubscribe",
    "decode_server",
    "encode_gap",
    "encode_message",
    "encode_rows",
    "gap_message",
    "iso_us",
    "join_frames",
    "order_for_joining",
    "parse_channel",
    "parse_since",
    "quote_row",
    "trade_row",
]

Encoding = Literal["json", "msgpack"]
Id = int | str | None

# Close codes the server uses, with the error code sent just before each (when one is).
CLOSE_NORMAL = 1000
CLOSE_RESTART = 1012
CLOSE_UNAUTHORIZED = 4401
CLOSE_SLOW = 4408
CLOSE_TOO_LARGE = 4413
CLOSE_SUBSCRIPTIONS = 4422
CLOSE_CONNECTIONS = 4429
CLOSE_FULL = 4503
CLOSE_CODES: dict[int, tuple[str, str]] = {
    CLOSE_NORMAL: ("", "normal closure (the client's)"),
    # uvicorn closes with this one; the daemon's stream.heartbeat_* say when.
    1011: ("", "no answer to the server's ping within stream.heartbeat_timeout (a dead peer)"),
    CLOSE_RESTART: ("", "the server is stopping (SIGTERM); reconnect, with `since`"),
    CLOSE_UNAUTHORIZED: ("unauthorized", "no valid API key in X-API-Key"),
    CLOSE_SLOW: ("slow_consumer", "the client fell behind its send queue"),
    CLOSE_TOO_LARGE: ("message_too_large", "a client message above stream.max_message_bytes"),
    CLOSE_SUBSCRIPTIONS: (
        "too_many_subscriptions",
        "more channels than stream.max_subscriptions",
    ),
    CLOSE_CONNECTIONS: (
        "too_many_connections",
        "more connections from this client than stream.max_connections_per_key, or its "
        "handshakes over the /v1 rate limit (`rate_limited`)",
    ),
    CLOSE_FULL: ("server_full", "stream.max_connections connections are open"),
}


# -- rows ---------------------------------------------------------------------------------


class TradeRow(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A trade as GET /v1/trades renders it."""

    message_id: str
    trade_id: str
    symbol: str
    exchange: str
    asset_class: str
    timestamp: str
    price: str
    quantity: str
    currency: str
    side: str
    trade_conditions: list[str] | None
    source_sequence: int | None
    ingestion_timestamp: str
    platform_sequence: int
    vendor_data: str | None
    provenance: str


class QuoteRow(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A quote as GET /v1/quotes renders it; an empty side is null."""

    message_id: str
    symbol: str
    exchange: str
    asset_class: str
    timestamp: str
    bid_price: str | None
    bid_quantity: str | None
    ask_price: str | None
    ask_quantity: str | None
    currency: str
    source_sequence: int | None
    ingestion_timestamp: str
    platform_sequence: int
    vendor_data: str | None
    provenance: str


# -- server messages ----------------------------------------------------------------------


class _Server(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type"):
    pass


class Ack(_Server, tag="ack", kw_only=True):
    """An op was done: `subscribe` (with the channels and the resolved `since`), `unsubscribe`,
    `replay` (with its window and speed), `pause`, `resume`, `seek` (with `at`)."""

    op: str
    id: Id = None
    channels: list[str] = msgspec.field(default_factory=list)
    since: str | None = None
    start: str | None = None
    end: str | None = None
    speed: str | None = None
    at: str | None = None
    encoding: str = "json"


class Error(_Server, tag="error", kw_only=True):
    """A refused op (the connection stays open) or, before a close, why it closes."""

    code: str
    detail: str
    id: Id = None


class Trades(_Server, tag="trades", kw_only=True):
    channel: str
    rows: list[TradeRow]


class Quotes(_Server, tag="quotes", kw_only=True):
    channel: str
    rows: list[QuoteRow]


class Gap(_Server, tag="gap", kw_only=True):
    """The ledger opened, narrowed or closed a gap (missing sequence numbers) or an outage
    (time without capture) of a channel; the latest message per event_id is its status."""

    channel: str
    event_id: str
    kind: str
    status: str
    first_missing: int | None
    last_missing: int | None
    missing_count: int
    start: str | None
    end: str | None
    detected_at: str
    resolved_at: str | None
    detail: str


class Pong(_Server, tag="pong", kw_only=True):
    id: Id = None
    time: str


class End(_Server, tag="end", kw_only=True):
    """A replay reached the end of its window (`replay_done`), or the server is stopping
    (`shutdown`, before close 1001)."""

    reason: str
    id: Id = None


ServerMessage = Ack | Error | Trades | Quotes | Gap | Pong | End


# -- client messages ----------------------------------------------------------------------


class _Client(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="op"):
    id: Id = None


class Subscribe(_Client, tag="subscribe", kw_only=True):
    """Live rows of `channels`; with `since` (a time, or a negative duration like -5m)
    the stored rows from then first, joined to live without a gap or a repeat."""

    channels: list[str]
    since: str | int | None = None
    encoding: Encoding | None = None


class Unsubscribe(_Client, tag="unsubscribe", kw_only=True):
    channels: list[str]


class Ping(_Client, tag="ping", kw_only=True):
    pass


class Replay(_Client, tag="replay", kw_only=True):
    """Stored rows of `channels` in [start, end), across channels in time order, paced at
    `speed` times the recorded pace (`max`: as fast as the connection takes them)."""

    channels: list[str]
    start: str | int
    end: str | int
    speed: str | int = 1
    encoding: Encoding | None = None


class Pause(_Client, tag="pause", kw_only=True):
    pass


class Resume(_Client, tag="resume", kw_only=True):
    pass


class Seek(_Client, tag="seek", kw_only=True):
    to: str | int


ClientMessage = Subscribe | Unsubscribe | Ping | Replay | Pause | Resume | Seek
CLIENT_DECODER = msgspec.json.Decoder(ClientMessage)
SPEEDS = ("1", "10", "100", "max")


# -- channels and times -------------------------------------------------------------------

_CHANNEL = re.compile(f"^(trades|quotes):({EXCHANGE_SYNTAX}):({SYMBOL_SYNTAX})$")
_SINCE = re.compile(r"^ *-([1-9][0-9]{0,6})(s|m|h|d) *$")
_UNIT_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}


@dataclass(frozen=True, slots=True)
class Channel:
    """`trades:BINANCE:BTCUSDT`: a table and one (exchange, symbol)."""

    table: str
    exchange: str
    symbol: str

    @property
    def name(self) -> str:
        return f"{self.table}:{self.exchange}:{self.symbol}"

    @property
    def key(self) -> tuple[str, str]:
        return self.exchange, self.symbol


def parse_channel(text: str) -> Channel:
    m = _CHANNEL.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        shown = text if len(text) <= 80 else text[:80] + "..."
        raise QueryError(
            400,
            "invalid_channel",
            f"{shown!r} is not a channel like trades:BINANCE:BTCUSDT or quotes:BINANCE:ETHUSDT",
        )
    return Channel(m.group(1), m.group(2).upper(), m.group(3).upper())


def parse_since(value: str | int, now: int, max_seconds: float) -> int:
    """A negative duration before `now` (-30s, -5m, -2h, -1d) or a time (ISO-8601, epoch
    milliseconds or microseconds); at most `max_seconds` back and not in the future."""
    text = str(value) if isinstance(value, int) else value
    m = _SINCE.fullmatch(text)
    start = now - int(m.group(1)) * _UNIT_US[m.group(2)] if m else parse_time(text, "since")
    if start > now:
        raise QueryError(400, "invalid_since", "since is in the future")
    if now - start > max_seconds * 1_000_000:
        raise QueryError(
            400,
            "since_too_far",
            f"since reaches {(now - start) / 1e6:g}s back; at most {max_seconds:g}s",
        )
    return start


def iso_us(us: int) -> str:
    """UTC microseconds as the REST rows render them: 2024-03-01T12:00:00.123000Z."""
    seconds, micros = divmod(us, 1_000_000)
    prefix = _ISO_SECONDS.get(seconds)
    if prefix is None:
        if len(_ISO_SECONDS) > 4_096:
            _ISO_SECONDS.clear()
        prefix = _ISO_SECONDS[seconds] = datetime.fromtimestamp(seconds, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S"
        )
    return f"{prefix}.{micros:06d}Z"


_ISO_SECONDS: dict[int, str] = {}
_EIGHT = Decimal("0.00000001")


def _dec8(text: str | None) -> str | None:
    """An exact decimal at scale 8, as DuckDB renders decimal(18,8): venues send it so
    already (the fast path); anything else is normalised exactly."""
    if text is None:
        return None
    if len(text) > 9 and text[-9] == "." and (text[0] != "0" or text[1] == "."):
        return text
    try:
        return f"{Decimal(text).quantize(_EIGHT):f}"
    except InvalidOperation:
        return text


def trade_row(t: Trade) -> TradeRow:
    return TradeRow(
        message_id=t.message_id,
        trade_id=t.trade_id,
        symbol=t.symbol,
        exchange=t.exchange,
        asset_class=t.asset_class,
        timestamp=iso_us(t.timestamp),
        price=_dec8(t.price) or t.price,
        quantity=_dec8(t.quantity) or t.quantity,
        currency=t.currency,
        side=t.side,
        trade_conditions=list(t.trade_conditions) if t.trade_conditions is not None else None,
        source_sequence=t.source_sequence,
        ingestion_timestamp=iso_us(t.ingestion_timestamp),
        platform_sequence=t.platform_sequence,
        vendor_data=t.vendor_data,
        provenance=t.provenance,
    )


def quote_row(q: Quote) -> QuoteRow:
    return QuoteRow(
        message_id=q.message_id,
        symbol=q.symbol,
        exchange=q.exchange,
        asset_class=q.asset_class,
        timestamp=iso_us(q.timestamp),
        bid_price=_dec8(q.bid_price),
        bid_quantity=_dec8(q.bid_quantity),
        ask_price=_dec8(q.ask_price),
        ask_quantity=_dec8(q.ask_quantity),
        currency=q.currency,
        source_sequence=q.source_sequence,
        ingestion_timestamp=iso_us(q.ingestion_timestamp),
        platform_sequence=q.platform_sequence,
        vendor_data=q.vendor_data,
        provenance=q.provenance,
    )


def gap_message(e: SequenceEvent, channel: str) -> Gap:
    """A ledger row (kind gap or outage) as a `gap` message."""
    return Gap(
        channel=channel,
        event_id=e.event_id,
        kind=e.kind,
        status=e.status,
        first_missing=e.first_missing,
        last_missing=e.last_missing,
        missing_count=e.missing_count,
        start=iso_us(e.window_start) if e.window_start is not None else None,
        end=iso_us(e.window_end) if e.window_end is not None else None,
        detected_at=iso_us(e.detected_at),
        resolved_at=iso_us(e.resolved_at) if e.resolved_at is not None else None,
        detail=e.detail,
    )


# -- encoding -----------------------------------------------------------------------------

_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()


def encode_message(msg: ServerMessage, encoding: Encoding = "json") -> bytes:
    return _msgpack.encode(msg) if encoding == "msgpack" else _json.encode(msg)


@dataclass(frozen=True, slots=True)
class Encoded:
    """Rows of one channel (or one gap, or a control message) encoded once, for every
    connection that sends them: `message` is the whole message; `rows` the encoded rows
    alone, without the list's brackets (JSON) or header (MessagePack), for joining several
    batches of a channel into one message."""

    kind: str  # trades, quotes, gap; ack, error, pong, end (control, channel "")
    channel: str
    message: bytes
    rows: bytes
    count: int
    source: str = "live"  # live, history, replay: for the k2d_ws_rows_total metric
    span_context: Any = None


def _msgpack_header_len(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65_536 else 5


def encode_rows(
    kind: str,
    channel: str,
    rows: Sequence[TradeRow] | Sequence[QuoteRow],
    encoding: Encoding,
    *,
    source: str = "live",
    span_context: Any = None,
) -> Encoded:
    if encoding == "msgpack":
        body = _msgpack.encode(rows)
        joined = body[_msgpack_header_len(len(rows)) :]
        message = _msgpack_map(kind, channel, len(rows), joined)
    else:
        body = _json.encode(rows)
        joined = body[1:-1]
        message = b'{"type":"%s","channel":%s,"rows":%s}' % (
            kind.encode(),
            _json.encode(channel),
            body,
        )
    return Encoded(kind, channel, message, joined, len(rows), source, span_context)


def encode_gap(gap: Gap, encoding: Encoding, *, span_context: Any = None) -> Encoded:
    return Encoded("gap", gap.channel, encode_message(gap, encoding), b"", 0, "live", span_context)


def _msgpack_map(kind: str, channel: str, count: int, rows: bytes) -> bytes:
    """{"type": kind, "channel": channel, "rows": [...]} around already encoded rows."""
    if count < 16:
        header = bytes([0x90 | count])
    elif count < 65_536:
        header = b"\xdc" + count.to_bytes(2, "big")
    else:
        header = b"\xdd" + count.to_bytes(4, "big")
    return b"".join(
        (
            b"\x83",
            _msgpack.encode("type"),
            _msgpack.encode(kind),
            _msgpack.encode("channel"),
            _msgpack.encode(channel),
            _msgpack.encode("rows"),
            header,
            rows,
        )
    )


Frame = tuple[bytes, str, dict[str, int], list[Any]]
"""A message ready to send: its bytes, type, rows per source, and the span contexts of
the batches it carries."""


def join_frames(
    parts: Iterable[Encoded], encoding: Encoding, max_bytes: int = 256 * 1024
) -> list[Frame]:
    """The messages that carry `parts`, in order: a run of row batches of one channel
    becomes one message (up to about `max_bytes` of rows); gaps and control messages stay
    messages of their own, in place."""
    out: list[Frame] = []
    run: list[Encoded] = []
    run_bytes = 0

    def flush() -> None:
        nonlocal run_bytes
        if not run:
            return
        rows: dict[str, int] = {}
        contexts: list[Any] = []
        for p in run:
            rows[p.source] = rows.get(p.source, 0) + p.count
            if p.span_context is not None and p.span_context not in contexts:
                contexts.append(p.span_context)
        first = run[0]
        if len(run) == 1:
            data = first.message
        else:
            count = sum(p.count for p in run)
            joined_rows = [p.rows for p in run if p.count]
            if encoding == "msgpack":
                data = _msgpack_map(first.kind, first.channel, count, b"".join(joined_rows))
            else:
                data = b'{"type":"%s","channel":%s,"rows":[%s]}' % (
                    first.kind.encode(),
                    _json.encode(first.channel),
                    b",".join(joined_rows),
                )
        out.append((data, first.kind, rows, contexts))
        run.clear()
        run_bytes = 0

    for p in parts:
        if p.kind not in _ROW_KINDS:
            flush()
            contexts = [p.span_context] if p.span_context is not None else []
            out.append((p.message, p.kind, {}, contexts))
            continue
        if run and (
            run[0].channel != p.channel
            or run[0].kind != p.kind
            or run_bytes + len(p.rows) > max_bytes
        ):
            flush()
        run.append(p)
        run_bytes += len(p.rows)
    flush()
    return out


_ROW_KINDS = frozenset({"trades", "quotes"})


def order_for_joining(parts: Sequence[Encoded]) -> list[Encoded]:
    """`parts` with each channel's parts brought together (channels in order of first
    appearance, parts in order within a channel), between control messages and replayed
    parts, which stay in place: a connection's waiting live batches then join into one
    message per channel. Order across channels is not kept for live rows (within a channel
    it is); a replay's order, across channels in time, is kept whole."""
    if len(parts) < 2:
        return list(parts)
    out: list[Encoded] = []
    by: dict[str, list[Encoded]] = {}
    for p in parts:
        if not p.channel or p.source == "replay":  # a barrier
            for group in by.values():
                out.extend(group)
            by.clear()
            out.append(p)
            continue
        by.setdefault(p.channel, []).append(p)
    for group in by.values():
        out.extend(group)
    return out


_SERVER_JSON: msgspec.json.Decoder[ServerMessage] = msgspec.json.Decoder(ServerMessage)
_SERVER_MSGPACK: msgspec.msgpack.Decoder[ServerMessage] = msgspec.msgpack.Decoder(ServerMessage)


def decode_server(data: bytes | str) -> ServerMessage:
    """Strictly decode one server message (tests, and clients written in Python): a text
    frame is JSON, a binary frame MessagePack."""
    if isinstance(data, str):
        return _SERVER_JSON.decode(data)
    return _SERVER_MSGPACK.decode(data)
