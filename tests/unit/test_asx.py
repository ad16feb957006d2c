"""ASX vendor format: rows, UTC conversion across daylight saving, dead letters, reference file."""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2d.model import Quote, Trade
from k2d.storage import QUOTES, TABLES, TRADES, quotes_to_arrow, trades_to_arrow
from k2d.venues import asx

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "asx"
DIGEST = "0123456789abcdef" + "0" * 48
H16 = DIGEST[:16]
INGESTED = 1_700_000_000_000_000
SYDNEY = asx.TIMEZONE


def trades(data: bytes, max_bad_rows: int = 10_000) -> asx.ParsedFile:
    return asx.parse_trades(
        data,
        symbol="BHP",
        company_id="7078",
        digest=DIGEST,
        source="/in/trades/7078.csv",
        ingested_at=INGESTED,
        max_bad_rows=max_bad_rows,
    )


def quotes(data: bytes) -> asx.ParsedFile:
    return asx.parse_quotes(
        data,
        symbol="BHP",
        company_id="7078",
        digest=DIGEST,
        source="/in/quotes/7078.csv",
        ingested_at=INGESTED,
    )


def utc_us(text: str) -> int:
    """Exchange-local 'MM/DD/YYYY HH:MM:SS.fff' as UTC µs, through zoneinfo (fold=0)."""
    local = datetime.strptime(text, "%m/%d/%Y %H:%M:%S.%f").replace(tzinfo=SYDNEY)
    return (local - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def dead(parsed: asx.ParsedFile) -> list[tuple[int | None, str, bytes]]:
    return [(d.line, d.reason, d.raw) for d in parsed.dead_letters]


# --- trades ----------------------------------------------------------------------------


def test_a_trade_row_is_the_same_table_the_live_builders_make() -> None:
    parsed = trades(b"03/10/2014,10:05:44.516,37.51,40000,3,X,\n")

    expected = Trade(
        message_id=f"ASX:BHP:trade:{H16}:1",
        trade_id=f"{H16}:1",
        symbol="BHP",
        exchange="ASX",
        asset_class="equities",
        timestamp=1_394_406_344_516_000,  # 2014-03-09T23:05:44.516Z: AEDT is UTC+11
        price="37.51",
        quantity="40000",
        currency="AUD",
        side="UNKNOWN",
        trade_conditions=("3",),
        source_sequence=None,
        ingestion_timestamp=INGESTED,
        platform_sequence=1,
        vendor_data='{"company_id":"7078","venue":"X","qualifiers":"3"}',
        provenance="batch",
    )
    assert parsed.table.equals(trades_to_arrow([expected]))
    assert parsed.table.schema == TABLES[TRADES].arrow_schema
    assert parsed.dead_letters == []


def test_empty_buyer_and_qualifiers_are_left_out_and_a_buyer_is_kept() -> None:
    parsed = trades(b"03/10/2014,10:05:44.516,37.52,1000,,X,1234\n03/10/2014,10:05:45.000,1,1,,,\n")

    rows = parsed.table.to_pylist()
    assert rows[0]["trade_conditions"] is None
    assert json.loads(rows[0]["vendor_data"]) == {
        "company_id": "7078",
        "venue": "X",
        "buyer_id": "1234",
    }
    assert json.loads(rows[1]["vendor_data"]) == {"company_id": "7078"}


@pytest.mark.parametrize(
    ("line", "expected_us"),
    [
        # AEDT (UTC+11) until 2014-04-06 03:00 local, AEST (UTC+10) until 2014-10-05 02:00.
        ("03/10/2014,07:00:11.938", 1_394_395_211_938_000),  # 2014-03-09T20:00:11.938Z
        ("04/04/2014,15:59:59.001", 1_396_587_599_001_000),  # 2014-04-04T04:59:59.001Z
        ("04/07/2014,10:00:01.500", 1_396_828_801_500_000),  # 2014-04-07T00:00:01.500Z
        ("10/03/2014,16:10:00.000", 1_412_316_600_000_000),  # 2014-10-03T06:10:00Z
        ("10/06/2014,10:15:00.000", 1_412_550_900_000_000),  # 2014-10-05T23:15:00Z
        ("06/30/2014,23:59:59.999", 1_404_136_799_999_000),  # 2014-06-30T13:59:59.999Z
        ("01/01/2014,00:00:00", 1_388_494_800_000_000),  # no fraction; 2013-12-31T13:00Z
    ],
)
def test_local_times_become_utc_across_daylight_saving(line: str, expected_us: int) -> None:
    parsed = trades(f"{line},1.00,1,,X,\n".encode())

    assert parsed.table.column("timestamp").cast(pa.int64()).to_pylist() == [expected_us]


def test_on_the_change_days_an_ambiguous_time_is_the_earlier_and_a_missing_one_is_dead() -> None:
    data = (
        b"04/06/2014,01:59:59.999,1,1,,,\n"  # AEDT
        b"04/06/2014,02:30:00.000,1,1,,,\n"  # happens twice: the first (AEDT) is taken
        b"04/06/2014,03:00:00.000,1,1,,,\n"  # AEST
        b"10/05/2014,01:59:59.999,1,1,,,\n"  # AEST
        b"10/05/2014,02:30:00.000,1,1,,,\n"  # does not exist: clocks go 02:00 -> 03:00
        b"10/05/2014,03:00:00.000,1,1,,,\n"  # AEDT
    )
    parsed = trades(data)

    assert parsed.table.column("timestamp").cast(pa.int64()).to_pylist() == [
        1_396_709_999_999_000,  # 2014-04-05T14:59:59.999Z
        1_396_711_800_000_000,  # 2014-04-05T15:30:00Z
        1_396_717_200_000_000,  # 2014-04-05T17:00:00Z
        1_412_438_399_999_000,  # 2014-10-04T15:59:59.999Z
        1_412_438_400_000_000,  # 2014-10-04T16:00:00Z
    ]
    assert parsed.table.column("platform_sequence").to_pylist() == [1, 2, 3, 4, 6]
    assert dead(parsed) == [(5, "nonexistent_local_time", b"10/05/2014,02:30:00.000,1,1,,,")]


_LOCAL = st.datetimes(min_value=datetime(1995, 1, 1), max_value=datetime(2035, 12, 31))


@settings(max_examples=300, deadline=None)
@given(st.lists(_LOCAL, min_size=1, max_size=20))
def test_conversion_agrees_with_zoneinfo(stamps: list[datetime]) -> None:
    stamps = [s.replace(microsecond=s.microsecond // 1000 * 1000) for s in stamps]
    data = "".join(f"{s:%m/%d/%Y,%H:%M:%S}.{s.microsecond // 1000:03d},1,1,,,\n" for s in stamps)

    parsed = trades(data.encode())

    expected, missing = [], []
    for i, s in enumerate(stamps, start=1):
        aware = s.replace(tzinfo=SYDNEY)
        if aware.astimezone(UTC).astimezone(SYDNEY).replace(tzinfo=None) != s:
            missing.append(i)  # in the spring-forward hour
            continue
        expected.append(utc_us(f"{s:%m/%d/%Y %H:%M:%S}.{s.microsecond:06d}"))
    assert parsed.table.column("timestamp").cast(pa.int64()).to_pylist() == expected
    assert [d.line for d in parsed.dead_letters] == missing


def test_bad_rows_are_dead_letters_with_line_reason_and_raw_bytes() -> None:
    data = (
        b"03/10/2014,10:00:00.000,37.50,100,,X,\n"
        b"03/10/2014,10:00:00.000,37.50,100,,X\n"
        b"03/10/2014,10:00:00.000,37.5x,100,,X,\n"
        b"02/30/2014,10:00:00.000,37.50,100,,X,\n"
        b"3/10/2014,10:00:00.000,37.50,100,,X,\n"
        b"03/10/2014,24:00:00.000,37.50,100,,X,\n"
        b"03/10/2014,10:00:00.000,-37.50,100,,X,\n"
        b"03/10/2014,10:00:00.000,37.50,-5,,X,\n"
        b"03/10/2014,10:00:00.000,0.00,100,,X,\n"
        b"03/10/2014,10:00:00.000,37.50,0,,X,\n"
        b"03/10/2014,10:00:00.000,37.123456789,1,,X,\n"
        b"03/10/2014,10:00:00.000,12345678901,1,,X,\n"
        b",,,,,,\n"
        b"03/10/2014,10:00:00.000,37.50,100,,X,,extra\n"
        b"03/10/2014,10:00:01.000,37.60,200,,X,\n"
    )
    parsed = trades(data)

    assert [(line, reason) for line, reason, _ in dead(parsed)] == [
        (2, "field_count"),
        (3, "invalid_number"),
        (4, "bad_date"),
        (5, "bad_date"),
        (6, "bad_time"),
        (7, "negative_price"),
        (8, "negative_volume"),
        (9, "non_positive"),
        (10, "non_positive"),
        (11, "invalid_number"),
        (12, "invalid_number"),
        (13, "bad_date"),
        (14, "field_count"),
    ]
    assert dead(parsed)[1][2] == b"03/10/2014,10:00:00.000,37.5x,100,,X,"
    assert dead(parsed)[0][2] == b"03/10/2014,10:00:00.000,37.50,100,,X"
    assert parsed.dead_letters[0].detail == "6 fields, expected 7"
    assert parsed.dead_letters[1].detail == "price '37.5x'"
    assert {d.source for d in parsed.dead_letters} == {"/in/trades/7078.csv"}
    assert {d.exchange for d in parsed.dead_letters} == {"ASX"}
    assert parsed.table.column("platform_sequence").to_pylist() == [1, 15]
    assert parsed.lines == 15


def test_blank_lines_are_not_rows_and_do_not_shift_line_numbers() -> None:
    data = b"\n03/10/2014,10:00:00.000,1,1,,,\r\n\r\n03/10/2014,10:00:01.000,2,1,,,\r\n\n"

    parsed = trades(data)

    assert parsed.table.column("platform_sequence").to_pylist() == [2, 4]
    assert parsed.table.column("price").to_pylist() == [Decimal(1), Decimal(2)]
    assert parsed.dead_letters == []
    assert parsed.lines == 2


def test_a_line_that_is_not_utf8_is_a_dead_letter_and_the_rest_loads() -> None:
    data = b"03/10/2014,10:00:00.000,1,1,,X,\n03/10/2014,10:00:00.000,1,1,,\xff,\n" + (
        "03/10/2014,10:00:02.000,3,1,,X,Zoë\n".encode()
    )

    parsed = trades(data)

    assert dead(parsed) == [(2, "bad_encoding", b"03/10/2014,10:00:00.000,1,1,,\xff,")]
    assert parsed.table.column("platform_sequence").to_pylist() == [1, 3]
    assert json.loads(parsed.table.column("vendor_data")[1].as_py())["buyer_id"] == "Zoë"


def test_line_numbers_stay_exact_in_a_file_read_in_parallel_blocks() -> None:
    n = 120_000  # several MB: the CSV reader splits it into blocks read by threads
    lines = [
        f"03/10/2014,10:{i // 6000 % 60:02d}:{i // 100 % 60:02d}.000,1.5,{i + 1},,X,"
        for i in range(n)
    ]
    for bad in (5_000, 77_777, 119_999):
        lines[bad - 1] = "03/10/2014,10:00:00.000,1.5"
    parsed = trades(("\n".join(lines) + "\n").encode())

    assert [d.line for d in parsed.dead_letters] == [5_000, 77_777, 119_999]
    seq = parsed.table.column("platform_sequence").to_pylist()
    qty = parsed.table.column("quantity").to_pylist()
    assert len(seq) == n - 3
    assert all(Decimal(s) == q for s, q in zip(seq, qty, strict=True))


def test_a_file_of_another_kind_is_refused_whole() -> None:
    data = b"03/10/2014,07:00:11.938,37.73,37.73,19,600\n" * 20

    with pytest.raises(asx.AsxFormatError, match="more than 10 rows with the wrong field count"):
        trades(data, max_bad_rows=10)


def test_more_bad_values_than_allowed_refuse_the_file() -> None:
    data = b"03/10/2014,07:00:11.938,x,1,,,\n" * 5

    with pytest.raises(asx.AsxFormatError, match="5 bad rows, more than 4"):
        trades(data, max_bad_rows=4)


def test_an_empty_file_has_no_rows() -> None:
    parsed = trades(b"")

    assert parsed.table.num_rows == 0
    assert parsed.table.schema == TABLES[TRADES].arrow_schema


# --- a file read in slices ----------------------------------------------------------------

_TRADE_LINES = (
    b"03/10/2014,10:00:00.000,37.50,100,,X,",
    b"03/10/2014,10:00:01.000,37.60,200,XT,X,1234",
    b"03/10/2014,10:00:00.000,37.50,100,,X",  # field count
    b"03/10/2014,10:00:00.000,37.5x,100,,X,",  # invalid number
    b"02/30/2014,10:00:00.000,37.50,100,,X,",  # bad date
    b"10/05/2014,02:30:00.000,1,1,,,",  # nonexistent local time
    b",,,,,,",  # bare commas: a bad row
    b"",  # blank: not a row
    b" ",  # a space: the wrong field count, unless the whole file is blank
    b"03/10/2014,10:00:00.000,1,1,,\xff,",  # not UTF-8
    "03/10/2014,10:00:02.000,3,1,,X,Zo\u00eb".encode(),
)
_QUOTE_LINES = (
    b"03/10/2014,07:00:11.938,37.73,37.74,19,600",
    b"03/10/2014,07:00:11.938,0,0,0,0",  # both sides absent
    b"03/10/2014,07:00:11.938,0,37.74,5,600",  # zero price with a volume
    b"03/10/2014,07:00:11.938,37.73,37.74,19",  # field count
    b"",
    b"03/10/2014,07:00:11.938,1,1,1,\xfe",
)


def parse_in_slices(
    kind: str, data: bytes, size: int, max_bad_rows: int
) -> tuple[pa.Table, list[tuple[Any, ...]], int]:
    reader = asx.FileReader(
        kind,
        symbol="BHP",
        company_id="7078",
        digest=DIGEST,
        source="/in/7078.csv",
        ingested_at=INGESTED,
        max_bad_rows=max_bad_rows,
    )
    tables = [reader.read(piece) for piece in asx.slices(io.BytesIO(data), size)]
    dead_letters, lines = reader.close()
    table = pa.concat_tables([TABLES[kind].arrow_schema.empty_table(), *tables])
    return table, [msgspec.structs.astuple(d) for d in dead_letters], lines


def parse_whole(kind: str, data: bytes, max_bad_rows: int) -> tuple[pa.Table, list[Any], int]:
    parse = asx.parse_trades if kind == TRADES else asx.parse_quotes
    parsed = parse(
        data,
        symbol="BHP",
        company_id="7078",
        digest=DIGEST,
        source="/in/7078.csv",
        ingested_at=INGESTED,
        max_bad_rows=max_bad_rows,
    )
    return parsed.table, [msgspec.structs.astuple(d) for d in parsed.dead_letters], parsed.lines


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from((TRADES, QUOTES)),
    picks=st.lists(st.integers(0, 10), max_size=40),
    endings=st.lists(st.sampled_from((b"\n", b"\r\n", b"\r")), min_size=1, max_size=3),
    last_newline=st.booleans(),
    size=st.integers(1, 120),
    max_bad_rows=st.integers(1, 12),
)
def test_a_file_read_in_slices_gives_what_the_whole_file_gives(
    kind: str,
    picks: list[int],
    endings: list[bytes],
    last_newline: bool,
    size: int,
    max_bad_rows: int,
) -> None:
    pool = _TRADE_LINES if kind == TRADES else _QUOTE_LINES
    lines = [pool[i % len(pool)] for i in picks]
    data = b"".join(line + endings[i % len(endings)] for i, line in enumerate(lines))
    if not last_newline and data:
        data = data.rstrip(b"\r\n")

    try:
        expected: Any = parse_whole(kind, data, max_bad_rows)
    except asx.AsxFormatError as e:
        expected = str(e)
    try:
        got: Any = parse_in_slices(kind, data, size, max_bad_rows)
    except asx.AsxFormatError as e:
        got = str(e)

    if isinstance(expected, str):
        assert got == expected
    else:
        assert not isinstance(got, str), got
        assert got[0].equals(expected[0])
        assert got[1:] == expected[1:]


def test_slices_end_at_line_feeds_and_keep_every_byte() -> None:
    data = b"a,b\r\nccc\n\n" + b"d" * 50 + b"\ne"

    pieces = list(asx.slices(io.BytesIO(data), 4))

    assert b"".join(pieces) == data
    assert all(p.endswith(b"\n") for p in pieces[:-1])
    assert pieces[-1] == b"e"


# --- quotes ----------------------------------------------------------------------------


def test_quotes_keep_both_sides_and_null_an_absent_one() -> None:
    data = (
        b"03/10/2014,07:00:11.938,37.73,37.73,19,600\n"
        b"03/10/2014,07:00:12.000,0.0,37.80,0,600\n"
        b"03/10/2014,10:00:00.500,37.50,0.0,100,0\n"
        b"03/10/2014,10:00:01.000,0.0,0.0,0,0\n"
        b"03/10/2014,10:00:02.000,0.0,37.55,50,100\n"
        b"03/10/2014,10:00:03.000,37.50,37.55,100\n"
        b"03/10/2014,10:00:04.000,37.50,-37.55,100,5\n"
    )
    parsed = quotes(data)

    def q(line: int, ts: int, bid: tuple[str, str] | None, ask: tuple[str, str] | None) -> Quote:
        return Quote(
            message_id=f"ASX:BHP:quote:{H16}:{line}",
            symbol="BHP",
            exchange="ASX",
            asset_class="equities",
            timestamp=ts,
            bid_price=bid[0] if bid else None,
            bid_quantity=bid[1] if bid else None,
            ask_price=ask[0] if ask else None,
            ask_quantity=ask[1] if ask else None,
            currency="AUD",
            source_sequence=None,
            ingestion_timestamp=INGESTED,
            platform_sequence=line,
            vendor_data='{"company_id":"7078"}',
            provenance="batch",
        )

    expected = [
        q(1, 1_394_395_211_938_000, ("37.73", "19"), ("37.73", "600")),
        q(2, 1_394_395_212_000_000, None, ("37.80", "600")),
        q(3, 1_394_406_000_500_000, ("37.50", "100"), None),
        q(4, 1_394_406_001_000_000, None, None),
    ]
    assert parsed.table.equals(quotes_to_arrow(expected))
    assert parsed.table.schema == TABLES[QUOTES].arrow_schema
    assert [(line, reason) for line, reason, _ in dead(parsed)] == [
        (5, "non_positive"),
        (6, "field_count"),
        (7, "negative_price"),
    ]
    assert parsed.dead_letters[0].detail == "bid '0.0'"


# --- company_info.csv ------------------------------------------------------------------


def test_company_info_maps_ids_to_symbols_with_dates() -> None:
    companies = asx.read_company_info((FIXTURES / "company_info.csv").read_bytes())

    assert companies == [
        asx.Company("7078", "BHP", "BHP Billiton Limited", "AU000000BHP4", date(2000, 1, 2), None),
        asx.Company(
            "1500",
            "CBA",
            "Commonwealth Bank of Australia, Ltd",
            "AU000000CBA7",
            date(2000, 1, 4),
            None,
        ),
    ]
    table = asx.companies_to_arrow(companies)
    assert table.column("company_id").to_pylist() == ["1500", "7078"]
    assert table.column("exchange").to_pylist() == ["ASX", "ASX"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("id,symbol\n7078,BHP\n", "header must be"),
        (
            "company_id,symbol,company_name,ISIN,start_date,end_date\n7078,BHP,BHP\n",
            "line 2: 3 fields",
        ),
        (
            "company_id,symbol,company_name,ISIN,start_date,end_date\nx1,BHP,BHP,,,\n",
            "company_id 'x1' is not a number",
        ),
        (
            "company_id,symbol,company_name,ISIN,start_date,end_date\n7078,BHP,BHP,,13/45/2014,\n",
            "date '13/45/2014'",
        ),
    ],
)
def test_a_bad_company_info_file_is_refused_with_the_line(text: str, problem: str) -> None:
    with pytest.raises(asx.AsxFormatError, match=problem):
        asx.read_company_info(text.encode(), "company_info.csv")


def test_row_id_is_hash_prefix_and_line() -> None:
    assert asx.row_id(DIGEST, 42) == f"{H16}:42"
