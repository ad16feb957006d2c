"""ASX vendor files: per-company trade and quote CSVs, and company_info.csv.

Files are parsed column-wise with pyarrow (millions of rows a second) straight into the
`market.trades` / `market.quotes` Arrow schema; every row that is not exactly right becomes
a DeadLetter with its line number and a reason from REASONS, never an exception.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import BinaryIO, Literal
from zoneinfo import ZoneInfo

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from k2d.model import DeadLetter
from k2d.storage import INSTRUMENTS, QUOTES, REFERENCE_TABLES, TABLES, TRADES

__all__ = [
    "ASSET_CLASS",
    "COMPANY_INFO_HEADER",
    "CURRENCY",
    "EXCHANGE",
    "QUOTE_FIELDS",
    "REASONS",
    "TIMEZONE",
    "TRADE_FIELDS",
    "AsxFormatError",
    "Company",
    "FileReader",
    "ParsedFile",
    "companies_to_arrow",
    "parse_quotes",
    "parse_trades",
    "read_company_info",
    "row_id",
    "slices",
]

EXCHANGE = "ASX"
ASSET_CLASS = "equities"
CURRENCY = "AUD"
TIMEZONE = ZoneInfo("Australia/Sydney")
# The files say nothing about the aggressor.
SIDE = "UNKNOWN"
REASONS = (
    "field_count",
    "bad_encoding",
    "bad_date",
    "bad_time",
    "nonexistent_local_time",
    "invalid_number",
    "negative_price",
    "negative_volume",
    "non_positive",
)
TRADE_FIELDS = ("date", "time", "price", "volume", "qualifiers", "venue", "buyer_id")
QUOTE_FIELDS = ("date", "time", "bid", "ask", "bid_volume", "ask_volume")
COMPANY_INFO_HEADER = ("company_id", "symbol", "company_name", "isin", "start_date", "end_date")

_DATE_RE = re.compile(r"^\d{2}/\d{2}/\d{4}$", re.ASCII)
_TIME_RE = r"^([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?$"
# Exactly what decimal(18,8) holds: at most 10 integer and 8 fractional digits, no exponent.
_DECIMAL_RE = r"^\d{1,10}(\.\d{1,8})?$"
_NEGATIVE_RE = r"^-\d{1,10}(\.\d{1,8})?$"
_MAX_RAW = 65_536
_DECIMAL = pa.decimal128(18, 8)
_ZERO = pa.scalar(0, _DECIMAL)
_TS = pa.timestamp("us", tz="UTC")
_CONDITIONS = TABLES[TRADES].arrow_schema.field("trade_conditions").type
_EPOCH = datetime(1970, 1, 1)  # naive: local wall-clock microseconds are counted from it
_json = msgspec.json.Encoder()


class AsxFormatError(ValueError):
    """A whole file cannot be used: unreadable CSV, bad reference file, too many bad rows."""


def row_id(digest: str, line: int) -> str:
    """The vendor-free id of one row: `<sha256[:16]>:<line>` (stable across reloads)."""
    return f"{digest[:16]}:{line}"


# --- company_info.csv ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Company:
    """One row of company_info.csv: a listing of `symbol` under the vendor's company id."""

    company_id: str
    symbol: str
    name: str
    isin: str | None
    valid_from: date | None
    valid_to: date | None


_REF_DATE_FORMATS = ("%Y-%m-%d", "%m/%d/%Y", "%Y%m%d")
_SYMBOL_RE = re.compile(r"^[A-Z0-9][A-Z0-9.]{0,11}$")
_COMPANY_ID_RE = re.compile(r"^[0-9]{1,12}$")


def _ref_date(text: str) -> date | None:
    text = text.strip()
    if not text:
        return None
    for fmt in _REF_DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"date {text!r} is not YYYY-MM-DD, MM/DD/YYYY or YYYYMMDD")


def read_company_info(data: bytes, source: str = "company_info.csv") -> list[Company]:
    """Parse company_info.csv (header row required); any bad row fails the whole file."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AsxFormatError(f"{source}: not UTF-8 ({e})") from None
    reader = csv.reader(io.StringIO(text))
    header = tuple(h.strip().lower() for h in next(reader, []))
    if header != COMPANY_INFO_HEADER:
        raise AsxFormatError(
            f"{source}: header must be {','.join(COMPANY_INFO_HEADER)}, got {','.join(header)}"
        )
    companies: list[Company] = []
    problems: list[str] = []
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        try:
            if len(row) != len(COMPANY_INFO_HEADER):
                raise ValueError(f"{len(row)} fields, expected {len(COMPANY_INFO_HEADER)}")
            company_id, symbol, name, isin, start, end = (cell.strip() for cell in row)
            if not _COMPANY_ID_RE.match(company_id):
                raise ValueError(f"company_id {company_id!r} is not a number")
            if not _SYMBOL_RE.match(symbol):
                raise ValueError(f"symbol {symbol!r} is not an ASX code")
            companies.append(
                Company(company_id, symbol, name, isin or None, _ref_date(start), _ref_date(end))
            )
        except ValueError as e:
            problems.append(f"line {line}: {e}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise AsxFormatError(f"{source}: " + "; ".join(problems[:10]) + more)
    return companies


def companies_to_arrow(companies: Iterable[Company]) -> pa.Table:
    """Companies as `market.instruments` rows (exchange ASX), sorted like the table."""
    rows = list(companies)
    table = pa.Table.from_pydict(
        {
            "company_id": [c.company_id for c in rows],
            "symbol": [c.symbol for c in rows],
            "name": [c.name for c in rows],
            "isin": [c.isin for c in rows],
            "valid_from": [c.valid_from for c in rows],
            "valid_to": [c.valid_to for c in rows],
            "exchange": [EXCHANGE] * len(rows),
        },
        schema=REFERENCE_TABLES[INSTRUMENTS].arrow_schema,
    )
    sort = REFERENCE_TABLES[INSTRUMENTS].sort_columns
    return table.sort_by([(c, "ascending") for c in sort])


# --- trade and quote files -----------------------------------------------------------------


@dataclass
class ParsedFile:
    """One vendor file: its good rows as a table (file order) and its dead letters."""

    table: pa.Table
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Rows seen: good rows plus dead letters (blank lines are not rows).
    lines: int = 0


@dataclass(frozen=True, slots=True)
class _FileContext:
    symbol: str
    company_id: str
    digest: str
    source: str
    ingested_at: int
    max_bad_rows: int


def parse_trades(
    data: bytes,
    *,
    symbol: str,
    company_id: str,
    digest: str,
    source: str,
    ingested_at: int,
    max_bad_rows: int = 10_000,
) -> ParsedFile:
    """A trades file as `market.trades` rows plus dead letters.

    Raises AsxFormatError when the file cannot be read as CSV or has more than
    `max_bad_rows` bad rows (most likely not a trades file at all).
    """
    reader = FileReader(
        TRADES,
        symbol=symbol,
        company_id=company_id,
        digest=digest,
        source=source,
        ingested_at=ingested_at,
        max_bad_rows=max_bad_rows,
    )
    return reader.parse_whole(data)


def parse_quotes(
    data: bytes,
    *,
    symbol: str,
    company_id: str,
    digest: str,
    source: str,
    ingested_at: int,
    max_bad_rows: int = 10_000,
) -> ParsedFile:
    """A quotes file as `market.quotes` rows plus dead letters; an absent side is null.

    The vendor shows an absent side as price 0 with volume 0. A zero price with a
    volume is a bad row; a price with volume 0 is kept as it is.
    """
    reader = FileReader(
        QUOTES,
        symbol=symbol,
        company_id=company_id,
        digest=digest,
        source=source,
        ingested_at=ingested_at,
        max_bad_rows=max_bad_rows,
    )
    return reader.parse_whole(data)


def slices(stream: BinaryIO, size: int) -> Iterator[bytes]:
    """The stream in pieces of about `size` bytes, each ending after a line feed (the last
    piece may not): whole lines, so that FileReader can read one piece at a time."""
    rest = b""
    while block := stream.read(size):
        data = rest + block if rest else block
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            rest = data
            continue
        rest = data[cut:]
        yield data[:cut] if rest else data
    if rest:
        yield rest


class FileReader:
    """One trades or quotes file read a slice of whole lines at a time (see `slices`).

    Memory follows the slice, not the file: `read` gives each slice's good rows in file
    order, `close` the file's dead letters and row count. Line numbers, dead letters and
    the bad-row limit are the whole file's: the outcome is exactly that of parse_trades /
    parse_quotes on the file in one piece, whatever the slicing.
    """

    def __init__(
        self,
        kind: str,
        *,
        symbol: str,
        company_id: str,
        digest: str,
        source: str,
        ingested_at: int,
        max_bad_rows: int = 10_000,
    ) -> None:
        if kind not in (TRADES, QUOTES):
            raise ValueError(f"unknown kind {kind!r}: expected {TRADES} or {QUOTES}")
        self.kind = kind
        self._names = TRADE_FIELDS if kind == TRADES else QUOTE_FIELDS
        self._schema = TABLES[kind].arrow_schema
        self._ctx = _FileContext(symbol, company_id, digest, source, ingested_at, max_bad_rows)
        self._offset = 0  # physical lines in the slices read so far
        self._started = False  # a slice with content has been read
        # Blank leading slices, held back: a file of nothing but blank space has no rows,
        # but a blank line of a file with content is still a line (and " " a bad row).
        self._blank: list[bytes] = []
        self._encoding: list[DeadLetter] = []
        self._field_count: list[DeadLetter] = []
        self._values: list[DeadLetter] = []
        self._field_count_rows = 0
        self._bad_rows = 0
        self._value_failed = False  # some row failed a value check (date, time, number)
        self._rows = 0  # rows checked: good rows plus rows that failed a value check

    def parse_whole(self, data: bytes) -> ParsedFile:
        """The whole file in one piece."""
        table = self.read(data)
        dead, lines = self.close()
        return ParsedFile(table, dead, lines)

    def read(self, data: bytes) -> pa.Table:
        """The good rows of the next slice of whole lines.

        Raises AsxFormatError when the file cannot be read as CSV or has more than
        max_bad_rows rows with the wrong field count. Once value checks have failed on more
        rows than max_bad_rows, the rest of the file is only counted (close will raise).
        """
        if not data:
            return self._schema.empty_table()
        if self._started:
            return self._read_slice(data)
        encoding: list[DeadLetter] = []
        blanked = data if data.isascii() else _blank_undecodable(data, encoding, self._ctx, 1)
        if not blanked or blanked.isspace():
            self._blank.append(data)
            return self._schema.empty_table()
        self._started = True
        if self._blank:
            data = b"".join([*self._blank, data])
            self._blank.clear()
            return self._read_slice(data)
        return self._read_slice(blanked, encoding)

    def close(self) -> tuple[list[DeadLetter], int]:
        """The file's dead letters (in the order parse_trades gives them) and its row count.

        Raises AsxFormatError when the file has more bad rows than max_bad_rows.
        """
        ctx = self._ctx
        if self._blank:
            # Nothing but blank space (once undecodable lines are blanked): no rows at all.
            _blank_undecodable(b"".join(self._blank), self._encoding, ctx, 1)
            self._blank.clear()
        if self._value_failed and self._bad_rows > ctx.max_bad_rows:
            raise AsxFormatError(f"{self._bad_rows} bad rows, more than {ctx.max_bad_rows}")
        dead = self._encoding + self._field_count + self._values
        if self._value_failed:
            dead.sort(key=lambda d: d.line or 0)
        return dead, self._rows + _blank_free(dead)

    @property
    def _over(self) -> bool:
        """Whether close will refuse the file: dead letters need not be made any more."""
        return self._value_failed and self._bad_rows > self._ctx.max_bad_rows

    def _read_slice(self, data: bytes, encoding: list[DeadLetter] | None = None) -> pa.Table:
        """Rows of `data`; with `encoding`, data already has its undecodable lines blanked."""
        ctx, names, first = self._ctx, self._names, self._offset + 1
        if encoding is None:
            encoding = []
            if not data.isascii():
                data = _blank_undecodable(data, encoding, ctx, first)
        if not data:
            # The file's last line, undecodable and without a line break: not a row.
            self._bad_rows += len(encoding)
            if not self._over:
                self._encoding.extend(encoding)
            return self._schema.empty_table()
        table, invalid = _read_csv(data, names, ctx, self._field_count_rows, threads=True)
        if invalid and any(number is None for number, _, _ in invalid):
            # Threaded reads do not number rows: read again, single-threaded, for line numbers.
            table, invalid = _read_csv(data, names, ctx, self._field_count_rows, threads=False)
        total = table.num_rows + len(invalid)
        numbers = _sequence(first, total, "q")
        self._offset += total
        self._field_count_rows += len(invalid)
        self._bad_rows += len(encoding) + len(invalid)
        if invalid:
            bad = pa.array([first - 1 + (number or 0) for number, _, _ in invalid], pa.int64())
            numbers = numbers.filter(pc.invert(pc.is_in(numbers, value_set=bad)))
            if not self._over:
                for number, text, count in invalid:
                    detail = f"{count} fields, expected {len(names)}"
                    line = first - 1 + (number or 0)
                    self._field_count.append(_dead(ctx, line, text.encode(), "field_count", detail))
        if not self._over:
            self._encoding.extend(encoding)
        columns = {n: table.column(n).combine_chunks() for n in names}
        del table
        blank = _all_empty(columns)
        if blank is not None:
            # Only a truly blank line is skipped; a line of bare commas is a bad row.
            lines = data.splitlines()
            rows = pc.indices_nonzero(blank).to_pylist()
            line_of = numbers.take(pa.array(rows, pa.int64())).to_pylist()
            real_blank = [
                r for r, ln in zip(rows, line_of, strict=True) if not lines[ln - first].strip()
            ]
            if real_blank:
                keep = pc.invert(pc.is_in(pa.array(range(len(numbers))), pa.array(real_blank)))
                columns = {n: c.filter(keep) for n, c in columns.items()}
                numbers = numbers.filter(keep)
        self._rows += len(numbers)

        def judge(checks: _Checks) -> pa.Array | None:
            return self._judge(checks, columns, numbers)

        build = _trades_table if self.kind == TRADES else _quotes_table
        return build(columns, numbers, ctx, judge)

    def _judge(
        self, checks: _Checks, cols: dict[str, pa.Array], numbers: pa.Array
    ) -> pa.Array | None:
        """Dead-letter the rows that failed a check; the mask of good rows (None: all are)."""
        failed = checks.failed()
        if failed is None or not pc.any(failed).as_py():
            return None if not self._over else pa.repeat(pa.scalar(False), len(numbers))
        rows = pc.indices_nonzero(failed)
        self._value_failed = True
        self._bad_rows += len(rows)
        if self._over:
            self._encoding.clear()
            self._field_count.clear()
            self._values.clear()
            return pa.repeat(pa.scalar(False), len(numbers))
        masks = [(r, f, m.take(rows).to_pylist()) for r, f, m in checks.items]
        fields = [c.take(rows).to_pylist() for c in cols.values()]
        names = list(cols)
        for i, number in enumerate(numbers.take(rows).to_pylist()):
            reason, field_name = next((r, f) for r, f, m in masks if m[i])
            values = [col[i] for col in fields]
            value = values[names.index(field_name)] if field_name in names else ""
            detail = f"{field_name} {value!r}"
            raw = ",".join(values).encode()
            self._values.append(_dead(self._ctx, number, raw, reason, detail))
        return pc.invert(failed)


def _trades_table(
    cols: dict[str, pa.Array], line_numbers: pa.Array, ctx: _FileContext, judge: _Judge
) -> pa.Table:
    checks = _Checks(len(line_numbers))
    when = _local_times(cols["date"], cols["time"], checks)
    price, price_zero = checks.decimal("price", cols["price"], "negative_price")
    checks.add("non_positive", "price", price_zero)
    volume, volume_zero = checks.decimal("volume", cols["volume"], "negative_volume")
    checks.add("non_positive", "volume", volume_zero)
    keep = _Keep(judge(checks))
    line_numbers = keep(line_numbers)
    n = len(line_numbers)
    symbol = ctx.symbol
    trade_id = _ids(f"{ctx.digest[:16]}:", line_numbers)
    qualifiers = keep(cols["qualifiers"])
    return pa.Table.from_arrays(
        [
            pc.binary_join_element_wise(f"{EXCHANGE}:{symbol}:trade:", trade_id, ""),
            trade_id,
            _const(symbol, n),
            _const(EXCHANGE, n),
            _const(ASSET_CLASS, n),
            keep(when).cast(_TS),
            keep(price),
            keep(volume),
            _const(CURRENCY, n),
            _const(SIDE, n),
            # Qualifiers (auction, pre-open and the like) are the trade's conditions.
            pa.ListArray.from_arrays(
                _sequence(0, n + 1, "i"),
                qualifiers,
                type=_CONDITIONS,
                mask=pc.equal(qualifiers, ""),
            ),
            pa.nulls(n, pa.int64()),
            pa.repeat(pa.scalar(ctx.ingested_at, _TS), n),
            line_numbers,
            _trade_vendor_data(
                ctx.company_id, qualifiers, keep(cols["venue"]), keep(cols["buyer_id"])
            ),
            _const("batch", n),
        ],
        schema=TABLES[TRADES].arrow_schema,
    )


def _quotes_table(
    cols: dict[str, pa.Array], line_numbers: pa.Array, ctx: _FileContext, judge: _Judge
) -> pa.Table:
    checks = _Checks(len(line_numbers))
    when = _local_times(cols["date"], cols["time"], checks)
    decimals = {
        name: checks.decimal(name, cols[name], reason)
        for name, reason in (
            ("bid", "negative_price"),
            ("ask", "negative_price"),
            ("bid_volume", "negative_volume"),
            ("ask_volume", "negative_volume"),
        )
    }
    absent = {}
    for side in ("bid", "ask"):
        price_zero, volume_zero = decimals[side][1], decimals[f"{side}_volume"][1]
        checks.add("non_positive", side, pc.and_(price_zero, pc.invert(volume_zero)))
        absent[side] = pc.and_(price_zero, volume_zero)
    keep = _Keep(judge(checks))
    line_numbers = keep(line_numbers)
    n = len(line_numbers)

    def side_column(name: str, side: str) -> pa.Array:
        return keep(pc.if_else(absent[side], None, decimals[name][0]))

    return pa.Table.from_arrays(
        [
            _ids(f"{EXCHANGE}:{ctx.symbol}:quote:{ctx.digest[:16]}:", line_numbers),
            _const(ctx.symbol, n),
            _const(EXCHANGE, n),
            _const(ASSET_CLASS, n),
            keep(when).cast(_TS),
            side_column("bid", "bid"),
            side_column("bid_volume", "bid"),
            side_column("ask", "ask"),
            side_column("ask_volume", "ask"),
            _const(CURRENCY, n),
            pa.nulls(n, pa.int64()),
            pa.repeat(pa.scalar(ctx.ingested_at, _TS), n),
            line_numbers,
            _const(_json.encode({"company_id": ctx.company_id}).decode(), n),
            _const("batch", n),
        ],
        schema=TABLES[QUOTES].arrow_schema,
    )


def _blank_free(dead: Sequence[DeadLetter]) -> int:
    """Dead letters of lines that never became rows (field count, encoding)."""
    return sum(1 for d in dead if d.reason in ("field_count", "bad_encoding"))


def _sequence(start: int, n: int, typecode: Literal["i", "q"]) -> pa.Array:
    """start, start+1, ... as int32 ("i") or int64 ("q"), built in Arrow, not in Python."""
    typ = pa.int32() if typecode == "i" else pa.int64()
    if n == 0:
        return pa.array([], typ)
    return pc.cumulative_sum(pa.repeat(pa.scalar(1, typ), n), start=start - 1)


def _const(value: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, pa.string()), n)


def _ids(prefix: str, numbers: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(prefix, numbers.cast(pa.string()), "")


def _dead(ctx: _FileContext, line: int, raw: bytes, reason: str, detail: str) -> DeadLetter:
    return DeadLetter(
        received_at=ctx.ingested_at,
        source=ctx.source,
        exchange=EXCHANGE,
        reason=reason,
        raw=raw[:_MAX_RAW],
        line=line,
        detail=detail[:500],
    )


def _read_csv(
    data: bytes, names: tuple[str, ...], ctx: _FileContext, earlier: int, *, threads: bool
) -> tuple[pa.Table, list[tuple[int | None, str, int]]]:
    """Split whole lines into string columns; `earlier`: wrong field counts in the file so far."""
    invalid: list[tuple[int | None, str, int]] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:
        invalid.append((row.number, row.text, row.actual_columns))
        # Past the limit this is not a file of this kind: stop reading it.
        return "error" if earlier + len(invalid) > ctx.max_bad_rows else "skip"

    try:
        table = pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(column_names=list(names), use_threads=threads),
            # The vendor never quotes: a quote character is data, not syntax.
            parse_options=pcsv.ParseOptions(
                quote_char=False, ignore_empty_lines=False, invalid_row_handler=on_invalid
            ),
            convert_options=pcsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as e:
        if earlier + len(invalid) > ctx.max_bad_rows:
            raise AsxFormatError(
                f"more than {ctx.max_bad_rows} rows with the wrong field count "
                f"(expected {len(names)}: {','.join(names)})"
            ) from None
        raise AsxFormatError(f"not a readable CSV file: {e}") from None
    return table, invalid


def _blank_undecodable(
    data: bytes, dead: list[DeadLetter], ctx: _FileContext, first_line: int
) -> bytes:
    """Dead-letter lines that are not UTF-8 and blank them, keeping the line count."""
    out: list[bytes] = []
    for number, line in enumerate(data.splitlines(keepends=True), start=first_line):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            body = line.rstrip(b"\r\n")
            dead.append(_dead(ctx, number, body, "bad_encoding", str(e)))
            end = line[len(body) :]
            # The line break stays, a lone "\n" as "\r\n": after a line ending in "\r" it
            # would join that "\r" as one line break and shift every later line number.
            line = b"\r\n" if end == b"\n" else end
        out.append(line)
    return b"".join(out)


def _all_empty(columns: dict[str, pa.Array]) -> pa.Array | None:
    """Rows whose fields are all empty, or None when there are none."""
    mask: pa.Array | None = None
    for col in columns.values():
        empty = pc.equal(pc.binary_length(col), 0)
        mask = empty if mask is None else pc.and_(mask, empty)
    if mask is None or not pc.any(mask).as_py():
        return None
    return mask


class _Keep:
    """Filter columns down to the good rows (a no-op when every row is good)."""

    def __init__(self, good: pa.Array | None) -> None:
        self.good = good

    def __call__(self, values: pa.Array) -> pa.Array:
        return values if self.good is None else values.filter(self.good)


class _Checks:
    """Per-row failure masks in priority order; a row's reason is its first failed check."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.items: list[tuple[str, str, pa.Array]] = []

    def add(self, reason: str, field_name: str, failed: pa.Array) -> None:
        self.items.append((reason, field_name, pc.fill_null(failed, True)))

    def decimal(
        self, name: str, values: pa.Array, negative_reason: str
    ) -> tuple[pa.Array, pa.Array]:
        """Check a decimal(18,8) column; return it cast (0 where bad) and its zero mask."""
        ok = pc.match_substring_regex(values, _DECIMAL_RE)
        if not pc.all(ok).as_py():
            negative = pc.match_substring_regex(values, _NEGATIVE_RE)
            self.add("invalid_number", name, pc.and_(pc.invert(ok), pc.invert(negative)))
            self.add(negative_reason, name, negative)
            values = pc.if_else(ok, values, "0")
        # Exact: the pattern admits only what decimal(18,8) holds, so the cast cannot round.
        cast = values.cast(_DECIMAL)
        return cast, pc.equal(cast, _ZERO)

    def failed(self) -> pa.Array | None:
        """Rows that failed any check (None when there are no checks)."""
        failed: pa.Array | None = None
        for _, _, mask in self.items:
            failed = mask if failed is None else pc.or_(failed, mask)
        return failed


# Given a slice's checks: dead-letter its bad rows, return the mask of good ones (None: all).
_Judge = Callable[[_Checks], "pa.Array | None"]


def _local_times(dates: pa.Array, times: pa.Array, checks: _Checks) -> pa.Array:
    """UTC microseconds (int64) of exchange-local date + time, checking both.

    Dates are few (one per trading day), so each distinct date is checked and its UTC
    offset taken from zoneinfo once; only rows on a day when the offset changes are
    converted row by row (ambiguous times take the earlier, daylight-saving instant, as
    zoneinfo's fold=0 does; times that do not exist on that day are bad rows).
    """
    encoded = pc.dictionary_encode(dates)
    day_us: list[int | None] = []
    offset_us: list[int | None] = []
    for text in encoded.dictionary.to_pylist():
        day = _parse_date(text)
        if day is None:
            day_us.append(None)
            offset_us.append(None)
            continue
        day_us.append((day - _EPOCH) // timedelta(microseconds=1))
        first = day.replace(tzinfo=TIMEZONE).utcoffset()
        last = (day + timedelta(days=1, microseconds=-1)).replace(tzinfo=TIMEZONE).utcoffset()
        assert first is not None and last is not None
        offset_us.append(first // timedelta(microseconds=1) if first == last else None)
    day = pa.array(day_us, pa.int64()).take(encoded.indices)
    checks.add("bad_date", "date", pc.is_null(day))
    time_ok = pc.match_substring_regex(times, _TIME_RE)
    checks.add("bad_time", "time", pc.invert(time_ok))
    safe = pc.if_else(time_ok, times, "00:00:00")
    hh = pc.utf8_slice_codeunits(safe, 0, 2).cast(pa.int64())
    mm = pc.utf8_slice_codeunits(safe, 3, 5).cast(pa.int64())
    ss = pc.utf8_slice_codeunits(safe, 6, 8).cast(pa.int64())
    frac = pc.utf8_rpad(pc.utf8_slice_codeunits(safe, 9, 15), 6, "0").cast(pa.int64())
    seconds = pc.add(pc.add(pc.multiply(hh, 3600), pc.multiply(mm, 60)), ss)
    local = pc.add(day, pc.add(pc.multiply(seconds, 1_000_000), frac))
    offset = pa.array(offset_us, pa.int64()).take(encoded.indices)
    utc = pc.subtract(local, offset)
    changing = pc.and_(pc.is_valid(day), pc.is_null(offset))
    if pc.any(changing).as_py():
        naive = pc.fill_null(local, 0).cast(pa.timestamp("us"))
        early = pc.assume_timezone(
            naive, TIMEZONE.key, ambiguous="earliest", nonexistent="earliest"
        ).cast(pa.int64())
        late = pc.assume_timezone(
            naive, TIMEZONE.key, ambiguous="earliest", nonexistent="latest"
        ).cast(pa.int64())
        checks.add("nonexistent_local_time", "time", pc.and_(changing, pc.not_equal(early, late)))
        utc = pc.if_else(changing, early, utc)
    return utc


def _parse_date(text: str) -> datetime | None:
    """MM/DD/YYYY exactly (two-digit month and day), as naive local midnight."""
    if not _DATE_RE.match(text):
        return None
    try:
        return datetime.strptime(text, "%m/%d/%Y")
    except ValueError:
        return None


def _trade_vendor_data(
    company_id: str, qualifiers: pa.Array, venue: pa.Array, buyer: pa.Array
) -> pa.Array:
    """vendor_data JSON per trade, encoded once per distinct (qualifiers, venue, buyer)."""
    parts = [pc.dictionary_encode(c) for c in (qualifiers, venue, buyer)]
    if math.prod(len(p.dictionary) for p in parts) >= 2**62:
        # Too many distinct combinations to number in an int64: encode row by row.
        rows = zip(qualifiers.to_pylist(), venue.to_pylist(), buyer.to_pylist(), strict=True)
        return pa.array([_vendor_json(company_id, q, v, b) for q, v, b in rows], pa.string())
    code: pa.Array = pa.repeat(pa.scalar(0, pa.int64()), len(qualifiers))
    for part in parts:
        code = pc.add(pc.multiply(code, len(part.dictionary)), part.indices.cast(pa.int64()))
    combos = pc.dictionary_encode(code)
    values = [p.dictionary.to_pylist() for p in parts]
    sizes = [len(v) for v in values]
    docs: list[str] = []
    for code in combos.dictionary.to_pylist():
        rest, b = divmod(code, sizes[2])
        q, v = divmod(rest, sizes[1])
        docs.append(_vendor_json(company_id, values[0][q], values[1][v], values[2][b]))
    return pa.array(docs, pa.string()).take(combos.indices)


def _vendor_json(company_id: str, qualifiers: str, venue: str, buyer: str) -> str:
    """The vendor's fields that have no column; empty fields are left out."""
    doc = {"company_id": company_id, "venue": venue, "buyer_id": buyer, "qualifiers": qualifiers}
    return _json.encode({k: v for k, v in doc.items() if v}).decode()
