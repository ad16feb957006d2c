"""Start-up checks: the data directory, the journal directory (each writable, with at least
`storage.min_free_bytes` free) and the catalog, before any actor starts. Each failure is
one clear line and a sysexits code, never a traceback: 73 (EX_CANTCREAT) when the machine
refuses to write (read-only, full or nearly full, no permission, a catalog locked by
another process), 78 (EX_CONFIG) when the configuration points at
something unusable (a data_dir that is a file, a catalog URL that does not open).

While the daemon runs, the same faults are waited out instead (DEGRADED, retried with
backoff; see k2d/runtime.py): a running capture should survive a full disk, a new start
on one should say so and stop.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from k2d.config import Config
from k2d.runtime import outside_fault
from k2d.storage import Warehouse

__all__ = ["EXIT_CANTCREAT", "EXIT_CONFIG", "StartupError", "check_directories", "open_warehouse"]

EXIT_CANTCREAT = 73
EXIT_CONFIG = 78
_PROBE = ".k2d-write-probe"
_WHY = {
    "disk_full": "no space left on the device",
    "read_only": "the filesystem is read-only",
    "permission": "permission denied",
    "io_error": "I/O error",
    "too_many_files": "too many open files",
    "catalog_locked": "the catalog is locked by another process",
}


class StartupError(Exception):
    """The daemon cannot start: `code` is its exit status, the message one line."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_directories(cfg: Config) -> None:
    """Create the data (and journal) directories, prove each takes a synced write and has
    at least storage.min_free_bytes free."""
    data = cfg.storage.data_path()
    dirs = [("storage.data_dir", data)]
    if cfg.journal.enabled and cfg.feeds.binance.enabled:
        dirs.append(("journal.directory", cfg.journal.path(cfg.storage)))
    for key, path in dirs:
        _probe(key, path)
        _free_space(key, path, cfg.storage.min_free_bytes)


def _free_space(key: str, path: Path, least: int) -> None:
    """A start on a nearly full disk is refused: it would be degraded within minutes."""
    if least <= 0:
        return
    try:
        st = os.statvfs(path)
    except OSError as exc:
        raise StartupError(
            EXIT_CANTCREAT, f"{key}: cannot read the free space of {path}: {exc.strerror}"
        ) from None
    free = st.f_bavail * st.f_frsize
    if free < least:
        raise StartupError(
            EXIT_CANTCREAT,
            f"{key}: only {_mib(free)} free on {path}, below storage.min_free_bytes "
            f"({_mib(least)}); free some space or lower the threshold",
        )


def _mib(n: int) -> str:
    return f"{n / 1_048_576:.1f} MiB"


def _probe(key: str, path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / _PROBE
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"k2d" * 1024)
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            raise StartupError(EXIT_CONFIG, f"{key}: {path} is not a directory") from None
        kind = outside_fault(exc)
        why = _WHY.get(kind or "", exc.strerror or str(exc))
        raise StartupError(EXIT_CANTCREAT, f"{key}: cannot write to {path}: {why}") from None


def open_warehouse(cfg: Config) -> Warehouse:
    """Open the catalog and make sure the tables exist (blocking: run it in a thread)."""
    try:
        warehouse = Warehouse(cfg.storage, cfg.writer)
        warehouse.ensure_tables()
    except Exception as exc:
        kind = outside_fault(exc)
        if kind is not None:
            raise StartupError(
                EXIT_CANTCREAT, f"storage: cannot open the catalog: {_WHY.get(kind, kind)}"
            ) from None
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(
            EXIT_CONFIG, f"storage.catalog_uri: cannot open the catalog: {detail}"
        ) from None
    return warehouse
