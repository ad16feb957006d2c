"""`k2d backup --to DIR` and `k2d restore --from DIR`: a consistent copy of the Iceberg
catalog and of every file its tables' snapshots need, taken while the daemon runs, and its
restore into an empty (or stopped) data dir, at the same path or another.

Consistent while the daemon commits: the catalog (SQLite) is copied with SQLite's online
backup API, one transactionally consistent image; Iceberg never changes a file once written,
so every file that image's metadata references can be copied afterwards. Snapshot expiry
may delete an old snapshot's files meanwhile: then the backup starts over from a fresh
catalog image (the files already copied are kept and not copied again).

Iceberg metadata holds absolute paths. A restore to the data dir the backup came from copies
files as they are; a restore elsewhere rewrites the paths in the table metadata (JSON), the
manifest lists (with each manifest's new length) and the manifests (Avro), then points the
catalog at the new metadata. The capture journal is not part of a backup (it is the raw
archive, and large): restored into the data dir it was taken from, with that data dir's
journal still there, the daemon replays every frame after the backup's committed position,
so nothing captured after the backup is lost.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro

from k2d import __version__
from k2d.config import Config, ConfigError, load_config

__all__ = [
    "MANIFEST",
    "BackupError",
    "add_backup_arguments",
    "add_restore_arguments",
    "backup",
    "restore",
    "run_backup",
    "run_restore",
]

MANIFEST = "k2d-backup.json"
FORMAT = 1
CATALOG = "catalog.db"
WAREHOUSE = "warehouse"
EXIT_FAILED = 1
EXIT_CONFIG = 2
_ATTEMPTS = 5
_DELETED = 2  # manifest entry status: the file left the table in that snapshot
_JOURNAL_FEED = "feed-binance"

Say = Callable[[str], None]


class BackupError(Exception):
    """A backup or restore that cannot go on; the message is one line for the operator."""


class _Vanished(Exception):
    """A file the catalog image references was deleted (snapshot expiry) before it was copied."""


@dataclass
class _TableFiles:
    """Every file one table's metadata references, as absolute warehouse paths (file://)."""

    name: str
    metadata: str
    snapshot_id: int | None
    snapshots: int
    records: int
    manifest_lists: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return [self.metadata, *self.manifest_lists, *self.manifests, *self.data]


# Locations


def _catalog_file(cfg: Config) -> Path:
    from sqlalchemy.engine import make_url

    url = make_url(cfg.storage.catalog_url())
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        raise BackupError(
            "storage.catalog_uri: backup and restore handle the embedded SQLite catalog only "
            "(back up a Postgres catalog with pg_dump, a REST catalog with its own tools)"
        )
    return Path(str(url.database)).expanduser().resolve()


def _warehouse_root(cfg: Config) -> str:
    url = cfg.storage.warehouse_url()
    if not url.startswith("file://"):
        raise BackupError(
            "storage.warehouse: backup and restore handle a local warehouse only "
            "(an object store keeps its own versions)"
        )
    return url.rstrip("/")


def _relative(path: str, root: str) -> str:
    if not path.startswith(root + "/"):
        raise BackupError(f"{path} lies outside the warehouse {root}: not backed up")
    return path[len(root) + 1 :]


def _local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


# Reading a table's files


def _table_files(name: str, metadata: str, read: Callable[[str], Path]) -> _TableFiles:
    """Walk a table's metadata: snapshots -> manifest lists -> manifests -> data files.
    `read` maps an absolute path in the metadata to the file to read it from."""
    doc = json.loads(_read_bytes(read(metadata)))
    snapshots = doc.get("snapshots") or []
    current = doc.get("current-snapshot-id")
    if current == -1:
        current = None
    records = 0
    out = _TableFiles(name, metadata, current, len(snapshots), 0)
    seen_manifests: set[str] = set()
    seen_data: set[str] = set()
    for snap in snapshots:
        if snap.get("snapshot-id") == current:
            records = int(snap.get("summary", {}).get("total-records", 0))
        listed = snap.get("manifest-list")
        if not listed:
            continue
        out.manifest_lists.append(listed)
        for entry in _avro_records(read(listed)):
            path = entry["manifest_path"]
            if path in seen_manifests:
                continue
            seen_manifests.add(path)
            out.manifests.append(path)
            for item in _avro_records(read(path)):
                if item["status"] == _DELETED:
                    continue  # the file left the table there; later snapshots do not read it
                data = item["data_file"]["file_path"]
                if data not in seen_data:
                    seen_data.add(data)
                    out.data.append(data)
    out.records = records
    return out


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _Vanished(str(path)) from None


def _avro_records(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open("rb") as f:
            return [r for r in fastavro.reader(f) if isinstance(r, dict)]
    except FileNotFoundError:
        raise _Vanished(str(path)) from None


# Copying


def _copy(src: Path, dst: Path) -> int:
    """Copy one immutable file (skipped when an earlier attempt copied it); returns bytes."""
    try:
        size = src.stat().st_size
    except FileNotFoundError:
        raise _Vanished(str(src)) from None
    if dst.exists() and dst.stat().st_size == size:
        return size
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    try:
        shutil.copyfile(src, tmp)
    except FileNotFoundError:
        tmp.unlink(missing_ok=True)
        raise _Vanished(str(src)) from None
    _fsync(tmp)
    os.replace(tmp, dst)
    return size


def _write(dst: Path, data: bytes) -> int:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    tmp.write_bytes(data)
    _fsync(tmp)
    os.replace(tmp, dst)
    return len(data)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sqlite_copy(src: Path, dst: Path, timeout: float, *, read_only: bool) -> None:
    """SQLite's online backup: one consistent image of `src`, while others write to it."""
    dst.unlink(missing_ok=True)
    uri = f"file:{src}?mode=ro" if read_only else f"file:{src}"
    with (
        contextlib.closing(sqlite3.connect(uri, uri=True, timeout=timeout)) as source,
        contextlib.closing(sqlite3.connect(dst)) as target,
    ):
        source.backup(target)
    _fsync(dst)


# Backup


def backup(
    cfg: Config, dest: Path, *, say: Say = print, attempts: int = _ATTEMPTS
) -> dict[str, Any]:
    """Copy the catalog and the files of every table into `dest` (which must be empty or
    missing); returns the backup's manifest, which is written last."""
    catalog = _catalog_file(cfg)
    root = _warehouse_root(cfg)
    if not catalog.is_file():
        raise BackupError(f"{catalog}: no k2d catalog here (storage.data_dir)")
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest}: not empty; back up into a new directory")
    dest.mkdir(parents=True, exist_ok=True)
    image = dest / (CATALOG + ".part")
    timeout = cfg.storage.sqlite_busy_timeout_ms / 1000
    for attempt in range(1, attempts + 1):
        _sqlite_copy(catalog, image, timeout, read_only=True)
        try:
            tables = [
                _table_files(name, metadata, _local) for name, metadata in _catalog_tables(image)
            ]
            copied = files = 0
            keep: set[Path] = set()
            for t in tables:
                for path in t.all():
                    target = dest / WAREHOUSE / _relative(path, root)
                    copied += _copy(_local(path), target)
                    keep.add(target)
                    files += 1
        except _Vanished as gone:
            if attempt == attempts:
                raise BackupError(
                    f"files kept disappearing during the backup ({gone}); "
                    f"is snapshot expiry running very often?"
                ) from None
            say(
                f"{gone} vanished (snapshot expiry during the copy); "
                "again from a fresh catalog image"
            )
            continue
        break
    _prune(dest / WAREHOUSE, keep)
    os.replace(image, dest / CATALOG)
    manifest = {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "k2d_version": __version__,
        "source": {"data_dir": str(cfg.storage.data_path()), "warehouse": root},
        "catalog": CATALOG,
        "tables": {
            t.name: {
                "metadata": _relative(t.metadata, root),
                "snapshot_id": t.snapshot_id,
                "snapshots": t.snapshots,
                "records": t.records,
                "files": len(t.all()),
                "data_files": len(t.data),
            }
            for t in tables
        },
        "files": files,
        "bytes": copied,
        "attempts": attempt,
    }
    _fsync_tree(dest)
    _write(dest / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n")
    return manifest


def _catalog_tables(db: Path) -> list[tuple[str, str]]:
    """(namespace.table, metadata location) of every table in a catalog image."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        rows = con.execute(
            "SELECT table_namespace, table_name, metadata_location FROM iceberg_tables "
            "WHERE metadata_location IS NOT NULL ORDER BY table_namespace, table_name"
        ).fetchall()
    return [(f"{ns}.{name}", location) for ns, name, location in rows]


def _prune(root: Path, keep: set[Path]) -> None:
    """Drop what an earlier attempt copied that the final catalog image no longer needs."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path not in keep:
                path.unlink()


# Restore


def read_manifest(source: Path) -> dict[str, Any]:
    path = source / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupError(
            f"{source}: not a k2d backup ({MANIFEST} missing: an unfinished backup, or "
            "another directory)"
        ) from None
    except ValueError as exc:
        raise BackupError(f"{path}: unreadable: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path}: backup format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def restore(cfg: Config, source: Path, *, force: bool = False, say: Say = print) -> dict[str, Any]:
    """Restore the backup in `source` into the config's data dir; returns what was restored
    per table. The data dir must be empty (or missing) unless `force`; a running daemon
    on it (its journal locked) is refused even then."""
    manifest = read_manifest(source)
    catalog = _catalog_file(cfg)
    root = _warehouse_root(cfg)
    old_root = str(manifest["source"]["warehouse"]).rstrip("/")
    data = cfg.storage.data_path()
    # A data dir that is a mount point may hold lost+found.
    leftovers = [p.name for p in data.iterdir() if p.name != "lost+found"] if data.is_dir() else []
    if leftovers and not force:
        raise BackupError(
            f"{data}: not empty ({', '.join(sorted(leftovers)[:5])}); restore into an empty "
            "data dir, or add --force to replace its catalog (stop the daemon first)"
        )
    with _daemon_stopped(cfg):
        images = source / WAREHOUSE

        def read(path: str) -> Path:
            return images / _relative(path, old_root)

        tables = [
            _table_files(name, old_root + "/" + info["metadata"], read)
            for name, info in sorted(manifest["tables"].items())
        ]
        rewrite = old_root != root
        for t in tables:
            _restore_table(t, read, old_root, root, rewrite)
        catalog.parent.mkdir(parents=True, exist_ok=True)
        staged = catalog.with_name(catalog.name + ".restoring")
        _sqlite_copy(
            source / CATALOG, staged, cfg.storage.sqlite_busy_timeout_ms / 1000, read_only=True
        )
        with contextlib.closing(sqlite3.connect(staged)) as con:
            if rewrite:
                with con:  # one transaction
                    _repoint_catalog(con, old_root, root)
            con.execute("PRAGMA journal_mode=WAL")
        # The old catalog's WAL would be replayed into the new file: it goes first.
        for suffix in ("-wal", "-shm", "-journal"):
            catalog.with_name(catalog.name + suffix).unlink(missing_ok=True)
        os.replace(staged, catalog)
        _fsync_tree(catalog.parent)
    return _verify(cfg, manifest, say)


def _restore_table(
    t: _TableFiles, read: Callable[[str], Path], old: str, new: str, rewrite: bool
) -> None:
    def target(path: str) -> Path:
        return _local(new + "/" + _relative(path, old))

    if not rewrite:
        for path in t.all():
            _copy(read(path), target(path))
        return
    for path in t.data:
        _copy(read(path), target(path))
    lengths: dict[str, int] = {}
    for path in t.manifests:
        moved = _swap(path, old, new)
        lengths[moved] = _rewrite_avro(read(path), target(path), old, new)
    for path in t.manifest_lists:

        def fix(entry: dict[str, Any]) -> None:
            entry["manifest_length"] = lengths[entry["manifest_path"]]

        _rewrite_avro(read(path), target(path), old, new, fix)
    doc = json.loads(read(t.metadata).read_bytes())
    _write(target(t.metadata), json.dumps(_swap_all(doc, old, new)).encode())


def _swap(value: str, old: str, new: str) -> str:
    return new + value[len(old) :] if value == old or value.startswith(old + "/") else value


def _swap_all(value: Any, old: str, new: str) -> Any:
    """Every string under `value` that is a path under `old`, moved under `new`."""
    if isinstance(value, str):
        return _swap(value, old, new)
    if isinstance(value, list):
        return [_swap_all(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _swap_all(v, old, new) for k, v in value.items()}
    return value


def _rewrite_avro(
    src: Path,
    dst: Path,
    old: str,
    new: str,
    fix: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Copy an Iceberg manifest or manifest list with its paths moved; the Avro schema (with
    Iceberg's field ids) and file metadata are kept byte for byte. Returns the new size."""
    with src.open("rb") as f:
        reader = fastavro.reader(f)
        meta = dict(reader.metadata)
        codec = reader.codec
        records = [_swap_all(r, old, new) for r in reader]
    if fix is not None:
        for r in records:
            fix(r)
    schema = json.loads(meta["avro.schema"])
    extra = {k: v for k, v in meta.items() if not k.startswith("avro.")}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    with tmp.open("wb") as out:
        fastavro.writer(out, schema, records, codec=codec, metadata=extra)
    _fsync(tmp)
    os.replace(tmp, dst)
    return dst.stat().st_size


def _repoint_catalog(con: sqlite3.Connection, old: str, new: str) -> None:
    rows = con.execute(
        "SELECT catalog_name, table_namespace, table_name, metadata_location FROM iceberg_tables"
    ).fetchall()
    for catalog_name, ns, name, location in rows:
        con.execute(
            "UPDATE iceberg_tables SET metadata_location = ?, previous_metadata_location = NULL "
            "WHERE catalog_name = ? AND table_namespace = ? AND table_name = ?",
            (_swap(location, old, new) if location else location, catalog_name, ns, name),
        )
    with contextlib.suppress(sqlite3.OperationalError):  # no namespace properties table
        props = con.execute(
            "SELECT catalog_name, namespace, property_key, property_value "
            "FROM iceberg_namespace_properties"
        ).fetchall()
        for catalog_name, ns, key, value in props:
            if isinstance(value, str) and value != _swap(value, old, new):
                con.execute(
                    "UPDATE iceberg_namespace_properties SET property_value = ? "
                    "WHERE catalog_name = ? AND namespace = ? AND property_key = ?",
                    (_swap(value, old, new), catalog_name, ns, key),
                )


@contextlib.contextmanager
def _daemon_stopped(cfg: Config) -> Iterator[None]:
    """Hold the capture journal's lock while restoring: a running daemon holds it (and is
    refused), and a daemon started meanwhile waits for it."""
    feed = cfg.journal.path(cfg.storage) / _JOURNAL_FEED
    feed.mkdir(parents=True, exist_ok=True)
    fd = os.open(feed / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(
                f"a daemon is running on {cfg.storage.data_path()} (its journal {feed} is "
                "locked): stop it before restoring"
            ) from None
        yield
    finally:
        os.close(fd)


def _verify(cfg: Config, manifest: dict[str, Any], say: Say) -> dict[str, Any]:
    """Open the restored catalog: every table at the backup's snapshot, every file there."""
    from k2d.storage import Warehouse

    out: dict[str, Any] = {}
    with Warehouse(cfg.storage) as wh:
        for name, info in sorted(manifest["tables"].items()):
            ns, _, table_name = name.rpartition(".")
            table = wh.catalog.load_table((ns, table_name))
            snapshot = table.current_snapshot()
            sid = snapshot.snapshot_id if snapshot is not None else None
            if sid != info["snapshot_id"]:
                raise BackupError(
                    f"{name}: restored at snapshot {sid}, backup has {info['snapshot_id']}"
                )
            planned = list(table.scan().plan_files()) if snapshot is not None else []
            missing = [t.file.file_path for t in planned if not _local(t.file.file_path).is_file()]
            if missing:
                raise BackupError(f"{name}: {len(missing)} data files missing, e.g. {missing[0]}")
            rows = sum(t.file.record_count for t in planned)
            if rows != info["records"]:
                raise BackupError(f"{name}: {rows} rows restored, the backup has {info['records']}")
            out[name] = {"snapshot_id": sid, "records": rows, "data_files": len(planned)}
            say(f"{name}: snapshot {sid}, {rows:,} rows in {len(planned)} data files")
    return out


# Command line


def add_backup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", type=Path, required=True, metavar="DIR", help="a new directory")
    _common(parser)


def add_restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from", dest="source", type=Path, required=True, metavar="DIR", help="a k2d backup"
    )
    _common(parser)
    parser.add_argument(
        "--force",
        action="store_true",
        help="restore into a data dir that is not empty (its catalog is replaced)",
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="config.toml (default: ./config.toml if present)"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="override storage.data_dir")


def _config(args: argparse.Namespace) -> Config | None:
    path = args.config
    if path is None and Path("config.toml").exists():
        path = Path("config.toml")
    overrides = {"storage": {"data_dir": str(args.data_dir)}} if args.data_dir else None
    try:
        return load_config(path, overrides=overrides)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None


def run_backup(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG
    started = time.perf_counter()
    try:
        manifest = backup(cfg, args.to.resolve())
    except BackupError as exc:
        print(f"k2d backup: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for name, info in manifest["tables"].items():
        print(
            f"{name}: snapshot {info['snapshot_id']}, {info['records']:,} rows, "
            f"{info['snapshots']} snapshots, {info['files']} files"
        )
    print(
        f"backed up {cfg.storage.data_path()} to {args.to.resolve()}: {manifest['files']} files, "
        f"{manifest['bytes'] / 1_048_576:.1f} MiB in {time.perf_counter() - started:.1f}s"
    )
    return 0


def run_restore(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG
    started = time.perf_counter()
    try:
        tables = restore(cfg, args.source.resolve(), force=args.force)
    except BackupError as exc:
        print(f"k2d restore: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"restored {len(tables)} tables from {args.source.resolve()} into "
        f"{cfg.storage.data_path()} in {time.perf_counter() - started:.1f}s"
    )
    return 0
