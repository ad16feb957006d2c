"""The embedded DuckDB database the query pool reads Parquet with, locked down after setup.

One in-memory database (its Parquet metadata cache and memory limit shared) and one cursor
per worker. After setup DuckDB may read only files under the warehouse directory, loads no
extension, and its configuration is locked, so no statement can undo any of it.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import duckdb

from k2d.config import QueryConfig

__all__ = ["Statements", "open_database"]

# DuckDB warns that Arrow from an executed statement copies the rows once more. The pages
# (k2d.query._execute) and a file's minute bars (k2d.query._bars) are a few thousand rows:
# the copy costs less than binding read_parquet twice through the relation API would.
warnings.filterwarnings(
    "ignore",
    message="Arrow output on a DB-API result",
    category=UserWarning,
    module=r"k2d\.query\._(execute|bars)$",
)


def open_database(
    cfg: QueryConfig, allowed_dirs: Sequence[str], cursors: int
) -> tuple[duckdb.DuckDBPyConnection, list[duckdb.DuckDBPyConnection]]:
    """The database and `cursors` cursors on it, each for one thread at a time."""
    db = duckdb.connect(
        ":memory:",
        config={
            "threads": max(1, cfg.threads_per_worker),
            "memory_limit": cfg.memory_limit,
            # Spilling would need a temp directory outside the warehouse; fail instead.
            "temp_directory": "",
        },
    )
    # Both spellings: pyiceberg lists paths as configured, symlinks included.
    dirs = sorted(
        {os.path.join(f(d), "") for d in allowed_dirs for f in (os.path.abspath, os.path.realpath)}
    )
    for statement, params in (
        ("SET GLOBAL TimeZone = 'UTC'", []),
        ("SET GLOBAL parquet_metadata_cache = true", []),
        ("SET GLOBAL allowed_directories = ?", [dirs]),
        ("SET GLOBAL enable_external_access = false", []),
        ("SET GLOBAL autoinstall_known_extensions = false", []),
        ("SET GLOBAL autoload_known_extensions = false", []),
        ("SET GLOBAL lock_configuration = true", []),
    ):
        db.execute(statement, params)
    return db, [db.cursor() for _ in range(cursors)]


class Statements:
    """SQL text -> the statement DuckDB parsed from it, for the workers to run again with
    other values: the plans write a few dozen shapes of SQL, all values bound, and parsing
    one took 0.4-0.7 ms of the 1.5-6.5 ms of CPU its run takes here. The least recently
    used are forgotten beyond `size` (0 keeps none). Shared by the workers' threads: DuckDB
    runs a copy of the statement it is given."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._held: OrderedDict[str, duckdb.Statement] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def parsed(self, cursor: duckdb.DuckDBPyConnection, sql: str) -> duckdb.Statement | str:
        """`sql` parsed (once while it is held), or as given when it is not one statement
        or none are kept, for `execute` to take either way."""
        if self.size == 0:
            return sql
        with self._lock:
            held = self._held.get(sql)
            if held is not None:
                self._held.move_to_end(sql)
                return held
        statements = cursor.extract_statements(sql)
        if len(statements) != 1:
            return sql
        with self._lock:
            self._held[sql] = statements[0]
            self._held.move_to_end(sql)
            while len(self._held) > self.size:
                self._held.popitem(last=False)
        return statements[0]
