"""`k2d load asx`: vendor files -> market.trades, market.quotes, market.instruments.

A file is read a slice at a time and its rows written as Parquet as they come (memory
follows the slice, not the file), but committed whole, alone or with others of its kind,
and its sha256 goes into the commit's snapshot properties (`k2.batch_files`). A file whose
hash is in the table's history is skipped, so a load can be repeated, or resumed after a
crash, without a duplicate row. A load killed before a commit leaves data files that no
snapshot references: the Maintainer's orphan sweep deletes them (maintenance.orphan_file_age).

Batch commits carry no `k2.watermarks` / `k2.log_position`: Warehouse.k2_state() passes
over snapshots without them (as it does over compaction's), so a load running beside the
daemon leaves the daemon's resume position exactly as its own last flush wrote it. Copying
the live state onto batch commits instead would go stale whenever a conflict retry lets a
live flush land first, and a stale copy would send the daemon back in its log.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import itertools
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, TextIO

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.exceptions import CommitFailedException, TableAlreadyExistsError

# pyiceberg's write internals (Warehouse.append uses them too): rows are written as data
# files batch by batch, without the copy per partition that pyiceberg makes, and the data
# files of a group are committed later as one snapshot.
from pyiceberg.io.pyarrow import (
    _check_pyarrow_schema_compatible,
    bin_pack_arrow_table,
    pyarrow_to_schema,
    write_file,
)
from pyiceberg.manifest import DataFile
from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
from pyiceberg.table import DOWNCAST_NS_TIMESTAMP_TO_US_ON_WRITE, Table, TableProperties, WriteTask
from pyiceberg.table.snapshots import ancestors_of
from pyiceberg.utils.config import Config as IcebergConfig
from pyiceberg.utils.properties import property_as_int

from k2d.config import Config, ConfigError, load_config
from k2d.model import DeadLetter, now_us
from k2d.storage import (
    DEAD_LETTERS,
    INSTRUMENTS,
    QUOTES,
    REFERENCE_TABLES,
    TABLE_PROPERTIES,
    TABLES,
    TRADES,
    Warehouse,
    dead_letters_to_arrow,
    sorted_rows,
)
from k2d.venues import asx

__all__ = [
    "BATCH_COMPLETE",
    "BATCH_FILES",
    "BATCH_KIND",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "FileResult",
    "LoadError",
    "LoadOptions",
    "LoadSummary",
    "Progress",
    "add_arguments",
    "load_asx",
    "run_from_args",
]

# Snapshot properties of batch commits. On trades/quotes: {sha256: file} of the files whose
# rows the commit adds. On dead_letters: the same for the files whose dead letters it adds,
# their kind, and the files it completes (files with no good row at all).
BATCH_FILES = "k2.batch_files"
BATCH_KIND = "k2.batch_kind"
BATCH_COMPLETE = "k2.batch_complete"

EXIT_FAILED = 1
EXIT_USAGE = 2

Kind = Literal["trades", "quotes"]
Status = Literal["loaded", "skipped", "empty", "failed"]
_files_codec = msgspec.json.Decoder(dict[str, str])
_list_codec = msgspec.json.Decoder(list[str])
_encoder = msgspec.json.Encoder()


class LoadError(Exception):
    """The load cannot start: bad company_info, missing path, another load running."""


@dataclass(frozen=True)
class LoadOptions:
    """Limits of one load. Memory holds a slice being parsed, and rows waiting to be
    written or being written: of a large file up to twice write_rows, of small files up to
    about twice gather_rows; whatever the size of the files."""

    # A group of files is committed once it holds this many good rows (a file is never split)
    # or max_group_files files, which bounds the size of the commit's k2.batch_files.
    commit_rows: int = 1_000_000
    max_group_files: int = 256
    # Larger files are refused.
    max_file_bytes: int = 1024 * 1024 * 1024
    # A file is read this many bytes (whole lines) at a time.
    slice_bytes: int = 1024 * 1024
    # A file's rows are written as Parquet in batches of this many as they are read; what
    # is left of a file at its end is gathered with other files' and written once
    # gather_rows are there. A batch is one data file per day it covers: gathering many
    # small files keeps their data files few (measured on 60 files of 33K-67K rows over 20
    # days: 100K rows a batch made 633 data files and cost a quarter of the speed; 500K,
    # about 150 files).
    write_rows: int = 100_000
    gather_rows: int = 500_000
    # A file with more bad rows than this is refused whole (likely the wrong kind of file).
    max_bad_rows: int = 10_000
    # Conflict retries per commit (at least writer.commit_retries, with its backoff): a load
    # is in no hurry, and gives way to the daemon's flushes rather than fail.
    commit_retries: int = 30


@dataclass
class FileResult:
    """What happened to one input file."""

    path: Path
    kind: Kind
    status: Status
    rows: int = 0
    dead_letters: int = 0
    detail: str = ""


@dataclass
class LoadSummary:
    files: list[FileResult] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=lambda: {TRADES: 0, QUOTES: 0, DEAD_LETTERS: 0})
    instruments: int = 0
    instruments_changed: bool = False
    seconds: float = 0.0

    def count(self, status: Status) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    def format(self, max_listed: int = 20) -> str:
        """The human summary printed on stdout."""
        total = self.rows[TRADES] + self.rows[QUOTES]
        rate = total / self.seconds if self.seconds > 0 else 0.0
        changed = "upserted" if self.instruments_changed else "unchanged"
        out = [
            f"k2d load asx: {self.count('loaded')} files loaded, {self.count('skipped')} skipped "
            f"(already loaded), {self.count('empty')} empty, {self.count('failed')} failed",
            f"  trades        {self.rows[TRADES]:>12,} rows",
            f"  quotes        {self.rows[QUOTES]:>12,} rows",
            f"  dead_letters  {self.rows[DEAD_LETTERS]:>12,} rows",
            f"  instruments   {self.instruments:>12,} rows ({changed})",
            f"  time          {self.seconds:>12.2f} s ({rate:,.0f} rows/s)",
        ]
        for status in ("failed", "skipped"):
            listed = [f for f in self.files if f.status == status]
            for f in listed[:max_listed]:
                out.append(f"{status}: {f.kind} {f.path}: {f.detail}")
            if len(listed) > max_listed:
                out.append(f"{status}: ... and {len(listed) - max_listed} more")
        return "\n".join(out)


class Progress:
    """One status line on stderr: files done, rows, rows/s. Silent when not enabled."""

    def __init__(self, total_files: int, stream: TextIO | None, interval: float = 0.2) -> None:
        self.total = total_files
        self.stream = stream
        self.interval = interval
        self.files = 0
        self.rows = 0
        self._start = time.monotonic()
        self._shown = -interval

    def advance(self, *, files: int = 0, rows: int = 0) -> None:
        self.files += files
        self.rows += rows
        if time.monotonic() - self._shown >= self.interval:
            self._render()

    def close(self) -> None:
        if self.stream is not None:
            self._render()
            self.stream.write("\n")
            self.stream.flush()

    def _render(self) -> None:
        if self.stream is None:
            return
        now = self._shown = time.monotonic()
        rate = self.rows / max(now - self._start, 1e-9)
        self.stream.write(
            f"\r{self.files}/{self.total} files  {self.rows:,} rows  {rate:,.0f} rows/s  "
            f"{now - self._start:.0f} s   "
        )
        self.stream.flush()


# --- what is already loaded --------------------------------------------------------------


@dataclass
class _Registry:
    """Files recorded in the tables' snapshot histories, by kind and sha256."""

    rows: dict[str, dict[str, str]]
    dead_lettered: dict[str, set[str]]
    complete: dict[str, dict[str, str]]
    # True when expired snapshots cut a table's history: the registry may miss files.
    truncated: dict[str, bool]

    def loaded(self, kind: str, digest: str) -> str | None:
        """The file name a digest was loaded under, or None."""
        return self.rows[kind].get(digest) or self.complete[kind].get(digest)


def _lineage(table: Table) -> tuple[list[dict[str, str]], bool]:
    """Summary properties of the current snapshot and its ancestors; whether history is cut.

    Only the lineage counts: a snapshot rolled back is in the metadata but not the table.
    """
    props: list[dict[str, str]] = []
    oldest = None
    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        props.append(dict(snapshot.summary.additional_properties) if snapshot.summary else {})
        oldest = snapshot
    if oldest is None:
        return props, False
    # pyiceberg clears the parent id of a snapshot whose parent expired, but a table's first
    # snapshot is the only one with sequence number 1 (format v2).
    cut = (oldest.sequence_number or 0) > 1 or oldest.parent_snapshot_id is not None
    return props, cut


def _read_registry(wh: Warehouse) -> _Registry:
    reg = _Registry(
        rows={TRADES: {}, QUOTES: {}},
        dead_lettered={TRADES: set(), QUOTES: set()},
        complete={TRADES: {}, QUOTES: {}},
        truncated={},
    )
    for kind in (TRADES, QUOTES):
        props, reg.truncated[kind] = _lineage(wh.load_table(kind))
        for p in props:
            if BATCH_FILES in p:
                reg.rows[kind].update(_files_codec.decode(p[BATCH_FILES]))
    props, reg.truncated[DEAD_LETTERS] = _lineage(wh.load_table(DEAD_LETTERS))
    for p in props:
        batch_kind = p.get(BATCH_KIND, "")
        if batch_kind not in (TRADES, QUOTES):
            continue
        kind = batch_kind
        files = _files_codec.decode(p.get(BATCH_FILES, "{}"))
        reg.dead_lettered[kind].update(files)
        for digest in _list_codec.decode(p.get(BATCH_COMPLETE, "[]")):
            reg.complete[kind][digest] = files.get(digest) or digest
    return reg


def _in_table(wh: Warehouse, kind: str, rows: pa.Table) -> bool:
    """Whether the file's first row is already in the table (for a cut-short history)."""
    first = rows.slice(0, 1).to_pylist()[0]
    ts = first["timestamp"].isoformat()
    row_filter = (
        f"exchange = {_quoted(asx.EXCHANGE)} AND timestamp = {_quoted(ts)}"
        f" AND message_id = {_quoted(first['message_id'])}"
    )
    scan = wh.load_table(kind).scan(row_filter=row_filter, selected_fields=("message_id",))
    return bool(scan.to_arrow().num_rows)


def _quoted(value: str) -> str:
    """A string literal for a pyiceberg row filter."""
    return "'" + value.replace("'", "''") + "'"


# --- instruments ---------------------------------------------------------------------------


def _instruments_table(wh: Warehouse) -> Table:
    d = REFERENCE_TABLES[INSTRUMENTS]
    ident = (wh.namespace, INSTRUMENTS)
    if not wh.catalog.table_exists(ident):
        with contextlib.suppress(TableAlreadyExistsError):
            wh.catalog.create_table(
                ident,
                schema=d.schema,
                partition_spec=d.spec,
                sort_order=d.sort_order,
                properties=TABLE_PROPERTIES,
            )
    return wh.catalog.load_table(ident)


def upsert_instruments(wh: Warehouse, companies: Sequence[asx.Company]) -> bool:
    """Replace the rows of these company ids with `companies`; False when nothing changed."""
    new = asx.companies_to_arrow(companies)
    if new.num_rows == 0:
        return False
    ids = sorted(set(new.column("company_id").to_pylist()))
    listed = ", ".join(_quoted(i) for i in ids)
    row_filter = f"exchange = {_quoted(asx.EXCHANGE)} AND company_id IN ({listed})"
    sort = [(c, "ascending") for c in REFERENCE_TABLES[INSTRUMENTS].sort_columns]
    for attempt in range(5):
        table = _instruments_table(wh)
        current = table.scan(row_filter=row_filter).to_arrow()
        if current.cast(new.schema).sort_by(sort).equals(new):
            return False
        try:
            # One transaction: readers see the old rows or the new ones, never neither.
            with table.transaction() as tx:
                if current.num_rows:
                    tx.overwrite(new, overwrite_filter=row_filter)
                else:
                    tx.append(new)
            return True
        except CommitFailedException:
            if attempt == 4:
                raise
            time.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")


# --- the load ------------------------------------------------------------------------------


_Written = Future[list[DataFile]]


class _Batches:
    """Rows gathered for writing, handed out in batches of exactly `size` rows (slices of
    the gathered tables, not copies)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.tables: list[pa.Table] = []
        self.rows = 0

    def add(self, tables: Sequence[pa.Table]) -> None:
        self.tables.extend(tables)
        self.rows += sum(t.num_rows for t in tables)

    def full(self) -> list[pa.Table] | None:
        """The next `size` rows, if gathered."""
        if self.rows < self.size:
            return None
        out: list[pa.Table] = []
        need = self.size
        while need:
            first = self.tables[0]
            if first.num_rows <= need:
                out.append(self.tables.pop(0))
                need -= first.num_rows
            else:
                out.append(first.slice(0, need))
                self.tables[0] = first.slice(need)
                need = 0
        self.rows -= self.size
        return out

    def rest(self) -> list[pa.Table]:
        """Whatever is gathered, and gather anew."""
        out, self.tables, self.rows = self.tables, [], 0
        return out


@dataclass
class _File:
    """One file read to its end: its row count and its dead letters."""

    result: FileResult
    digest: str
    source: str
    rows: int
    dead_letters: list[DeadLetter]


@dataclass
class _Group:
    """Files committed together, and the data files their rows are written to."""

    kind: str
    gathered: _Batches
    files: list[_File] = field(default_factory=list)
    rows: int = 0
    written: list[_Written] = field(default_factory=list)


class _Writer:
    """Sorts and writes rows as Parquet data files, and commits groups, on one thread beside
    the reading. One batch of rows is written at a time, none waits in a queue."""

    def __init__(self, wh: Warehouse, pool: ThreadPoolExecutor) -> None:
        self.wh = wh
        self._pool = pool
        self._tables: dict[str, Table] = {}
        self._last: _Written | None = None

    def write(self, kind: str, tables: list[pa.Table]) -> _Written:
        """Write `tables` (the caller lets go of them) as data files of table `kind`."""
        if self._last is not None:
            # The reader waits here while the batch before is written.
            _wait_quietly(self._last)
        table = self._tables.get(kind)
        if table is None:
            table = self._tables[kind] = self.wh.load_table(kind)
        self._last = self._pool.submit(_write_files, table, tables)
        return self._last

    def discard(self, kind: str, written: list[_Written]) -> None:
        """Delete the data files of a file that is not to be committed after all."""
        if written:
            self._pool.submit(_delete_files, self._tables[kind], written)

    def commit(self, group: _Group, reg: _Registry) -> Future[None]:
        return self._pool.submit(_commit, self.wh, group, reg)


def _wait_quietly(future: Future[Any]) -> None:
    """Wait for `future` to finish, whatever its outcome (the outcome is read later)."""
    with contextlib.suppress(Exception):
        future.result()


def _write_files(table: Table, tables: list[pa.Table]) -> list[DataFile]:
    # A file's rows are one symbol, in time order as vendors write them: put in order of
    # their first rows, the pieces are usually sorted as they are, and need no sorted copy.
    data = pa.concat_tables(sorted(tables, key=_first_row))
    if not _in_order(data):
        # Sorted in the order read, so that rows of equal time stay in file order.
        data = sorted_rows(pa.concat_tables(tables), TABLES[table.name()[-1]].sort_columns)
    tables.clear()
    _check_pyarrow_schema_compatible(
        table.schema(), provided_schema=data.schema, format_version=table.format_version
    )
    return _data_files(table, data)


def _first_row(rows: pa.Table) -> tuple[str, int]:
    return rows.column("symbol")[0].as_py(), rows.column("timestamp")[0].value


def _in_order(data: pa.Table) -> bool:
    """Whether rows are in (symbol, timestamp, source_sequence) order already: a stable sort
    would leave them as they are (batch rows have no source_sequence)."""
    n = data.num_rows
    if data.column("source_sequence").null_count != n:
        return False
    if n < 2:
        return True
    symbol, ts = data.column("symbol"), data.column("timestamp")
    before, after = symbol.slice(0, n - 1), symbol.slice(1)
    same = pc.equal(before, after)
    later = pc.less_equal(ts.slice(0, n - 1), ts.slice(1))
    return bool(pc.all(pc.or_(pc.less(before, after), pc.and_(same, later))).as_py())


def _data_files(table: Table, data: pa.Table) -> list[DataFile]:
    """Sorted rows as data files, one (or more, by target size) per partition.

    What pyiceberg's own write does, without its filtered copy of every partition: in
    sorted rows a partition is a few runs of consecutive rows (one per symbol), so its
    file is written from slices.
    """
    meta = table.metadata
    spec, schema = meta.spec(), meta.schema()
    values = []
    for part in spec.fields:
        column = data.column(schema.find_column_name(part.source_id))
        source_type = schema.find_field(part.source_id).field_type
        values.append(part.transform.pyarrow_transform(source_type)(column))
    n = data.num_rows
    starts = [0]
    if values and n > 1:
        change = None
        for v in values:
            differs = pc.fill_null(pc.not_equal(v.slice(1), v.slice(0, n - 1)), True)
            change = differs if change is None else pc.or_(change, differs)
        starts += [i + 1 for i in pc.indices_nonzero(change).to_pylist()]
    runs: dict[tuple[Any, ...], list[pa.Table]] = {}
    for start, end in zip(starts, [*starts[1:], n], strict=True):
        key = tuple(v[start].as_py() for v in values)
        runs.setdefault(key, []).append(data.slice(start, end - start))
    task_schema = pyarrow_to_schema(
        data.schema,
        name_mapping=schema.name_mapping,
        downcast_ns_timestamp_to_us=IcebergConfig().get_bool(DOWNCAST_NS_TIMESTAMP_TO_US_ON_WRITE)
        or False,
        format_version=meta.format_version,
    )
    target = property_as_int(
        meta.properties,
        TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
        TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT,
    )
    assert target is not None
    write_uuid, counter = uuid.uuid4(), itertools.count()
    tasks = (
        WriteTask(
            write_uuid=write_uuid,
            task_id=next(counter),
            record_batches=batches,
            partition_key=PartitionKey(
                field_values=[
                    PartitionFieldValue(field=f, value=v)
                    for f, v in zip(spec.fields, key, strict=True)
                ],
                partition_spec=spec,
                schema=schema,
            )
            if values
            else None,
            schema=task_schema,
        )
        for key, pieces in runs.items()
        for batches in bin_pack_arrow_table(pa.concat_tables(pieces), target)
    )
    return list(write_file(io=table.io, table_metadata=meta, tasks=tasks))


def _delete_files(table: Table, written: list[_Written]) -> None:
    for future in written:
        try:
            files = future.result()
        except Exception:
            continue
        for f in files:
            with contextlib.suppress(OSError):
                table.io.delete(f.file_path)


def _commit(wh: Warehouse, group: _Group, reg: _Registry) -> None:
    """Commit a group's dead letters, then its rows. A crash between the two commits
    leaves the files unloaded; the reload then adds their rows but not their dead letters
    a second time (the dead-letter commit is in the registry)."""
    kind = group.kind
    dl_files: dict[str, str] = {}
    dead: list[DeadLetter] = []
    for f in group.files:
        if f.digest in reg.dead_lettered[kind]:
            f.result.dead_letters = 0  # written by an earlier load that stopped short
        elif f.dead_letters:
            dl_files[f.digest] = f.source
            dead.extend(f.dead_letters)
    complete = [f.digest for f in group.files if f.rows == 0]
    if dead:
        props = {
            BATCH_FILES: _encoder.encode(dl_files).decode(),
            BATCH_KIND: kind,
            BATCH_COMPLETE: _encoder.encode(complete).decode(),
        }
        wh.append(DEAD_LETTERS, dead_letters_to_arrow(dead), props)
        reg.dead_lettered[kind].update(dl_files)
    with_rows = {f.digest: f.source for f in group.files if f.rows}
    if with_rows:
        data_files = [d for written in group.written for d in written.result()]
        properties = {BATCH_FILES: _encoder.encode(with_rows).decode()}
        wh.append_files(kind, data_files, properties)
    for f in group.files:
        f.result.status, f.result.detail = "loaded", ""
        reg.rows[kind][f.digest] = f.source


def _discover(paths: Sequence[Path], exclude: Path) -> list[Path]:
    """Files given, and *.csv files under folders given (sorted), without company_info."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = (f for f in p.rglob("*") if f.is_file() and f.suffix.lower() == ".csv")
            out.extend(sorted(f for f in found if f.resolve() != exclude))
        else:
            out.append(p)
    return out


@contextlib.contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    """One load at a time per data_dir: two loads of one file could both see it as new."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "load.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LoadError(f"another k2d load is running on {data_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _symbols(companies: Sequence[asx.Company]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for c in companies:
        out.setdefault(c.company_id, set()).add(c.symbol)
    return out


def load_asx(
    cfg: Config,
    *,
    trades: Sequence[Path] = (),
    quotes: Sequence[Path] = (),
    company_info: Path,
    options: LoadOptions | None = None,
    progress: Progress | None = None,
) -> LoadSummary:
    """Load ASX vendor files into the warehouse of `cfg`; see the module docstring."""
    opts = options or LoadOptions()
    started = time.monotonic()
    for p in (*trades, *quotes, company_info):
        if not p.exists():
            raise LoadError(f"{p}: no such file or directory")
    try:
        companies = asx.read_company_info(company_info.read_bytes(), str(company_info))
    except (OSError, asx.AsxFormatError) as e:
        raise LoadError(str(e)) from None
    symbols = _symbols(companies)
    exclude = company_info.resolve()
    inputs = [(TRADES, p) for p in _discover(trades, exclude)]
    inputs += [(QUOTES, p) for p in _discover(quotes, exclude)]
    summary = LoadSummary()
    progress = progress or Progress(len(inputs), None)
    progress.total = len(inputs)
    retries = max(cfg.writer.commit_retries, opts.commit_retries)
    commit_cfg = msgspec.structs.replace(cfg.writer, commit_retries=retries)
    with _exclusive(cfg.storage.data_path()), Warehouse(cfg.storage, commit_cfg) as wh:
        wh.ensure_tables()
        summary.instruments_changed = upsert_instruments(wh, companies)
        summary.instruments = len(companies)
        reg = _read_registry(wh)
        _load_files(wh, reg, inputs, symbols, opts, summary, progress)
    progress.close()
    summary.seconds = time.monotonic() - started
    return summary


def _load_files(
    wh: Warehouse,
    reg: _Registry,
    inputs: Sequence[tuple[str, Path]],
    symbols: dict[str, set[str]],
    opts: LoadOptions,
    summary: LoadSummary,
    progress: Progress,
) -> None:
    """Read files on this thread while their rows are written, and groups committed, on
    another."""
    seen: dict[tuple[str, str], Path] = {}
    pending: Future[None] | None = None
    pending_group: _Group | None = None
    failure: BaseException | None = None

    def settle() -> None:
        nonlocal pending, pending_group, failure
        if pending is None or pending_group is None:
            return
        try:
            pending.result()
        except Exception as e:
            failure = e
            for f in pending_group.files:
                f.result.status = "failed"
                f.result.detail = f"commit failed: {type(e).__name__}: {e}"
        else:
            for f in pending_group.files:
                r = f.result
                summary.rows[pending_group.kind] += r.rows
                summary.rows[DEAD_LETTERS] += r.dead_letters
                progress.advance(files=1, rows=r.rows)
        pending = pending_group = None

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2d-load-write") as pool:
        writer = _Writer(wh, pool)

        def submit(group: _Group) -> None:
            nonlocal pending, pending_group
            rest = group.gathered.rest()
            if rest:
                group.written.append(writer.write(group.kind, rest))
            settle()
            if failure is None and group.files:
                pending, pending_group = writer.commit(group, reg), group

        group = _Group(TRADES, _Batches(opts.gather_rows))
        for i, (kind, path) in enumerate(inputs):
            if failure is not None:
                for k, p in inputs[i:]:
                    detail = "not loaded: an earlier commit failed"
                    summary.files.append(FileResult(p, _kind(k), "failed", detail=detail))
                break
            if kind != group.kind:
                submit(group)
                group = _Group(kind, _Batches(opts.gather_rows))
            item = _read_one(kind, path, symbols, reg, seen, opts, wh, writer, group)
            summary.files.append(item.result if isinstance(item, _File) else item)
            if not isinstance(item, _File):
                progress.advance(files=1)
                continue
            if group.rows >= opts.commit_rows or len(group.files) >= opts.max_group_files:
                submit(group)
                group = _Group(kind, _Batches(opts.gather_rows))
        if failure is None:
            submit(group)
        settle()


def _kind(kind: str) -> Kind:
    return "trades" if kind == TRADES else "quotes"


def _read_one(
    kind: str,
    path: Path,
    symbols: dict[str, set[str]],
    reg: _Registry,
    seen: dict[tuple[str, str], Path],
    opts: LoadOptions,
    wh: Warehouse,
    writer: _Writer,
    group: _Group,
) -> _File | FileResult:
    """Hash, check and read one file into `group`; a FileResult when it is not to be
    committed (and then nothing of it stays in the group or on disk)."""
    k = _kind(kind)
    company_id = path.stem
    try:
        with path.open("rb") as fh:
            before = os.fstat(fh.fileno())
            if before.st_size > opts.max_file_bytes:
                return FileResult(
                    path,
                    k,
                    "failed",
                    detail=f"{before.st_size:,} bytes, more than the limit of "
                    f"{opts.max_file_bytes:,} (--max-file-mb)",
                )
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
            previous = reg.loaded(kind, digest)
            if previous is not None:
                detail = f"sha256 {digest[:16]} loaded as {previous}"
                return FileResult(path, k, "skipped", detail=detail)
            if (kind, digest) in seen:
                detail = f"same content as {seen[kind, digest]}"
                return FileResult(path, k, "skipped", detail=detail)
            known = symbols.get(company_id)
            if not known:
                return FileResult(
                    path,
                    k,
                    "failed",
                    detail=f"unknown company id {company_id!r}: not in company_info",
                )
            if len(known) > 1:
                return FileResult(
                    path,
                    k,
                    "failed",
                    detail=f"company id {company_id} has several symbols "
                    f"({', '.join(sorted(known))})",
                )
            fh.seek(0)
            source = str(path.resolve())
            reader = asx.FileReader(
                kind,
                symbol=next(iter(known)),
                company_id=company_id,
                digest=digest,
                source=source,
                ingested_at=now_us(),
                max_bad_rows=opts.max_bad_rows,
            )
            read = _read_rows(fh, reader, kind, opts, wh, reg, writer)
            after = os.fstat(fh.fileno())
    except (OSError, asx.AsxFormatError) as e:
        return FileResult(path, k, "failed", detail=str(e))
    written, gathered, rows, dead, in_table = read
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        writer.discard(kind, written)
        return FileResult(path, k, "failed", detail="the file changed while it was read")
    if rows == 0 and not dead:
        return FileResult(path, k, "empty", detail="no rows")
    if in_table:
        writer.discard(kind, written)
        return FileResult(path, k, "skipped", detail=f"sha256 {digest[:16]} rows already in table")
    seen[kind, digest] = path
    group.written.extend(written)
    # The file's last rows are written with the next files' (fewer, larger data files).
    group.gathered.add(gathered)
    while batch := group.gathered.full():
        group.written.append(writer.write(kind, batch))
    # "loaded" once its commit lands; stays "failed" if an earlier commit stops the load.
    result = FileResult(
        path, k, "failed", rows, len(dead), detail="not committed: the load stopped"
    )
    item = _File(result, digest, source, rows, dead)
    group.files.append(item)
    group.rows += rows
    return item


def _read_rows(
    fh: BinaryIO,
    reader: asx.FileReader,
    kind: str,
    opts: LoadOptions,
    wh: Warehouse,
    reg: _Registry,
    writer: _Writer,
) -> tuple[list[_Written], list[pa.Table], int, list[DeadLetter], bool]:
    """Read a file to its end, writing its rows in batches of write_rows as they come.

    Returns the batches written, the rows not yet written, the row count, the dead letters
    and whether the rows are already in the table (history cut short by expiry: the rows
    are then only counted). A file that fails leaves no data file behind.
    """
    written: list[_Written] = []
    gathered = _Batches(opts.write_rows)
    rows = 0
    in_table: bool | None = None if reg.truncated[kind] else False
    try:
        for piece in asx.slices(fh, opts.slice_bytes):
            table = reader.read(piece)
            if not table.num_rows:
                continue
            rows += table.num_rows
            if in_table is None:
                in_table = _in_table(wh, kind, table)
            if in_table:
                continue
            gathered.add([table])
            while batch := gathered.full():
                written.append(writer.write(kind, batch))
        dead, _ = reader.close()
    except BaseException:
        writer.discard(kind, written)
        raise
    return written, gathered.rest(), rows, dead, bool(in_table)


# --- command line --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `k2d load asx`."""
    d = LoadOptions()
    add = parser.add_argument
    add(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help="config.toml (default: ./config.toml if present)",
    )
    add(
        "--trades",
        type=Path,
        nargs="+",
        action="extend",
        default=[],
        metavar="PATH",
        help="trade files or folders of them (<company_id>.csv)",
    )
    add(
        "--quotes",
        type=Path,
        nargs="+",
        action="extend",
        default=[],
        metavar="PATH",
        help="quote files or folders of them (<company_id>.csv)",
    )
    add(
        "--company-info",
        type=Path,
        required=True,
        metavar="FILE",
        help="company_info.csv mapping company ids to symbols",
    )
    add("--quiet", action="store_true", help="no progress line on stderr")
    add(
        "--commit-rows",
        type=int,
        default=d.commit_rows,
        help="commit a group of files once it holds this many rows (default %(default)s)",
    )
    add(
        "--max-file-mb",
        type=int,
        default=d.max_file_bytes // (1024 * 1024),
        help="refuse larger files (default %(default)s)",
    )
    add(
        "--max-bad-rows",
        type=int,
        default=d.max_bad_rows,
        help="refuse a file with more bad rows than this (default %(default)s)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run `k2d load asx`; 0 when every file loaded or was skipped, 1 when a file failed,
    2 when the load could not start."""
    for name in ("commit_rows", "max_file_mb", "max_bad_rows"):
        if getattr(args, name) < 1:
            print(f"k2d load asx: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return EXIT_USAGE
    config_path: Path | None = args.config
    if config_path is None and Path("config.toml").exists():
        config_path = Path("config.toml")
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    options = LoadOptions(
        commit_rows=args.commit_rows,
        max_file_bytes=args.max_file_mb * 1024 * 1024,
        max_bad_rows=args.max_bad_rows,
    )
    show = not args.quiet and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    progress = Progress(0, sys.stderr if show else None)
    try:
        summary = load_asx(
            cfg,
            trades=args.trades,
            quotes=args.quotes,
            company_info=args.company_info,
            options=options,
            progress=progress,
        )
    except LoadError as e:
        print(f"k2d load asx: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(summary.format())
    return 0 if summary.ok else EXIT_FAILED
