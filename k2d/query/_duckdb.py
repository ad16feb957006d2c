"""The embedded DuckDB database the query pool reads Parquet with, locked down after setup.

One in-memory database (its Parquet metadata cache and memory limit shared) and one cursor
per worker. After setup DuckDB may read only files under the warehouse directory, loads no
extension, and its configuration is locked, so no statement can undo any of it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import duckdb

from k2d.config import QueryConfig

__all__ = ["open_database"]


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
