"""`k2d backup` while a real daemon writes, `k2d restore` into another data dir: the restored
tables read the same rows as the source tables at the backup's snapshots, from files under
the new data dir only (the source is moved away first); a non-empty data dir and a running
daemon are refused."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from k2d import backup as backup_module
from k2d.config import StorageConfig, load_config
from k2d.storage import Warehouse
from tests.e2e.accounting import wait_ready
from tests.e2e.conftest import daemon, start_simulator, write_config
from tests.e2e.test_faults import free_port

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
CONFIG = """
[writer]
flush_interval = 0.3
"""


def k2d(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "k2d", *args], capture_output=True, text=True, timeout=120
    )


def rows(data: Path, table: str, snapshot_id: int | None = None) -> list[str]:
    """Every row of a table (at a snapshot), as sorted reprs: equal lists, equal tables."""
    namespace, _, name = table.rpartition(".")
    with Warehouse(StorageConfig(data_dir=str(data), namespace=namespace)) as wh:
        scan = wh.load_table(name).scan(snapshot_id=snapshot_id)
        return sorted(repr(sorted(r.items())) for r in scan.to_arrow().to_pylist())


def planned_paths(data: Path, table: str) -> list[str]:
    namespace, _, name = table.rpartition(".")
    with Warehouse(StorageConfig(data_dir=str(data), namespace=namespace)) as wh:
        return [t.file.file_path for t in wh.load_table(name).scan().plan_files()]


def test_a_backup_taken_while_capturing_restores_the_same_rows_elsewhere(
    tmp_path: Path,
) -> None:
    sim = start_simulator(tmp_path, "--symbols", ",".join(SYMBOLS), "--rate", "1000", "--seed", "5")
    data, saved, restored = tmp_path / "data", tmp_path / "backup", tmp_path / "restored"
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", data, sim, SYMBOLS, CONFIG, api_port=port)
    proc = daemon(cfg)
    try:
        wait_ready(port)
        time.sleep(3)
        taken = k2d("backup", "--to", str(saved), "--config", str(cfg))
        assert taken.returncode == 0, taken.stdout + taken.stderr
        time.sleep(1.5)  # the daemon goes on committing after the backup
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        sim.proc.kill()
        sim.proc.wait()
    assert proc.returncode == 0, out[-3000:]
    manifest = json.loads((saved / backup_module.MANIFEST).read_text())
    assert set(manifest["tables"]) >= {f"market.{t}" for t in ("trades", "quotes")}
    assert manifest["tables"]["market.trades"]["records"] > 0
    assert "market.trades: snapshot" in taken.stdout

    # The source moved on after the backup: what the backup holds is its snapshot then.
    expected = {
        name: rows(data, name, info["snapshot_id"])
        for name, info in manifest["tables"].items()
        if info["snapshot_id"] is not None
    }
    assert len(rows(data, "market.trades")) > len(expected["market.trades"])

    done = k2d("restore", "--from", str(saved), "--config", str(cfg), "--data-dir", str(restored))
    assert done.returncode == 0, done.stdout + done.stderr
    data.rename(tmp_path / "source-gone")  # nothing may still point there
    for name, want in expected.items():
        assert rows(restored, name) == want, name
        assert len(want) == manifest["tables"][name]["records"]
        for path in planned_paths(restored, name):
            assert path.startswith(f"file://{restored}/warehouse/"), path

    # A restored data dir is a data dir: time travel works and the k2 state is there.
    with Warehouse(StorageConfig(data_dir=str(restored))) as wh:
        restored_snapshots = len(wh.load_table("trades").snapshots())
        # The backup may land between the table commits of one flush (Iceberg has no
        # multi-table commit): like a data dir after kill -9, the start's recovery undoes
        # that flush, and the state is whole again.
        wh.roll_back_incomplete_flush()
        state = wh.k2_state()
        assert state.complete
        assert state.log_position
        table = wh.load_table("trades")
        assert restored_snapshots == manifest["tables"]["market.trades"]["snapshots"]
        oldest = table.snapshots()[0].snapshot_id
        assert table.scan(snapshot_id=oldest).to_arrow().num_rows > 0


def test_restore_refuses_a_non_empty_data_dir_and_a_running_daemon(tmp_path: Path) -> None:
    source = tmp_path / "data"
    with Warehouse(StorageConfig(data_dir=str(source))) as wh:
        wh.ensure_tables()
    saved = tmp_path / "backup"
    assert k2d("backup", "--to", str(saved), "--data-dir", str(source)).returncode == 0
    again = k2d("backup", "--to", str(saved), "--data-dir", str(source))
    assert again.returncode == 1 and "not empty" in again.stderr

    target = tmp_path / "target"
    target.mkdir()
    (target / "something").write_text("x")
    refused = k2d("restore", "--from", str(saved), "--data-dir", str(target))
    assert refused.returncode == 1
    assert "not empty" in refused.stderr and "--force" in refused.stderr

    lock = target / "journal" / "feed-binance" / ".lock"
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running daemon holds it
    try:
        running = k2d("restore", "--from", str(saved), "--data-dir", str(target), "--force")
    finally:
        os.close(fd)
    assert running.returncode == 1 and "a daemon is running" in running.stderr

    forced = k2d("restore", "--from", str(saved), "--data-dir", str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (target / "catalog.db").is_file()

    not_a_backup = k2d("restore", "--from", str(tmp_path), "--data-dir", str(tmp_path / "x"))
    assert not_a_backup.returncode == 1 and "not a k2d backup" in not_a_backup.stderr


def test_a_file_expired_during_the_copy_starts_the_backup_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "data"
    cfg = load_config(environ={}, overrides={"storage": {"data_dir": str(source)}})
    with Warehouse(cfg.storage) as wh:
        wh.ensure_tables()
    real = backup_module._copy
    calls: list[Path] = []

    def flaky(src: Path, dst: Path) -> int:
        calls.append(src)
        if len(calls) == 2:  # snapshot expiry deleted it between catalog image and copy
            raise backup_module._Vanished(str(src))
        return real(src, dst)

    monkeypatch.setattr(backup_module, "_copy", flaky)
    said: list[str] = []
    manifest: dict[str, Any] = backup_module.backup(cfg, tmp_path / "b", say=said.append)
    assert manifest["attempts"] == 2
    assert any("vanished" in line for line in said)
    assert manifest["files"] == len(manifest["tables"])  # empty tables: one metadata file each
