"""Parsing and validating request parameters: times, windows, lists, limits, formats, intervals.

Every check raises QueryError(400, code, detail) with a stable code. Nothing here touches SQL:
the values produced are bound as parameters, the identifiers come from allow-lists.
"""

from __future__ import annotations

import enum
import re
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache

from k2d.query._errors import QueryError

__all__ = [
    "BUCKETS",
    "EXCHANGE_TIMEZONES",
    "INTERVALS",
    "MEDIA_TYPES",
    "Format",
    "Interval",
    "SnapshotSel",
    "Window",
    "negotiate_format",
    "parse_columns",
    "parse_date",
    "parse_duration",
    "parse_exchange",
    "parse_exchanges",
    "parse_interval",
    "parse_limit",
    "parse_order",
    "parse_snapshot",
    "parse_symbols",
    "parse_time",
    "parse_timezone",
    "parse_window",
    "split_values",
    "trading_day",
]

US = 1_000_000
DAY_US = 86_400 * US
# Epoch integers below this are milliseconds, at or above it microseconds: 10^14 ms is the
# year 5138 and 10^14 us is 1973, so every plausible market timestamp reads one way only.
_MS_BELOW = 10**14
_MAX_US = 7_258_118_400 * US  # 2200-01-01T00:00:00Z
_MAX_TEXT = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DIGITS = re.compile(r"^[0-9]{1,19}$")
_SYMBOL = re.compile(r"^[A-Z0-9][A-Z0-9._:/-]{0,31}$")
_EXCHANGE = re.compile(r"^[A-Z][A-Z0-9_]{0,15}$")
_DURATION = re.compile(r"^([1-9][0-9]{0,6})(s|m|h|d)$")
_UNIT_US = {"s": US, "m": 60 * US, "h": 3_600 * US, "d": DAY_US}

# The trading day of an exchange is its local calendar day.
EXCHANGE_TIMEZONES: dict[str, str] = {"BINANCE": "UTC", "ASX": "Australia/Sydney"}


def _echo(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


def parse_time(text: str, name: str) -> int:
    """ISO-8601 (naive means UTC; a date alone is its midnight UTC) or epoch milliseconds or
    microseconds (integers below 10^14 are milliseconds), as UTC microseconds."""
    value = text.strip()
    if not value or len(value) > _MAX_TEXT:
        raise QueryError(400, "invalid_time", f"{name}: expected ISO-8601 or epoch ms/us")
    if _DIGITS.match(value):
        number = int(value)
        us = number * 1_000 if number < _MS_BELOW else number
    else:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise QueryError(
                400,
                "invalid_time",
                f"{name}: {_echo(value)!r} is neither ISO-8601 nor epoch milliseconds/microseconds",
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        try:
            us = (when - _EPOCH) // timedelta(microseconds=1)
        except OverflowError:
            us = -1
    if not 0 <= us < _MAX_US:
        raise QueryError(400, "invalid_time", f"{name}: must be between 1970 and 2200")
    return us


@dataclass(frozen=True, slots=True)
class Window:
    """A half-open time window [start, end) in UTC microseconds."""

    start: int
    end: int

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / US


def parse_window(
    start: str | None,
    end: str | None,
    *,
    now_us: int,
    default_seconds: float,
    max_seconds: float,
) -> Window:
    """`end` defaults to now, `start` to `default_seconds` before `end`."""
    end_us = parse_time(end, "end") if end is not None else now_us
    start_us = (
        parse_time(start, "start") if start is not None else end_us - int(default_seconds * US)
    )
    return check_window(Window(max(0, start_us), end_us), max_seconds)


def check_window(window: Window, max_seconds: float) -> Window:
    if window.start == window.end:
        raise QueryError(400, "empty_window", "start equals end: the window holds no time")
    if window.start > window.end:
        raise QueryError(400, "reversed_window", "start is after end")
    if window.end - window.start > int(max_seconds * US):
        raise QueryError(
            400,
            "window_too_large",
            f"the window is {window.seconds:g}s; at most {max_seconds:g}s may be asked for at once",
        )
    return window


def split_values(values: Iterable[str] | str | None) -> list[str]:
    """Repeated and comma-separated values as one list: stripped, empties dropped, in order,
    each once."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: dict[str, None] = {}
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part:
                out.setdefault(part, None)
    return list(out)


def parse_symbols(values: Iterable[str] | str | None, max_count: int) -> tuple[str, ...]:
    """Upper-cased symbols; one that cannot be a symbol at all is simply unknown."""
    symbols = list(dict.fromkeys(s.upper() for s in split_values(values)))
    if len(symbols) > max_count:
        raise QueryError(
            400, "too_many_symbols", f"{len(symbols)} symbols asked for; at most {max_count}"
        )
    for s in symbols:
        if not _SYMBOL.match(s):
            raise QueryError(400, "unknown_symbol", f"unknown symbol {_echo(s)!r}")
    return tuple(symbols)


def parse_exchange(value: str) -> str:
    exchange = value.strip().upper()
    if not _EXCHANGE.match(exchange):
        raise QueryError(400, "unknown_exchange", f"unknown exchange {_echo(value)!r}")
    return exchange


def parse_exchanges(values: Iterable[str] | str | None, max_count: int) -> tuple[str, ...]:
    exchanges = split_values(values)
    if len(exchanges) > max_count:
        raise QueryError(
            400, "too_many_exchanges", f"{len(exchanges)} exchanges asked for; at most {max_count}"
        )
    return tuple(dict.fromkeys(parse_exchange(e) for e in exchanges))


def parse_columns(values: Iterable[str] | str | None, allowed: Sequence[str]) -> tuple[str, ...]:
    """Columns from the allow-list, in the order asked; none asked means all of them."""
    asked = split_values(values)
    if not asked:
        return tuple(allowed)
    known = set(allowed)
    for name in asked:
        if name not in known:
            raise QueryError(
                400,
                "unknown_column",
                f"unknown column {_echo(name)!r}; expected some of {', '.join(allowed)}",
            )
    return tuple(asked)


def parse_limit(value: int | None, default: int, max_rows: int) -> int:
    if value is None:
        return default
    if value > max_rows:
        raise QueryError(400, "limit_too_large", f"limit {value} is above the maximum {max_rows}")
    if value < 1:
        raise QueryError(400, "invalid_limit", f"limit must be at least 1, got {value}")
    return value


def parse_order(value: str | None) -> bool:
    """True for descending."""
    if value is None or value == "asc":
        return False
    if value == "desc":
        return True
    raise QueryError(400, "invalid_order", f"order must be asc or desc, got {_echo(value)!r}")


@dataclass(frozen=True, slots=True)
class Interval:
    """A bar or bucket width: its name, its length in microseconds, its SQL INTERVAL literal
    (a constant of this module, never built from input)."""

    name: str
    micros: int
    sql: str


INTERVALS: dict[str, Interval] = {
    i.name: i
    for i in (
        Interval("1s", US, "INTERVAL 1 SECOND"),
        Interval("1m", 60 * US, "INTERVAL 1 MINUTE"),
        Interval("5m", 300 * US, "INTERVAL 5 MINUTE"),
        Interval("15m", 900 * US, "INTERVAL 15 MINUTE"),
        Interval("1h", 3_600 * US, "INTERVAL 1 HOUR"),
        Interval("1d", DAY_US, "INTERVAL 1 DAY"),
    )
}
BUCKETS: dict[str, Interval] = {k: INTERVALS[k] for k in ("1h", "1d")}


def parse_interval(
    value: str, allowed: dict[str, Interval], code: str = "unknown_interval"
) -> Interval:
    interval = allowed.get(value)
    if interval is None:
        raise QueryError(
            400, code, f"unknown interval {_echo(value)!r}; expected one of {', '.join(allowed)}"
        )
    return interval


@cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) | {"UTC"}


def parse_timezone(value: str | None) -> str:
    if value is None or value == "UTC":
        return "UTC"
    if value not in _zones():
        raise QueryError(400, "unknown_timezone", f"unknown time zone {_echo(value)!r}")
    return value


def parse_duration(value: str, max_seconds: float) -> int:
    """`30s`, `15m`, `2h`, `1d` as microseconds."""
    m = _DURATION.match(value.strip())
    if m is None:
        raise QueryError(
            400, "invalid_window", f"window must look like 30s, 15m, 2h or 1d, got {_echo(value)!r}"
        )
    us = int(m.group(1)) * _UNIT_US[m.group(2)]
    if us > int(max_seconds * US):
        raise QueryError(400, "window_too_large", f"window {value} is longer than {max_seconds:g}s")
    return us


def parse_date(value: str) -> date:
    try:
        if len(value) != 10:
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise QueryError(
            400, "invalid_date", f"date must be YYYY-MM-DD, got {_echo(value)!r}"
        ) from None


def trading_day(exchange: str, day: date) -> tuple[str, Window]:
    """The exchange's time zone and its local calendar day as a UTC window."""
    tz_name = EXCHANGE_TIMEZONES.get(exchange)
    if tz_name is None:
        raise QueryError(
            400,
            "unknown_exchange",
            f"no trading calendar for {_echo(exchange)!r}; known: {', '.join(EXCHANGE_TIMEZONES)}",
        )
    tz = zoneinfo.ZoneInfo(tz_name)
    start = datetime(day.year, day.month, day.day, tzinfo=tz)
    nxt = day + timedelta(days=1)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz)
    to_us = timedelta(microseconds=1)
    window = Window((start - _EPOCH) // to_us, (end - _EPOCH) // to_us)
    if not 0 <= window.start < _MAX_US:
        raise QueryError(400, "invalid_date", "date must be between 1970 and 2200")
    return tz_name, window


@dataclass(frozen=True, slots=True)
class SnapshotSel:
    """Which snapshot to read: the current one (both None), one by id, or the one current at
    a time (`as_of_us`)."""

    snapshot_id: int | None = None
    as_of_us: int | None = None

    @property
    def current(self) -> bool:
        return self.snapshot_id is None and self.as_of_us is None


def parse_snapshot(as_of: str | None, snapshot_id: int | None) -> SnapshotSel:
    if as_of is not None and snapshot_id is not None:
        raise QueryError(400, "conflicting_parameters", "give as_of or snapshot_id, not both")
    if snapshot_id is not None:
        if not -(2**63) <= snapshot_id < 2**63:
            raise QueryError(400, "unknown_snapshot", f"no snapshot {snapshot_id}")
        return SnapshotSel(snapshot_id=snapshot_id)
    if as_of is not None:
        return SnapshotSel(as_of_us=parse_time(as_of, "as_of"))
    return SnapshotSel()


class Format(enum.StrEnum):
    JSON = "json"
    CSV = "csv"
    PARQUET = "parquet"
    ARROW = "arrow"


MEDIA_TYPES: dict[Format, str] = {
    Format.JSON: "application/json",
    Format.CSV: "text/csv; charset=utf-8",
    Format.PARQUET: "application/vnd.apache.parquet",
    Format.ARROW: "application/vnd.apache.arrow.stream",
}
_ACCEPT: dict[str, Format] = {
    "application/json": Format.JSON,
    "text/csv": Format.CSV,
    "application/vnd.apache.parquet": Format.PARQUET,
    "application/parquet": Format.PARQUET,
    "application/x-parquet": Format.PARQUET,
    "application/vnd.apache.arrow.stream": Format.ARROW,
    "*/*": Format.JSON,
    "application/*": Format.JSON,
}


def negotiate_format(param: str | None, accept: str | None) -> Format:
    """`format=` wins; otherwise the Accept type with the highest q we serve; else JSON."""
    if param is not None:
        try:
            return Format(param.strip().lower())
        except ValueError:
            raise QueryError(
                400,
                "unknown_format",
                f"unknown format {_echo(param)!r}; expected one of "
                + ", ".join(f.value for f in Format),
            ) from None
    best: tuple[float, Format] | None = None
    for item in (accept or "")[:1024].split(","):
        media, _, params = item.strip().partition(";")
        fmt = _ACCEPT.get(media.strip().lower())
        if fmt is None:
            continue
        q = 1.0
        for p in params.split(";"):
            key, _, value = p.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0 and (best is None or q > best[0]):
            best = (q, fmt)
    return best[1] if best is not None else Format.JSON
