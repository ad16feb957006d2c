"""The metrics added for deploy/ (alerts and dashboard): data dir space, feed connections
and the process collector, read the way Prometheus reads them."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from k2d.telemetry.metrics import Metrics


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_data_dir_space_is_read_at_scrape(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.watch_data_dir(tmp_path)
    got = scrape(metrics)
    label = (("path", str(tmp_path)),)
    st = os.statvfs(tmp_path)
    assert got[("k2d_data_dir_size_bytes", label)] == st.f_blocks * st.f_frsize
    assert 0 < got[("k2d_data_dir_free_bytes", label)] <= got[("k2d_data_dir_size_bytes", label)]
    assert got[("k2d_data_dir_inodes", label)] == st.f_files


def test_a_missing_data_dir_has_no_sample_and_breaks_no_scrape(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.watch_data_dir(tmp_path / "gone")
    got = scrape(metrics)
    assert not any(name.startswith("k2d_data_dir_") for name, _ in got)
    assert any(name == "process_resident_memory_bytes" for name, _ in got)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB filesystem (tmpfs), where free space moves only when we write."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    # CI runs as root and can mount: there a missing tmpfs is a failure, as for tools.
    unavailable = pytest.fail if os.environ.get("CI") == "true" else pytest.skip
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_free_bytes_fall_as_the_data_dir_fills(small_fs: Path) -> None:
    metrics = Metrics()
    metrics.watch_data_dir(small_fs)
    label = (("path", str(small_fs)),)
    before = scrape(metrics)
    (small_fs / "segment").write_bytes(b"\0" * (6 * 1024 * 1024))
    after = scrape(metrics)
    assert before[("k2d_data_dir_size_bytes", label)] == 8 * 1024 * 1024
    used = before[("k2d_data_dir_free_bytes", label)] - after[("k2d_data_dir_free_bytes", label)]
    assert used == 6 * 1024 * 1024
    assert after[("k2d_data_dir_free_bytes", label)] == 2 * 1024 * 1024


def test_feed_connected_follows_the_feeds_connections() -> None:
    metrics = Metrics()
    open_sockets = [1]
    metrics.watch_feed("feed-binance", lambda: len(open_sockets))
    label = (("feed", "feed-binance"),)
    assert scrape(metrics)[("k2d_feed_connected", label)] == 1.0
    open_sockets.clear()
    assert scrape(metrics)[("k2d_feed_connected", label)] == 0.0
    # Recovery builds a new feed: it replaces the old one's callable under the same name.
    metrics.watch_feed("feed-binance", lambda: 2)
    assert scrape(metrics)[("k2d_feed_connected", label)] == 1.0


def test_process_metrics_are_exported() -> None:
    got = {name for name, _ in scrape(Metrics())}
    assert {
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
    } <= got
