"""The capture journal on real files: round trips, positions, rotation, damage, retention."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2d.journal import (
    RECORD_OVERHEAD,
    Journal,
    JournalError,
    JournalOptions,
    JournalPosition,
    first_record_after,
    format_report,
    inspect,
    last_record,
    scan,
    segments,
)

FEED = "binance"
DAY_US = 86_400_000_000
T0 = int(datetime(2026, 11, 25, 12, tzinfo=UTC).timestamp()) * 1_000_000


def frame(i: int, size: int = 170) -> bytes:
    head = f'{{"stream":"btcusdt@trade","i":{i},"p":"'.encode()
    return (head + b"7" * size)[:size]


def journal(directory: Path, now_us: int = T0, **options: Any) -> Journal:
    j = Journal(directory, FEED, JournalOptions(**options), clock=lambda: now_us)
    j.open()
    return j


def written(j: Journal, n: int, start_us: int = T0, size: int = 170) -> list[tuple[int, bytes]]:
    records = [(start_us + i, frame(i, size)) for i in range(n)]
    for received_us, data in records:
        j.append(received_us, data)
    return records


def read_all(directory: Path, **kw: JournalPosition | None) -> list[tuple[int, bytes]]:
    return [(t, f) for _, t, f in scan(directory, FEED, **kw)]


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_round_trip_is_byte_exact_with_receive_times(tmp_path: Path) -> None:
    j = journal(tmp_path)
    records = [(T0 + i * 7, frame(i, size=1 + i * 13)) for i in range(100)]
    records.append((T0 + 1_000, b""))
    positions = [j.append(t, f) for t, f in records]
    j.close()

    got = list(scan(tmp_path, FEED))

    assert [(t, f) for _, t, f in got] == records
    assert [p for p, _, _ in got] == positions
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)
    assert j.records_written == len(records)
    assert j.bytes_written == sum(s.size for s in segments(tmp_path, FEED))


def test_append_many_matches_single_appends(tmp_path: Path) -> None:
    j = journal(tmp_path)
    records = [(T0 + i, frame(i)) for i in range(10)]

    end = j.append_many(records)
    j.close()

    assert end == j.position == JournalPosition(1, 31 + 10 * (170 + RECORD_OVERHEAD))
    assert read_all(tmp_path) == records


def test_position_json_round_trip_and_order() -> None:
    p = JournalPosition(42, 1_000)

    doc = json.loads(json.dumps(p.to_json()))

    assert doc == {"segment": 42, "offset": 1_000}
    assert JournalPosition.from_json(doc) == p
    assert JournalPosition(41, 9_999_999) < p < JournalPosition(42, 1_001) < JournalPosition(43, 0)
    assert max(JournalPosition(43, 0), p) == JournalPosition(43, 0)


@pytest.mark.parametrize(
    "doc",
    [{}, {"segment": 1}, {"segment": "1", "offset": 2}, {"segment": True, "offset": 2},
     {"segment": 1, "offset": -1}, {"segment": 1.0, "offset": 2}],
)  # fmt: skip
def test_position_from_json_rejects_garbage(doc: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="not a journal position"):
        JournalPosition.from_json(doc)


def test_scan_after_any_position_yields_exactly_the_later_records(tmp_path: Path) -> None:
    j = journal(tmp_path, segment_bytes=4096)
    records = [(T0 + i, frame(i, 150 + i % 50)) for i in range(120)]
    positions = [j.append(t, f) for t, f in records]
    j.close()
    assert len(segments(tmp_path, FEED)) > 3

    for k in [0, 1, 17, 18, 19, 60, 118, 119]:
        assert read_all(tmp_path, after=positions[k]) == records[k + 1 :], k
    assert read_all(tmp_path, after=JournalPosition(0, 0)) == records
    # Not a record boundary: read from the segment's top, skip what ends before it.
    assert (
        read_all(tmp_path, after=positions[3]._replace(offset=positions[3].offset + 5))
        == (records[4:])
    )
    assert read_all(tmp_path, until=positions[30]) == records[:31]
    assert read_all(tmp_path, after=positions[10], until=positions[30]) == records[11:31]
    assert first_record_after(tmp_path, FEED, positions[59]) == (positions[60], T0 + 60)


def test_rotation_by_size_keeps_segments_under_the_limit(tmp_path: Path) -> None:
    j = journal(tmp_path, segment_bytes=4096)
    records = written(j, 100, size=300)
    j.close()

    files = segments(tmp_path, FEED)

    per_segment = (4096 - 31) // (300 + RECORD_OVERHEAD)
    assert len(files) == -(-100 // per_segment)
    assert [s.segment for s in files] == list(range(1, len(files) + 1))
    assert all(s.size <= 4096 for s in files)
    assert j.segments_created == len(files)
    assert read_all(tmp_path) == records


def test_a_frame_larger_than_a_segment_gets_one_of_its_own(tmp_path: Path) -> None:
    j = journal(tmp_path, segment_bytes=4096, max_frame_bytes=10_000)
    big = [(T0, frame(0, 100)), (T0 + 1, b"x" * 9_000), (T0 + 2, frame(2, 100))]
    for t, f in big:
        j.append(t, f)
    j.close()

    assert [s.size > 9_000 for s in segments(tmp_path, FEED)] == [False, True, False]
    assert read_all(tmp_path) == big


def test_rotation_by_utc_day_of_the_receive_time(tmp_path: Path) -> None:
    day0 = T0 - T0 % DAY_US
    j = journal(tmp_path, now_us=day0 + 1)
    records = [
        (day0 + DAY_US - 1, b"last of the 25th"),
        (day0 + DAY_US, b"first of the 26th"),
        (day0 + DAY_US - 5, b"clock stepped back: stays in the 26th"),
        (day0 + 3 * DAY_US + 7, b"28th"),
    ]
    positions = [j.append(t, f) for t, f in records]
    j.close()

    names = [s.path.name for s in segments(tmp_path, FEED)]

    assert names == ["00000001-20261125.k2j", "00000002-20261126.k2j", "00000003-20261128.k2j"]
    assert [p.segment for p in positions] == [1, 2, 2, 3]
    assert read_all(tmp_path) == records
    assert [s.day for s in segments(tmp_path, FEED)][-1] == date(2026, 11, 28)


def test_each_open_starts_a_segment_after_the_committed_position(tmp_path: Path) -> None:
    j = journal(tmp_path)
    first = written(j, 3)
    j.close()
    empty = journal(tmp_path)  # a run that appended nothing
    empty.close()

    j = Journal(tmp_path, FEED, clock=lambda: T0)
    j.open(committed=JournalPosition(7, 123))
    p = j.append(T0 + 10, b"after restart")
    j.close()

    assert p.segment == 8
    assert [s.segment for s in segments(tmp_path, FEED)] == [1, 8]  # the empty 2 is gone
    assert read_all(tmp_path) == [*first, (T0 + 10, b"after restart")]


def test_second_writer_on_a_feed_is_refused(tmp_path: Path) -> None:
    j = journal(tmp_path)

    with pytest.raises(JournalError, match="another writer"):
        Journal(tmp_path, FEED).open()
    j.close()
    Journal(tmp_path, FEED).open()  # free again once closed


def test_append_refuses_oversized_frames_and_a_closed_journal(tmp_path: Path) -> None:
    j = journal(tmp_path, max_frame_bytes=100)

    with pytest.raises(ValueError, match="max_frame_bytes"):
        j.append(T0, b"x" * 101)
    j.close()
    with pytest.raises(JournalError, match="not open"):
        j.append(T0, b"x")


def test_buffer_is_written_to_the_os_once_it_exceeds_buffer_bytes(tmp_path: Path) -> None:
    j = journal(tmp_path, buffer_bytes=1_000)
    path = segments(tmp_path, FEED)[-1].path
    for i in range(50):
        j.append(T0 + i, frame(i))
        assert j.buffered_bytes < 1_000

    on_disk = path.stat().st_size
    assert on_disk + j.buffered_bytes == j.position.offset
    assert on_disk > 40 * (170 + RECORD_OVERHEAD)
    j.close()


def test_torn_tail_is_cut_on_open_and_appends_continue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    j = journal(tmp_path)
    records = written(j, 10)
    positions_end = j.position
    j.close()
    path = segments(tmp_path, FEED)[-1].path
    os.truncate(path, positions_end.offset - 50)  # the last record lost its last 50 bytes

    j = journal(tmp_path)
    more = written(j, 2, start_us=T0 + 100)
    j.close()

    assert j.truncations == 1
    assert j.truncated_bytes == 170 + RECORD_OVERHEAD - 50
    assert path.stat().st_size == positions_end.offset - (170 + RECORD_OVERHEAD)
    assert "torn tail" in caplog.text
    assert read_all(tmp_path) == records[:9] + more


def test_zero_filled_tail_is_cut_on_open(tmp_path: Path) -> None:
    j = journal(tmp_path)
    records = written(j, 5)
    end = j.position.offset
    j.close()
    path = segments(tmp_path, FEED)[-1].path
    with path.open("ab") as f:  # a crash after the size grew but before the data landed
        f.write(bytes(8192))

    j = journal(tmp_path)
    j.close()

    assert (j.truncations, j.truncated_bytes) == (1, 8192)
    assert path.stat().st_size == end
    assert read_all(tmp_path) == records


def test_flipped_byte_in_the_last_record_truncates_to_the_one_before(tmp_path: Path) -> None:
    j = journal(tmp_path)
    records = written(j, 10)
    before_last = j.position.offset - (170 + RECORD_OVERHEAD)
    j.close()
    path = segments(tmp_path, FEED)[-1].path
    flip(path, before_last + RECORD_OVERHEAD + 85)

    j = journal(tmp_path)
    j.close()

    assert (j.truncations, j.corrupt_segments) == (1, 0)
    assert j.truncated_bytes == 170 + RECORD_OVERHEAD
    assert path.stat().st_size == before_last
    assert read_all(tmp_path) == records[:9]


@pytest.mark.parametrize("where", ["payload", "length"])
def test_mid_segment_corruption_stops_that_segment_and_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    # Choice: scan does not guess record boundaries after bad bytes; it stops the segment,
    # warns, and goes on with the next one. open() leaves the segment alone (no valid
    # record is thrown away); inspect() shows where valid records resume.
    j = journal(tmp_path)
    records = written(j, 10)
    j.close()
    seg = segments(tmp_path, FEED)[-1]
    rec = 170 + RECORD_OVERHEAD
    fifth = 31 + 4 * rec  # header of "binance" is 31 bytes
    # A payload byte, or the top bit of the length's third byte (a length past the end).
    flip(seg.path, fifth + (RECORD_OVERHEAD + 60 if where == "payload" else 2))

    j = journal(tmp_path)
    after = written(j, 2, start_us=T0 + 100)
    j.close()
    got = read_all(tmp_path)
    report = inspect(seg.path)

    assert (j.truncations, j.corrupt_segments) == (0, 1)
    assert seg.path.stat().st_size == seg.size
    assert got == records[:4] + after
    assert "valid records resume at" in caplog.text
    assert report.records == 9
    assert report.replayable_records == 4
    assert report.replayable_end == fifth
    [problem] = report.problems
    assert (problem.offset, problem.kind, problem.resumes_at) == (
        fifth,
        "corrupt_record",
        fifth + rec,
    )
    assert "corrupt_record" in format_report(report)
    assert not report.ok


def test_zeroed_page_mid_segment_is_corruption_not_a_tail(tmp_path: Path) -> None:
    j = journal(tmp_path)
    records = written(j, 8, size=256)  # a length of 256 starts with a zero byte
    j.close()
    seg = segments(tmp_path, FEED)[-1]
    rec = 256 + RECORD_OVERHEAD
    third, fifth = 31 + 2 * rec, 31 + 4 * rec
    with seg.path.open("r+b") as f:  # two records lost to an unwritten page
        f.seek(third)
        f.write(bytes(2 * rec))

    j = journal(tmp_path)
    j.close()
    report = inspect(seg.path)

    assert (j.truncations, j.corrupt_segments) == (0, 1)
    assert [(p.offset, p.resumes_at) for p in report.problems] == [(third, fifth)]
    assert report.records == 6
    assert read_all(tmp_path) == records[:2]


def test_retention_by_age_keeps_uncommitted_and_active_segments(tmp_path: Path) -> None:
    now = T0 + 30 * DAY_US
    j = journal(tmp_path, now_us=now, segment_bytes=4096)
    positions = [j.append(now + i, frame(i, 1_000)) for i in range(20)]  # 4 records a segment
    j.flush()
    files = segments(tmp_path, FEED)
    assert len(files) == 5
    for age_days, seg in zip([9, 8, 7, 6, 5], files, strict=True):
        t = now / 1e6 - age_days * 86_400
        os.utime(seg.path, (t, t))
    committed = positions[9]  # the third segment has records after it

    assert j.enforce_retention(7.5 * 86_400, None, keep_after=None) == []
    deleted = j.enforce_retention(5 * 86_400, None, keep_after=committed)

    assert [s.segment for s in deleted] == [1, 2]
    assert [s.segment for s in segments(tmp_path, FEED)] == [3, 4, 5]
    assert read_all(tmp_path, after=committed) == [
        (now + i, frame(i, 1_000)) for i in range(10, 20)
    ]
    everything = j.enforce_retention(0.0, None, keep_after=j.position)
    assert [s.segment for s in everything] == [3, 4]  # never the active segment
    j.close()


def test_retention_by_total_size_deletes_oldest_first(tmp_path: Path) -> None:
    j = journal(tmp_path, segment_bytes=4096)
    for i in range(20):
        j.append(T0 + i, frame(i, 1_000))
    j.flush()
    sizes = [s.size for s in segments(tmp_path, FEED)]

    deleted = j.enforce_retention(None, sum(sizes[2:]), keep_after=j.position)

    assert [s.segment for s in deleted] == [1, 2]
    assert sum(s.size for s in segments(tmp_path, FEED)) == sum(sizes[2:])
    j.close()


async def test_syncer_fsyncs_every_interval_until_cancelled(tmp_path: Path) -> None:
    j = journal(tmp_path, fsync_interval=0.02)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run_syncer)
        written(j, 100)
        target = j.position
        with anyio.fail_after(5):
            while j.synced_position < target:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    j.close()

    assert j.fsyncs >= 1
    assert j.last_fsync_seconds > 0
    assert j.synced_position == target
    assert segments(tmp_path, FEED)[-1].size == target.offset


def test_last_and_first_records_around_a_downtime(tmp_path: Path) -> None:
    j = journal(tmp_path)
    written(j, 5)
    j.close()
    assert first_record_after(tmp_path, FEED, JournalPosition(0, 0)) is not None
    last = last_record(tmp_path, FEED)
    assert last is not None
    down_since = last[1]

    j = journal(tmp_path)  # restarted: its segment is empty until the first frame
    assert last_record(tmp_path, FEED) == last
    p = j.append(T0 + 60_000_000, b"first after the outage")
    j.close()

    assert last == (JournalPosition(1, 31 + 5 * (170 + RECORD_OVERHEAD)), T0 + 4)
    assert first_record_after(tmp_path, FEED, last[0]) == (p, T0 + 60_000_000)
    assert first_record_after(tmp_path, FEED, received_after_us=down_since) == (p, T0 + 60_000_000)
    assert first_record_after(tmp_path, FEED, p) is None


def test_inspect_reports_a_clean_segment(tmp_path: Path) -> None:
    j = journal(tmp_path)
    records = written(j, 25)
    j.close()
    seg = segments(tmp_path, FEED)[0]

    report = inspect(seg.path)
    text = format_report(report)

    assert report.ok
    assert (report.segment, report.day) == (1, date(2026, 11, 25))
    assert report.header is not None and report.header.feed == FEED
    assert report.size == seg.size == 31 + 25 * (170 + RECORD_OVERHEAD)
    assert (report.records, report.replayable_records) == (25, 25)
    assert report.frame_bytes == 25 * 170
    assert (report.first_received_us, report.last_received_us) == (records[0][0], records[-1][0])
    assert "status    OK" in text
    assert "2026-11-25T12:00:00.000024Z" in text


def test_inspect_reports_a_bad_header_and_scan_skips_the_segment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    j = journal(tmp_path)
    written(j, 3)
    j.close()
    seg = segments(tmp_path, FEED)[0]
    flip(seg.path, 1)  # the magic

    report = inspect(seg.path)

    assert [(p.offset, p.kind) for p in report.problems] == [(0, "bad_header")]
    assert "bad magic" in format_report(report)
    assert read_all(tmp_path) == []
    assert "skipped" in caplog.text


def test_scan_of_a_missing_journal_is_empty(tmp_path: Path) -> None:
    assert read_all(tmp_path) == []
    assert last_record(tmp_path, FEED) is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 900), min_size=1, max_size=25),
    cut=st.floats(0.0, 1.0),
)
def test_recovery_after_any_truncation_is_a_prefix(sizes: list[int], cut: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        j = journal(directory, segment_bytes=4096)
        records = [(T0 + i, os.urandom(n)) for i, n in enumerate(sizes)]
        ends = [j.append(t, f) for t, f in records]
        j.close()
        newest = segments(directory, FEED)[-1]
        keep = int(newest.size * cut)
        os.truncate(newest.path, keep)

        j = journal(directory, segment_bytes=4096)
        j.append(T0 + 1_000, b"after")
        j.close()
        got = read_all(directory)

    survivors = [r for r, p in zip(records, ends, strict=True)
                 if p.segment < newest.segment or p.offset <= keep]  # fmt: skip
    assert got == [*survivors, (T0 + 1_000, b"after")]
