"""A start the machine refuses is one clear line and a sysexits code, never a traceback:
73 (EX_CANTCREAT) for a read-only or full data dir or a locked catalog, 78 (EX_CONFIG) for
a data_dir that is not a directory."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_faults import MOUNTS, tmpfs


def start(tmp: Path, data_dir: Path, storage: str = "") -> subprocess.CompletedProcess[str]:
    cfg = tmp / "c.toml"
    cfg.write_text(
        f"""
[storage]
data_dir = "{data_dir}"
{storage}
[api]
port = 0
[feeds.binance]
ws_url = "ws://127.0.0.1:9"
rest_url = "http://127.0.0.1:9"
"""
    )
    return subprocess.run(
        [sys.executable, "-m", "k2d", "run", "--config", str(cfg), "--exit-after", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def refusal(proc: subprocess.CompletedProcess[str]) -> str:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if "cannot start" in line]
    assert len(lines) == 1, out
    return lines[0]


def test_a_data_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_text("not a directory")
    proc = start(tmp_path, data)
    assert proc.returncode == 78
    assert "storage.data_dir" in refusal(proc) and "not a directory" in refusal(proc)


def test_a_locked_catalog_is_a_clear_refusal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    holder = sqlite3.connect(data / "catalog.db", isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE held (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = start(tmp_path, data, "sqlite_busy_timeout_ms = 300")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert proc.returncode == 73
    assert "catalog is locked" in refusal(proc)


@contextlib.contextmanager
def small_fs(path: Path) -> Iterator[Path]:
    if not MOUNTS:
        # CI runs as root and can mount: there a missing mount is a failure, as for tools.
        unavailable = pytest.fail if os.environ.get("CI") == "true" else pytest.skip
        unavailable("needs root and mount to make a real read-only or full filesystem")
    with tmpfs(path, "4m") as mounted:
        yield mounted


def test_a_read_only_data_dir_is_refused_with_73(tmp_path: Path) -> None:
    with small_fs(tmp_path / "ro") as mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(mounted)], check=True)
        try:
            proc = start(tmp_path, mounted / "data")
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(mounted)], check=True)
    assert proc.returncode == 73
    assert "read-only" in refusal(proc)


def test_a_full_data_dir_is_refused_with_73(tmp_path: Path) -> None:
    with small_fs(tmp_path / "full") as mounted:
        (mounted / "data").mkdir()
        with (mounted / "filler").open("wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        proc = start(tmp_path, mounted / "data")
    assert proc.returncode == 73
    assert "no space left" in refusal(proc)


def test_less_free_space_than_storage_min_free_bytes_is_refused_with_73(tmp_path: Path) -> None:
    proc = start(tmp_path, tmp_path / "data", f"min_free_bytes = {2**62}")
    assert proc.returncode == 73
    line = refusal(proc)
    assert "storage.data_dir" in line and "below storage.min_free_bytes" in line


def test_a_small_filesystem_is_refused_by_default_and_started_on_below_the_threshold(
    tmp_path: Path,
) -> None:
    with small_fs(tmp_path / "small") as mounted:
        refused = start(tmp_path, mounted / "data")  # 4 MiB free < 256 MiB by default
        started = start(tmp_path, mounted / "data", "min_free_bytes = 1048576")
    assert refused.returncode == 73
    assert "MiB free" in refusal(refused) and "storage.min_free_bytes (256.0 MiB)" in refusal(
        refused
    )
    assert started.returncode == 0, (started.stdout + started.stderr)[-2000:]
