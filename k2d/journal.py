"""The capture journal: every raw WebSocket frame, CRC-framed, appended before it is parsed.

In embedded mode this is the tickerplant log: on start the daemon replays the frames after
the `k2.log_position` of the last Iceberg commit. It is also the raw archive: a parser fix
can re-derive rows from it. One writer per feed, one directory per feed:

    <dir>/<feed>/00000042-20261125.k2j     segment 42, opened for UTC day 2026-11-25
    <dir>/<feed>/.lock                     flock held by the one writer

A segment is a header, then records; all integers little-endian:

    header  magic "K2J1" | version u16 (=1) | feed name length u16 | created_us i64
            | max_frame_bytes u32 | feed name (UTF-8) | crc32 u32 of everything before it
    record  length u32 (payload bytes) | crc32 u32 of the next 8+length bytes
            | received_us i64 | payload (the frame exactly as received)

The CRC is zlib.crc32. A position is `(segment, offset)` just after a record, so positions
are totally ordered and `scan(after=p)` resumes at the next record. Segments rotate when the
next record would pass `segment_bytes`, when a record's UTC day is later than the segment's,
and at every `open()`, so that records appended after a crash are numbered after any
committed position even if the unsynced tail behind it was lost.

Damage handling: `open()` checks the newest segment. A torn or corrupt tail (no valid record
after the bad bytes) is truncated to the last valid record. Bad bytes followed by a valid
record (found by trying every later offset: a length within max_frame_bytes and a matching
CRC) are mid-segment corruption: the segment is left as it is, as evidence. `scan()`
stops reading a segment at its first bad record, with a warning, and goes on with the next
segment: lengths after a bad record cannot be trusted, so the records behind it are not
replayed (the SequenceTracker sees the hole as a gap); `inspect()` reports where they are.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import re
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, NamedTuple

import anyio
import anyio.to_thread

from k2d import failpoints

__all__ = [
    "MAGIC",
    "MAX_FRAME_LIMIT",
    "RECORD_OVERHEAD",
    "VERSION",
    "Corruption",
    "InspectReport",
    "Journal",
    "JournalError",
    "JournalOptions",
    "JournalPosition",
    "SegmentFile",
    "SegmentHeader",
    "first_record_after",
    "format_report",
    "inspect",
    "last_record",
    "scan",
    "segment_name",
    "segments",
]

log = logging.getLogger(__name__)

MAGIC = b"K2J1"
VERSION = 1
SUFFIX = ".k2j"
RECORD_OVERHEAD = 16
# Lengths stay below 2**24: a valid length's top byte is zero, which resync relies on.
MAX_FRAME_LIMIT = (1 << 24) - 1

_HEAD = struct.Struct("<4sHHqI")  # magic, version, name length, created_us, max_frame_bytes
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_LEN_CRC = struct.Struct("<II")
_RECORD = struct.Struct("<IIq")
_DAY_US = 86_400_000_000
_MAX_US = 253_402_300_800_000_000  # 10000-01-01: file names have four-digit years
_EPOCH = date(1970, 1, 1)
_CHUNK = 4 << 20
_MAX_RETIRED = 8
_ZERO_HEADER = bytes(RECORD_OVERHEAD)
_NONZERO = re.compile(rb"[^\x00]")
_FILE_NAME = re.compile(r"^(\d{8,})-(\d{8})\.k2j$")
_FEED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_new_tuple = tuple.__new__


def _now_us() -> int:
    return time.time_ns() // 1_000


class JournalError(Exception):
    """The journal cannot be used: locked by another writer, closed, or a write failed."""


class JournalPosition(NamedTuple):
    """Just after one record: (segment number, byte offset). Ordered like a tuple."""

    segment: int
    offset: int

    def to_json(self) -> dict[str, int]:
        return {"segment": self.segment, "offset": self.offset}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> JournalPosition:
        segment, offset = doc.get("segment"), doc.get("offset")
        # type() rather than isinstance(): True is not a segment number.
        if type(segment) is not int or type(offset) is not int or segment < 0 or offset < 0:
            raise ValueError(f"not a journal position: {dict(doc)!r}")
        return cls(segment, offset)


def _position(segment: int, offset: int) -> JournalPosition:
    # tuple.__new__ directly: half the cost of the generated NamedTuple constructor.
    return _new_tuple(JournalPosition, (segment, offset))


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalOptions:
    """How a Journal writes; the lead maps `[journal]` in config.toml onto this."""

    segment_bytes: int = 64 << 20
    # Appends are buffered in memory and written to the OS once this many bytes are waiting.
    buffer_bytes: int = 1 << 20
    # Group fsync: run_syncer() writes and fsyncs every this many seconds.
    fsync_interval: float = 0.2
    max_frame_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not 0 < self.max_frame_bytes <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame_bytes must be in 1..{MAX_FRAME_LIMIT}")
        if self.segment_bytes < 4096:
            raise ValueError("segment_bytes must be at least 4096")
        if self.buffer_bytes <= 0:
            raise ValueError("buffer_bytes must be positive")
        if not self.fsync_interval > 0:
            raise ValueError("fsync_interval must be positive")


@dataclass(frozen=True, slots=True)
class SegmentFile:
    """One segment file on disk, as listed by `segments()`."""

    segment: int
    day: date
    path: Path
    size: int
    mtime_s: float


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    version: int
    feed: str
    created_us: int
    max_frame_bytes: int
    length: int  # header bytes: the first record starts here


class _Stop(NamedTuple):
    """Where reading a segment stopped before its end, and why."""

    offset: int
    reason: str


def _day_of(received_us: int) -> int:
    return received_us // _DAY_US


def _date_of(day: int) -> date:
    return _EPOCH + timedelta(days=day)


def segment_name(segment: int, day: date) -> str:
    """`00000042-20261125.k2j`: the segment number, then the UTC day it was opened for."""
    return f"{segment:08d}-{day.year:04d}{day.month:02d}{day.day:02d}{SUFFIX}"


def _parse_name(name: str) -> tuple[int, date] | None:
    m = _FILE_NAME.match(name)
    if m is None:
        return None
    d = m.group(2)
    try:
        return int(m.group(1)), date(int(d[:4]), int(d[4:6]), int(d[6:]))
    except ValueError:
        return None


def _check_feed(feed: str) -> None:
    if not _FEED_NAME.match(feed):
        raise ValueError(f"feed name {feed!r} must match {_FEED_NAME.pattern}")


def segments(directory: Path | str, feed: str) -> list[SegmentFile]:
    """The segment files of one feed, oldest (lowest number) first."""
    _check_feed(feed)
    out: list[SegmentFile] = []
    try:
        entries = list(os.scandir(Path(directory) / feed))
    except FileNotFoundError:
        return out
    for entry in entries:
        parsed = _parse_name(entry.name)
        if parsed is None or not entry.is_file():
            continue
        try:
            st = entry.stat()
        except FileNotFoundError:  # removed by retention meanwhile
            continue
        out.append(SegmentFile(parsed[0], parsed[1], Path(entry.path), st.st_size, st.st_mtime))
    out.sort(key=lambda s: s.segment)
    return out


def _encode_header(feed: str, created_us: int, max_frame_bytes: int) -> bytes:
    name = feed.encode()
    head = _HEAD.pack(MAGIC, VERSION, len(name), created_us, max_frame_bytes) + name
    return head + _U32.pack(zlib.crc32(head))


def _header_length(feed: str) -> int:
    return _HEAD.size + len(feed.encode()) + _U32.size


def _read_header(f: BinaryIO) -> SegmentHeader | str:
    """The segment header, or why it is not one."""
    f.seek(0)
    head = f.read(_HEAD.size)
    if len(head) < _HEAD.size:
        return f"header torn: {len(head)} of {_HEAD.size} bytes"
    magic, version, name_len, created_us, max_frame = _HEAD.unpack(head)
    if magic != MAGIC:
        return f"bad magic {magic!r}"
    rest = f.read(name_len + _U32.size)
    if len(rest) < name_len + _U32.size:
        return "header torn inside the feed name"
    (crc,) = _U32.unpack_from(rest, name_len)
    if zlib.crc32(head + rest[:name_len]) != crc:
        return "header crc mismatch"
    if version != VERSION:
        return f"unsupported version {version}"
    if not 0 < max_frame <= MAX_FRAME_LIMIT:
        return f"bad max_frame_bytes {max_frame}"
    try:
        feed = rest[:name_len].decode()
    except UnicodeDecodeError:
        return "feed name is not UTF-8"
    return SegmentHeader(version, feed, created_us, max_frame, _HEAD.size + name_len + _U32.size)


def _records(
    path: Path, segment: int, start: int, limit: int, max_frame: int, stops: list[_Stop]
) -> Iterator[tuple[JournalPosition, int, bytes]]:
    """Valid records from file offset `start` that end at or before `limit`.

    Ends cleanly at the end of the file or at `limit`; at bad bytes it ends and appends
    where and why to `stops`. This loop is the replay speed: one unpack, one crc and two
    slices per record.
    """
    try:
        f = path.open("rb")
    except FileNotFoundError:  # deleted by retention since it was listed
        return
    crc32 = zlib.crc32
    unpack = _RECORD.unpack_from
    new = _new_tuple
    base = start  # file offset of data[0]
    want = _CHUNK
    with f:
        while True:
            # Re-reading the partial record at a chunk's end is cheaper than joining chunks.
            f.seek(base)
            data = f.read(want)
            n = len(data)
            eof = n < want
            want = _CHUNK
            off = 0
            rel_limit = limit - base
            while off + 16 <= n:
                length, crc, received_us = unpack(data, off)
                end = off + 16 + length
                if end > n:
                    if length > max_frame:
                        stops.append(_Stop(base + off, _too_long(length, max_frame)))
                        return
                    want = max(_CHUNK, end - off)
                    break
                if crc32(data[off + 8 : end]) != crc or end > rel_limit:
                    if end <= rel_limit:
                        reason = (
                            _too_long(length, max_frame) if length > max_frame else "crc mismatch"
                        )
                        stops.append(_Stop(base + off, reason))
                    return
                yield new(JournalPosition, (segment, base + end)), received_us, data[off + 16 : end]
                off = end
            if eof:
                if off < n:
                    stops.append(_Stop(base + off, f"incomplete record, {n - off} bytes"))
                return
            base += off


def _too_long(length: int, max_frame: int) -> str:
    return f"length {length} above max_frame_bytes {max_frame}"


def _find_record(data: bytes, hi: int, max_frame: int) -> int:
    """Index of the first valid record starting before `hi` in `data`, or -1."""
    n = len(data)
    c = 0
    while c < hi:
        # Only where a length's top byte is zero can a valid record start.
        z = data.find(b"\x00", c + 3, hi + 3)
        if z < 0:
            return -1
        c = z - 3
        if data[c : c + 16] == _ZERO_HEADER:
            # Zeroed bytes (an unwritten page) cannot hold a record header: jump past them.
            m = _NONZERO.search(data, c)
            if m is None:
                return -1
            c = max(c + 1, m.start() - 15)
            continue
        if c + 16 <= n:
            length, crc = _LEN_CRC.unpack_from(data, c)
            end = c + 16 + length
            if length <= max_frame and end <= n and zlib.crc32(data[c + 8 : end]) == crc:
                return c
        c += 1
    return -1


def _next_valid(f: BinaryIO, start: int, max_frame: int) -> int | None:
    """File offset of the first valid record at or after `start`, or None (a tail)."""
    span = RECORD_OVERHEAD + max_frame
    pos = start
    while True:
        f.seek(pos)
        data = f.read(_CHUNK + span)
        at_end = len(data) < _CHUNK + span
        c = _find_record(data, len(data) if at_end else _CHUNK, max_frame)
        if c >= 0:
            return pos + c
        if at_end:
            return None
        pos += _CHUNK


def _header_of(path: Path) -> SegmentHeader | str | None:
    """The header of a segment file, why it is not one, or None if the file is gone."""
    try:
        with path.open("rb") as f:
            return _read_header(f)
    except FileNotFoundError:
        return None


def _segment_records(
    seg: SegmentFile, feed: str, after: int, limit: int
) -> Iterator[tuple[JournalPosition, int, bytes]]:
    """Records of one segment ending after offset `after` and at or before `limit`."""
    header = _header_of(seg.path)
    if header is None:
        return iter(())
    if isinstance(header, str):
        log.warning("journal segment %s skipped: %s", seg.path, header)
        return iter(())
    if header.feed != feed:
        log.warning("journal segment %s skipped: it belongs to feed %r", seg.path, header.feed)
        return iter(())
    start = max(after, header.length)
    stops: list[_Stop] = []
    # A chain, not a generator: one Python frame per record less on the replay path.
    return itertools.chain(
        _records(seg.path, seg.segment, start, limit, header.max_frame_bytes, stops),
        _after_stop(seg, header, after, start, limit, stops),
    )


def _after_stop(
    seg: SegmentFile, header: SegmentHeader, after: int, start: int, limit: int, stops: list[_Stop]
) -> Iterator[tuple[JournalPosition, int, bytes]]:
    """Runs once a segment's records end: explains why they ended before its end."""
    if not stops:
        return
    if stops[0].offset == start > header.length:
        # `after` is not where a record starts (a file replaced under a committed
        # position?): read from the top and skip what ends at or before it.
        stops.clear()
        for record in _records(
            seg.path, seg.segment, header.length, limit, header.max_frame_bytes, stops
        ):
            if record[0].offset > after:
                yield record
        if not stops:
            return
    stop = stops[0]
    try:
        with seg.path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            resume = _next_valid(f, stop.offset + 1, header.max_frame_bytes)
    except FileNotFoundError:
        return
    if resume is None:
        log.warning(
            "journal %s: torn tail at offset %d (%s), %d bytes not read",
            seg.path,
            stop.offset,
            stop.reason,
            size - stop.offset,
        )
    else:
        log.warning(
            "journal %s: corrupt record at offset %d (%s); valid records resume at %d "
            "but the rest of this segment is skipped (see `k2d journal inspect`)",
            seg.path,
            stop.offset,
            stop.reason,
            resume,
        )


def scan(
    directory: Path | str,
    feed: str,
    after: JournalPosition | None = None,
    until: JournalPosition | None = None,
) -> Iterator[tuple[JournalPosition, int, bytes]]:
    """(position after record, received_us, frame) for each valid record after `after`.

    Segments are read in order; each stops at its first bad record, with a warning. Pass
    `until=journal.position` while a writer is appending, so that a record still being
    written is not mistaken for a torn tail.
    """
    _check_feed(feed)
    return itertools.chain.from_iterable(_scan_plan(directory, feed, after, until))


def _scan_plan(
    directory: Path | str, feed: str, after: JournalPosition | None, until: JournalPosition | None
) -> Iterator[Iterator[tuple[JournalPosition, int, bytes]]]:
    for seg in segments(directory, feed):
        if after is not None and seg.segment < after.segment:
            continue
        if until is not None and seg.segment > until.segment:
            return
        skip = after.offset if after is not None and seg.segment == after.segment else 0
        limit = until.offset if until is not None and seg.segment == until.segment else sys.maxsize
        yield _segment_records(seg, feed, skip, limit)


def last_record(directory: Path | str, feed: str) -> tuple[JournalPosition, int] | None:
    """(position, received_us) of the newest valid record: the last frame before a downtime."""
    for seg in reversed(segments(directory, feed)):
        last: tuple[JournalPosition, int] | None = None
        for pos, received_us, _ in _segment_records(seg, feed, 0, sys.maxsize):
            last = (pos, received_us)
        if last is not None:
            return last
    return None


def first_record_after(
    directory: Path | str,
    feed: str,
    after: JournalPosition | None = None,
    *,
    received_after_us: int | None = None,
) -> tuple[JournalPosition, int] | None:
    """(position, received_us) of the first record after `after` received after the given
    time: the first frame after a downtime."""
    for seg in segments(directory, feed):
        if after is not None and seg.segment < after.segment:
            continue
        # Every record of a segment was received before the end of its file name's day.
        if (
            received_after_us is not None
            and ((seg.day - _EPOCH).days + 1) * _DAY_US <= received_after_us
        ):
            continue
        skip = after.offset if after is not None and seg.segment == after.segment else 0
        for pos, received_us, _ in _segment_records(seg, feed, skip, sys.maxsize):
            if received_after_us is None or received_us > received_after_us:
                return pos, received_us
    return None


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _SyncRound(NamedTuple):
    fd: int
    position: JournalPosition
    retired: list[int]
    sync_dir: bool


class Journal:
    """The one writer of a feed's journal. Append from one thread (the event loop);
    `run_syncer()` fsyncs in a worker thread."""

    def __init__(
        self,
        directory: Path | str,
        feed: str,
        options: JournalOptions | None = None,
        *,
        clock: Callable[[], int] = _now_us,
    ) -> None:
        _check_feed(feed)
        self.directory = Path(directory)
        self.feed = feed
        self.path = self.directory / feed
        self.options = options or JournalOptions()
        self._clock = clock
        self._max_frame = self.options.max_frame_bytes
        self._buffer_bytes = self.options.buffer_bytes
        self._fd = -1
        self._lock_fd = -1
        self._segment = 0
        self._day = 0
        self._day_end_us = 0
        self._seg_limit = 0
        self._header_len = 0
        self._written = 0  # bytes of the active segment handed to the OS
        self._end = 0  # ...plus those still buffered: the position after the last record
        self._buf = bytearray()
        self._retired: list[int] = []
        self._dir_dirty = False
        self._synced = _position(0, 0)
        self._sync_lock = threading.Lock()
        self.bytes_written = 0
        self.records_written = 0
        self.fsyncs = 0
        self.last_fsync_seconds = 0.0
        self.truncations = 0
        self.truncated_bytes = 0
        self.corrupt_segments = 0
        self.segments_created = 0

    @property
    def position(self) -> JournalPosition:
        """After the last appended record (or the header of a new segment)."""
        return _position(self._segment, self._end)

    @property
    def synced_position(self) -> JournalPosition:
        """Everything up to here has been fsynced."""
        return self._synced

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def open(self, *, committed: JournalPosition | None = None) -> None:
        """Lock the feed, repair the newest segment and start a new one.

        New records are numbered after `committed` (the last position in Iceberg) and after
        every existing segment, even if the segments behind them were lost.
        """
        if self._fd >= 0:
            raise JournalError(f"journal {self.path} is already open")
        self.path.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            existing = segments(self.directory, self.feed)
            empty = self._recover(existing[-1]) if existing else False
            number = max([s.segment for s in existing] + [committed.segment if committed else 0])
            now = self._clock()
            self._create(number + 1, _day_of(now), now)
            _fsync_dir(self.path)
            self._dir_dirty = False
            if empty:
                # A previous run's segment with no records in it: nothing to keep.
                existing[-1].path.unlink(missing_ok=True)
        except BaseException:
            self._release()
            raise
        self._synced = self.position

    def _take_lock(self) -> None:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(f"journal {self.path} is open in another writer") from None
        self._lock_fd = fd

    def _recover(self, seg: SegmentFile) -> bool:
        """Truncate a torn tail of the newest segment; True if it holds no record at all."""
        with seg.path.open("r+b") as f:
            header = _read_header(f)
            if isinstance(header, str):
                if seg.size <= _header_length(self.feed):
                    # Torn while being created: too short to hold any record.
                    log.warning("journal %s: %s; removing the empty segment", seg.path, header)
                    self._count_truncation(seg.size)
                    return True
                log.warning("journal %s: %s; left as it is", seg.path, header)
                self.corrupt_segments += 1
                return False
            stops: list[_Stop] = []
            records = sum(
                1
                for _ in _records(
                    seg.path, seg.segment, header.length, sys.maxsize, header.max_frame_bytes, stops
                )
            )
            if not stops:
                return records == 0
            stop = stops[0]
            resume = _next_valid(f, stop.offset + 1, header.max_frame_bytes)
            if resume is not None:
                log.warning(
                    "journal %s: corrupt record at offset %d (%s), valid records resume at %d; "
                    "segment left as it is",
                    seg.path,
                    stop.offset,
                    stop.reason,
                    resume,
                )
                self.corrupt_segments += 1
                return False
            cut = seg.size - stop.offset
            log.warning(
                "journal %s: torn tail at offset %d (%s); truncated %d bytes",
                seg.path,
                stop.offset,
                stop.reason,
                cut,
            )
            f.truncate(stop.offset)
            f.flush()
            os.fsync(f.fileno())
            self._count_truncation(cut)
            return records == 0

    def _count_truncation(self, nbytes: int) -> None:
        self.truncations += 1
        self.truncated_bytes += nbytes

    def _create(self, number: int, day: int, created_us: int) -> None:
        path = self.path / segment_name(number, _date_of(day))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        header = _encode_header(self.feed, created_us, self._max_frame)
        try:
            _write_all(fd, header)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._segment = number
        self._day = day
        self._day_end_us = (day + 1) * _DAY_US
        self._seg_limit = self.options.segment_bytes
        self._header_len = self._written = self._end = len(header)
        self._dir_dirty = True
        self.bytes_written += len(header)
        self.segments_created += 1

    def append(self, received_us: int, frame: bytes) -> JournalPosition:
        """Buffer one frame; returns the position just after it."""
        n = len(frame)
        if n > self._max_frame or self._fd < 0:
            self._refuse(n)
        if received_us >= self._day_end_us or self._end + 16 + n > self._seg_limit:
            self._rotate_for(received_us)
        ts = _I64.pack(received_us)
        buf = self._buf
        buf += _LEN_CRC.pack(n, zlib.crc32(frame, zlib.crc32(ts)))
        buf += ts
        buf += frame
        self._end += 16 + n
        self.records_written += 1
        if len(buf) >= self._buffer_bytes:
            self.flush()
        return _new_tuple(JournalPosition, (self._segment, self._end))

    def append_many(self, records: Iterable[tuple[int, bytes]]) -> JournalPosition:
        """Buffer (received_us, frame) pairs in order; returns the position after the last."""
        append = self.append
        for received_us, frame in records:
            append(received_us, frame)
        return self.position

    def _refuse(self, n: int) -> None:
        if self._fd < 0:
            raise JournalError(f"journal {self.path} is not open")
        raise ValueError(f"frame of {n} bytes is above max_frame_bytes {self._max_frame}")

    def _rotate_for(self, received_us: int) -> None:
        if received_us >= self._day_end_us:
            if received_us >= _MAX_US:
                raise ValueError(f"received_us {received_us} is after the year 9999")
            self._rotate(_day_of(received_us))
        elif self._end > self._header_len:
            # Size: a segment always takes its first record, however large.
            self._rotate(self._day)

    def _rotate(self, day: int) -> None:
        self.flush()
        self._retired.append(self._fd)
        self._fd = -1
        if len(self._retired) > _MAX_RETIRED:
            # Nobody is syncing: do not hold file descriptors without bound.
            with self._sync_lock:
                old = self._retired.pop(0)
                os.fsync(old)
                os.close(old)
                self.fsyncs += 1
        self._create(self._segment + 1, day, self._clock())

    def flush(self) -> None:
        """Hand buffered records to the OS (no fsync)."""
        buf = self._buf
        if not buf:
            return
        self._buf = bytearray()
        try:
            failpoints.hit("journal.write")
            _write_all(self._fd, buf)
        except OSError as exc:
            # The file no longer matches the positions handed out: stop here; open()
            # after a restart truncates whatever part of the batch did reach the file.
            self._release()
            raise JournalError(f"journal {self.path}: write failed: {exc}") from exc
        self._written += len(buf)
        self.bytes_written += len(buf)

    def _begin_sync(self) -> _SyncRound:
        self.flush()
        retired, self._retired = self._retired, []
        sync_dir, self._dir_dirty = self._dir_dirty, False
        return _SyncRound(self._fd, self.position, retired, sync_dir)

    def _fsync(self, job: _SyncRound) -> float:
        """fsync the files of a round (any thread); returns the seconds it took."""
        started = time.perf_counter()
        with self._sync_lock:
            for fd in job.retired:
                os.fsync(fd)
                os.close(fd)
            if job.fd >= 0:
                os.fsync(job.fd)
            if job.sync_dir:
                _fsync_dir(self.path)
        return time.perf_counter() - started

    def _end_sync(self, job: _SyncRound, seconds: float) -> None:
        self.fsyncs += 1
        self.last_fsync_seconds = seconds
        self._synced = max(self._synced, job.position)

    def sync(self) -> None:
        """Flush and fsync now, on this thread."""
        if self._fd < 0:
            raise JournalError(f"journal {self.path} is not open")
        job = self._begin_sync()
        self._end_sync(job, self._fsync(job))

    async def run_syncer(self, limiter: anyio.CapacityLimiter | None = None) -> None:
        """Group fsync: every `fsync_interval`, flush here and fsync in a worker thread
        (one of `limiter`'s, when given).

        Runs until cancelled or the journal is closed. Cancelling waits for a running fsync.
        """
        interval = self.options.fsync_interval
        while True:
            await anyio.sleep(interval)
            if self._fd < 0:
                return
            job = self._begin_sync()
            seconds = await anyio.to_thread.run_sync(self._fsync, job, limiter=limiter)
            self._end_sync(job, seconds)

    def enforce_retention(
        self,
        max_age_s: float | None,
        max_total_bytes: int | None,
        keep_after: JournalPosition | None,
    ) -> list[SegmentFile]:
        """Delete the oldest whole segments older than `max_age_s` (by last write) or beyond
        `max_total_bytes` in all; returns what was deleted.

        Never deletes the active segment, nor one holding a record after `keep_after` (the
        last committed position). With `keep_after=None` nothing was committed yet, so every
        record may still be replayed and nothing is deleted. None limits do not apply.
        """
        if self._fd < 0:
            raise JournalError(f"journal {self.path} is not open")
        if keep_after is None:
            return []
        files = segments(self.directory, self.feed)
        total = sum(s.size for s in files)
        now_s = self._clock() / 1e6
        deleted: list[SegmentFile] = []
        for seg in files:
            if seg.segment >= self._segment:
                break
            if seg.segment > keep_after.segment or (
                seg.segment == keep_after.segment and seg.size > keep_after.offset
            ):
                break
            too_old = max_age_s is not None and seg.mtime_s < now_s - max_age_s
            too_big = max_total_bytes is not None and total > max_total_bytes
            if not (too_old or too_big):
                break
            seg.path.unlink(missing_ok=True)
            total -= seg.size
            deleted.append(seg)
            log.info(
                "journal %s: deleted segment %s (%d bytes, %s)",
                self.path,
                seg.path.name,
                seg.size,
                "age" if too_old else "size",
            )
        return deleted

    def close(self) -> None:
        """Flush, fsync, close and unlock. Stop run_syncer() first."""
        if self._fd < 0:
            self._release()
            return
        try:
            self.sync()
        finally:
            self._release()

    def _release(self) -> None:
        with self._sync_lock:
            for fd in [*self._retired, self._fd, self._lock_fd]:
                if fd >= 0:
                    os.close(fd)
            self._retired = []
            self._fd = self._lock_fd = -1

    def __enter__(self) -> Journal:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Corruption:
    """Bad bytes in a segment. `resumes_at` is the next valid record; None for a tail."""

    offset: int
    kind: Literal["bad_header", "corrupt_record", "torn_tail"]
    detail: str
    resumes_at: int | None = None


@dataclass(frozen=True, slots=True)
class InspectReport:
    path: Path
    size: int
    segment: int | None  # from the file name; None if it is not a segment name
    day: date | None
    header: SegmentHeader | None
    records: int  # every valid record found, also behind mid-segment corruption
    replayable_records: int  # those before the first problem: what scan() yields
    replayable_end: int  # offset after the last of them: where open() would truncate
    frame_bytes: int
    first_received_us: int | None
    last_received_us: int | None
    problems: tuple[Corruption, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def inspect(path: Path | str) -> InspectReport:
    """Read one segment file end to end and report its records and any damage."""
    path = Path(path)
    parsed = _parse_name(path.name)
    segment, day = parsed if parsed is not None else (None, None)
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = _read_header(f)
        if isinstance(header, str):
            return InspectReport(
                path,
                size,
                segment,
                day,
                None,
                0,
                0,
                0,
                0,
                None,
                None,
                (Corruption(0, "bad_header", header),),
            )
        problems: list[Corruption] = []
        records = frame_bytes = 0
        replayable: int | None = None
        end = header.length
        first_us: int | None = None
        last_us: int | None = None
        start = header.length
        while True:
            stops: list[_Stop] = []
            for pos, received_us, frame in _records(
                path, segment or 0, start, sys.maxsize, header.max_frame_bytes, stops
            ):
                records += 1
                frame_bytes += len(frame)
                if first_us is None:
                    first_us = received_us
                last_us = received_us
                if replayable is None:
                    end = pos.offset
            if not stops:
                break
            stop = stops[0]
            if replayable is None:
                replayable = records
            resume = _next_valid(f, stop.offset + 1, header.max_frame_bytes)
            kind: Literal["corrupt_record", "torn_tail"] = (
                "torn_tail" if resume is None else "corrupt_record"
            )
            problems.append(Corruption(stop.offset, kind, stop.reason, resume))
            if resume is None:
                break
            start = resume
    return InspectReport(
        path=path,
        size=size,
        segment=segment,
        day=day,
        header=header,
        records=records,
        replayable_records=records if replayable is None else replayable,
        replayable_end=end,
        frame_bytes=frame_bytes,
        first_received_us=first_us,
        last_received_us=last_us,
        problems=tuple(problems),
    )


def _iso(us: int | None) -> str:
    if us is None:
        return "-"
    try:
        return datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    except (OverflowError, ValueError, OSError):
        return f"{us} us"


def format_report(report: InspectReport) -> str:
    """The report as `k2d journal inspect PATH` prints it."""
    lines = [f"file      {report.path}"]
    if report.segment is not None and report.day is not None:
        lines.append(f"segment   {report.segment} (opened for {report.day.isoformat()} UTC)")
    h = report.header
    if h is not None:
        lines.append(
            f"feed      {h.feed} (format v{h.version}, created {_iso(h.created_us)}, "
            f"max frame {h.max_frame_bytes:,} B)"
        )
    lines.append(
        f"size      {report.size:,} bytes: {report.records:,} records, "
        f"{report.frame_bytes:,} frame bytes"
    )
    lines.append(
        f"replay    {report.replayable_records:,} records, up to offset {report.replayable_end:,}"
    )
    lines.append(f"received  {_iso(report.first_received_us)} .. {_iso(report.last_received_us)}")
    if not report.problems:
        lines.append("status    OK")
        return "\n".join(lines)
    lines.append(f"status    DAMAGED ({len(report.problems)} problem(s))")
    for p in report.problems:
        where = "" if p.resumes_at is None else f"; valid records resume at {p.resumes_at:,}"
        lines.append(f"  offset {p.offset:,}: {p.kind}: {p.detail}{where}")
    return "\n".join(lines)
