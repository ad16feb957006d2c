"""Parsing and validating request parameters: times, windows, lists, limits, formats, intervals.

Every check raises QueryError(status, code, detail) with a stable code: 400 for a value that
is malformed, 404 for a well-formed name that names nothing. Nothing here touches SQL: the
values produced are bound as parameters, the identifiers come from allow-lists.

The syntax of each value is a regular expression (ECMA-262 compatible, anchored) that the
server matches and the OpenAPI document states (k2d/api/_contract.py), so that the document
admits exactly what the server accepts.
"""

from __future__ import annotations

import enum
import re
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache

import duckdb

from k2d.query._errors import QueryError

__all__ = [
    "BUCKETS",
    "CURSOR_PATTERN",
    "DATE_PATTERN",
    "EXCHANGE_SYNTAX",
    "EXCHANGE_TIMEZONES",
    "INTERVALS",
    "MAX_EPOCH_MS",
    "MAX_US",
    "MEDIA_TYPES",
    "MIN_EPOCH_US",
    "SYMBOL_SYNTAX",
    "TIME_PATTERN",
    "Format",
    "Interval",
    "SnapshotSel",
    "Window",
    "check_window",
    "duration_pattern",
    "exchange_pattern",
    "int_range_pattern",
    "name_list_pattern",
    "negotiate_format",
    "parse_columns",
    "parse_date",
    "parse_duration",
    "parse_exchange",
    "parse_exchanges",
    "parse_integer",
    "parse_interval",
    "parse_limit",
    "parse_order",
    "parse_snapshot",
    "parse_symbol",
    "parse_symbols",
    "parse_time",
    "parse_timezone",
    "parse_window",
    "split_values",
    "symbol_pattern",
    "timezones",
    "trading_day",
]

US = 1_000_000
DAY_US = 86_400 * US
# Epoch integers below this are milliseconds, at or above it microseconds: 10^14 ms is the
# year 5138 and 10^14 us is 1973, so every plausible market timestamp reads one way only.
MIN_EPOCH_US = 10**14
MAX_US = 7_258_118_400 * US  # 2200-01-01T00:00:00Z: times are in [1970, 2200)
MAX_EPOCH_MS = (MAX_US - 1) // 1_000
INT64 = (-(2**63), 2**63 - 1)
_MAX_TEXT = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DURATION = re.compile(r"^([1-9][0-9]{0,6})(s|m|h|d)$")
_UNIT_US = {"s": US, "m": 60 * US, "h": 3_600 * US, "d": DAY_US}
# A name that is not a zone of any place: time zone alignment to it would be UTC renamed.
_PSEUDO_ZONES = frozenset({"Factory", "localtime", "posixrules"})

# The trading day of an exchange is its local calendar day.
EXCHANGE_TIMEZONES: dict[str, str] = {"BINANCE": "UTC", "ASX": "Australia/Sydney"}


def int_range_pattern(lo: int, hi: int) -> str:
    """A regular expression (no anchors) for the decimal integers lo..hi, no leading zeros."""
    if not 0 <= lo <= hi:
        raise ValueError(f"need 0 <= lo <= hi, got {lo}..{hi}")
    parts: list[str] = []
    while lo <= hi:
        top = min(hi, 10 ** len(str(lo)) - 1)
        parts.extend(_same_length(str(lo), str(top)))
        lo = top + 1
    return "(?:" + "|".join(parts) + ")"


def _same_length(a: str, b: str) -> list[str]:
    """Patterns for the digit strings a..b, both of one length."""
    if a == b:
        return [a]
    i = 0
    while a[i] == b[i]:
        i += 1
    prefix, a, b = a[:i], a[i:], b[i:]
    rest = len(a) - 1
    if rest == 0:
        return [f"{prefix}[{a}-{b}]"]
    tail = f"[0-9]{{{rest}}}"
    low_full, high_full = a[1:] == "0" * rest, b[1:] == "9" * rest
    out = []
    first_lo, first_hi = int(a[0]), int(b[0])
    if not low_full:
        out += [prefix + a[0] + p for p in _same_length(a[1:], "9" * rest)]
        first_lo += 1
    if not high_full:
        first_hi -= 1
    if first_lo <= first_hi:
        digit = str(first_lo) if first_lo == first_hi else f"[{first_lo}-{first_hi}]"
        out.append(prefix + digit + tail)
    if not high_full:
        out += [prefix + b[0] + p for p in _same_length("0" * rest, b[1:])]
    return out


_YEAR = "(?:19[7-9][0-9]|2[01][0-9]{2})"
# Divisible by 4, and 2100 is not a leap year.
_LEAP_YEAR = (
    "(?:19(?:7[26]|8[048]|9[26])"
    "|20(?:[02468][048]|[13579][26])"
    "|21(?:0[48]|[2468][048]|[13579][26]))"
)
_MONTH_DAY = (
    "(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"
    "|(?:0[13-9]|1[0-2])-(?:29|30)"
    "|(?:0[13578]|1[02])-31)"
)
_DATE = f"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_CLOCK = "(?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:[.][0-9]{1,6})?)?"
_OFFSET = "(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_ISO = f"{_DATE}(?:[T ]{_CLOCK}{_OFFSET}?)?"
_EPOCH_MS = int_range_pattern(0, MAX_EPOCH_MS)
_EPOCH_US = int_range_pattern(MIN_EPOCH_US, MAX_US - 1)
# A calendar date from 1970 to 2199, leap days included.
DATE_PATTERN = f"^{_DATE}$"
# ISO-8601 (a date, or a date and a time with an optional offset; naive is UTC) or epoch
# milliseconds / microseconds, from 1970 to 2200, spaces around allowed.
TIME_PATTERN = f"^ *(?:{_EPOCH_MS}|{_EPOCH_US}|{_ISO}) *$"
# Opaque base64url, as the server issues it.
CURSOR_PATTERN = "^[A-Za-z0-9_-]{1,2048}$"
# One symbol, one exchange (not anchored); upper-cased once accepted.
SYMBOL_SYNTAX = "[A-Za-z0-9][A-Za-z0-9._:/-]{0,31}"
EXCHANGE_SYNTAX = "[A-Za-z][A-Za-z0-9_]{0,15}"
_TIME_RE = re.compile(TIME_PATTERN)
_DATE_RE = re.compile(DATE_PATTERN)
_SYMBOL_RE = re.compile(SYMBOL_SYNTAX)
_EXCHANGE_RE = re.compile(EXCHANGE_SYNTAX)
_DIGITS = re.compile("[0-9]+")
_INTEGER = re.compile("-?(?:0|[1-9][0-9]{0,19})")


def symbol_pattern(*, required: bool = False) -> str:
    """One symbol per value, with spaces and commas around it (none when not `required`)."""
    body = SYMBOL_SYNTAX
    return f"^[ ,]*{body}[ ,]*$" if required else f"^[ ,]*(?:{body})?[ ,]*$"


def exchange_pattern(*, listed: bool = True) -> str:
    """One exchange per value (a list parameter allows commas around it)."""
    body = EXCHANGE_SYNTAX
    return f"^[ ,]*(?:{body})?[ ,]*$" if listed else f"^ *{body} *$"


def name_list_pattern(names: Iterable[str]) -> str:
    """Names from an allow-list, comma-separated, spaces and empty items allowed."""
    name = "(?:" + "|".join(re.escape(n) for n in names) + ")"
    return f"^[ ,]*(?:{name}(?: *,[ ,]*{name})*)?[ ,]*$"


def duration_pattern(max_seconds: float) -> str:
    """`30s`, `15m`, `2h`, `1d`: the ones parse_duration accepts under `max_seconds`."""
    limit = int(max_seconds * US)
    units = []
    for unit, unit_us in _UNIT_US.items():
        top = min(9_999_999, limit // unit_us)
        if top >= 1:
            units.append(f"{int_range_pattern(1, top)}{unit}")
    return "^ *(?:" + "|".join(units or [r"[^\s\S]"]) + ") *$"


def _echo(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


def parse_time(text: str, name: str) -> int:
    """ISO-8601 (naive means UTC; a date alone is its midnight UTC) or epoch milliseconds or
    microseconds (integers below 10^14 are milliseconds), from 1970 to 2200, as UTC
    microseconds. An offset that carries a time just past either end is clamped to it."""
    if not _TIME_RE.fullmatch(text):
        raise QueryError(
            400,
            "invalid_time",
            f"{name}: {_echo(text)!r} is not ISO-8601 or epoch milliseconds/microseconds "
            "between 1970 and 2200",
        )
    value = text.strip(" ")
    if _DIGITS.fullmatch(value):
        number = int(value)
        return number * 1_000 if number < MIN_EPOCH_US else number
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    us = (when - _EPOCH) // timedelta(microseconds=1)
    return min(max(us, 0), MAX_US - 1)


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
    """Repeated and comma-separated values as one list: spaces stripped, empties dropped, in
    order, each once."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: dict[str, None] = {}
    for value in values:
        for part in value.split(","):
            part = part.strip(" ")
            if part:
                out.setdefault(part, None)
    return list(out)


def _values(values: Iterable[str] | str | None, max_count: int, code: str) -> list[str]:
    """The values of a repeated parameter, at most `max_count` of them (the OpenAPI document
    bounds the repeats; the items they name are counted again after splitting)."""
    given = [values] if isinstance(values, str) else list(values or ())
    if len(given) > max_count:
        raise QueryError(400, code, f"{len(given)} values given; at most {max_count}")
    return given


def parse_symbol(value: str) -> str:
    """Exactly one symbol (a path segment), upper-cased."""
    if not _SYMBOL_RE.fullmatch(value):
        raise QueryError(400, "invalid_symbol", f"{_echo(value)!r} cannot be a symbol")
    return value.upper()


def parse_symbols(values: Iterable[str] | str | None, max_count: int) -> tuple[str, ...]:
    """Upper-cased symbols, each once; whether they are stored is the plan's question."""
    symbols: dict[str, None] = {}
    for s in split_values(_values(values, max_count, "too_many_symbols")):
        if not _SYMBOL_RE.fullmatch(s):
            raise QueryError(400, "invalid_symbol", f"{_echo(s)!r} cannot be a symbol")
        symbols.setdefault(s.upper(), None)
    if len(symbols) > max_count:
        raise QueryError(
            400, "too_many_symbols", f"{len(symbols)} symbols asked for; at most {max_count}"
        )
    return tuple(symbols)


def parse_exchange(value: str) -> str:
    exchange = value.strip(" ")
    if not _EXCHANGE_RE.fullmatch(exchange):
        raise QueryError(400, "invalid_exchange", f"{_echo(value)!r} cannot be an exchange")
    return exchange.upper()


def parse_exchanges(values: Iterable[str] | str | None, max_count: int) -> tuple[str, ...]:
    given = split_values(_values(values, max_count, "too_many_exchanges"))
    exchanges = tuple(dict.fromkeys(parse_exchange(e) for e in given))
    if len(exchanges) > max_count:
        raise QueryError(
            400, "too_many_exchanges", f"{len(exchanges)} exchanges asked for; at most {max_count}"
        )
    return exchanges


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


def parse_integer(text: str | None, name: str) -> int | None:
    """A query parameter that is an integer, written as JSON writes one (no `null`, `5.0`,
    `1e3` or leading zeros, which a lenient parser would take)."""
    if text is None:
        return None
    if not _INTEGER.fullmatch(text):
        raise QueryError(
            400,
            "invalid_parameter",
            f"query parameter {name!r}: expected an integer, got {_echo(text)!r}",
        )
    return int(text)


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
def timezones() -> tuple[str, ...]:
    """The zones bars can be aligned to: those both zoneinfo and DuckDB know by that name,
    less the pseudo-zones (`Factory` means "no zone set"; `localtime` is this host's)."""
    with duckdb.connect() as db:
        duck = {row[0] for row in db.execute("SELECT name FROM pg_timezone_names()").fetchall()}
    both = (zoneinfo.available_timezones() | {"UTC"}) & duck
    return tuple(sorted(both - _PSEUDO_ZONES))


@cache
def _zone_set() -> frozenset[str]:
    return frozenset(timezones())


def parse_timezone(value: str | None) -> str:
    if value is None or value == "UTC":
        return "UTC"
    if value not in _zone_set():
        raise QueryError(400, "unknown_timezone", f"unknown time zone {_echo(value)!r}")
    return value


def parse_duration(value: str, max_seconds: float) -> int:
    """`30s`, `15m`, `2h`, `1d` as microseconds (duration_pattern states the same)."""
    m = _DURATION.fullmatch(value.strip(" "))
    if m is None:
        raise QueryError(
            400, "invalid_window", f"window must look like 30s, 15m, 2h or 1d, got {_echo(value)!r}"
        )
    us = int(m.group(1)) * _UNIT_US[m.group(2)]
    if us > int(max_seconds * US):
        raise QueryError(400, "window_too_large", f"window {value} is longer than {max_seconds:g}s")
    return us


def parse_date(value: str) -> date:
    if not _DATE_RE.fullmatch(value):
        raise QueryError(
            400,
            "invalid_date",
            f"date must be YYYY-MM-DD between 1970 and 2199, got {_echo(value)!r}",
        )
    return date.fromisoformat(value)


def trading_day(exchange: str, day: date) -> tuple[str, Window]:
    """The exchange's time zone and its local calendar day as a UTC window (the part of it
    from 1970 on)."""
    tz_name = EXCHANGE_TIMEZONES.get(exchange)
    if tz_name is None:
        raise QueryError(
            404,
            "unknown_exchange",
            f"no trading calendar for {_echo(exchange)!r}; known: {', '.join(EXCHANGE_TIMEZONES)}",
        )
    tz = zoneinfo.ZoneInfo(tz_name)
    start = datetime(day.year, day.month, day.day, tzinfo=tz)
    nxt = day + timedelta(days=1)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz)
    to_us = timedelta(microseconds=1)
    window = Window(max(0, (start - _EPOCH) // to_us), (end - _EPOCH) // to_us)
    if not (window.end > 0 and window.start < MAX_US):
        raise QueryError(400, "invalid_date", "date must be between 1970 and 2199")
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
        if not INT64[0] <= snapshot_id <= INT64[1]:
            raise QueryError(
                400, "invalid_snapshot", f"snapshot_id {snapshot_id} is not a 64-bit integer"
            )
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
    """`format=` (exactly one of the names) wins; otherwise the Accept type with the highest
    q we serve; else JSON."""
    if param is not None:
        try:
            return Format(param)
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
