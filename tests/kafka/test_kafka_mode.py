"""Kafka mode from outside: a real `k2d run` with `[kafka] enabled = true` against the
simulator and the session's real broker. The feed produces to Kafka, the trackers consume
from it, offsets live in the Iceberg snapshot: every trade the venue sent is stored once,
through SIGKILLs and through a broker that goes away for 30 s."""

from __future__ import annotations

import asyncio
import io
import random
import re
import signal
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import fastavro
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from k2d.config import StorageConfig
from k2d.model import partition_of
from k2d.storage import Warehouse
from tests.e2e.accounting import (
    account,
    get_json,
    metric_sum,
    wait_capturing,
    wait_gaps_closed,
    wait_ready,
)
from tests.e2e.conftest import daemon, read_table, write_config
from tests.e2e.test_kill_loop import free_port
from tests.kafka.test_broker import schemas_by_fingerprint
from tests.kafka_broker import Broker

pytestmark = pytest.mark.kafka

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
PARTITIONS = 3


def kafka_section(bootstrap: str) -> tuple[str, str, str]:
    """A [kafka] section with topics and a group of the test's own."""
    run = uuid.uuid4().hex[:8]
    trades, quotes = f"mode.{run}.trades", f"mode.{run}.quotes"
    return (
        f"""
[writer]
flush_interval = 0.3
[journal]
fsync_interval = 0.05
[sequencer]
gap_grace = 0.3
rerequest_after = 3.0
[kafka]
enabled = true
bootstrap_servers = "{bootstrap}"
trades_topic = "{trades}"
quotes_topic = "{quotes}"
partitions = {PARTITIONS}
group_id = "k2d-{run}"
send_timeout = 5.0
request_timeout = 5.0
""",
        trades,
        quotes,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, (out or "")[-3000:]


def wait_consumed(port: int, timeout: float = 120) -> None:
    """Until the consumer has read to the end of every partition (twice in a row)."""
    deadline = time.monotonic() + timeout
    caught_up = 0
    while caught_up < 2:
        assert time.monotonic() < deadline, "the consumer did not catch up"
        lag = metric_sum(port, "k2d_kafka_lag_records")
        caught_up = caught_up + 1 if lag == 0 else 0
        time.sleep(1.0)


def assert_each_trade_once(data: Path, manifest: dict[str, Any]) -> Any:
    """Every trade the venue sent stored exactly once, no gap left open."""
    counts = account(data, manifest)
    assert counts.open_gap_ids == 0, f"{counts.open_gap_ids} ids still in open gaps"
    assert counts.stored == counts.sent
    return counts


async def read_topics(bootstrap: str, topics: list[str]) -> list[Any]:
    """Every record of the topics, by plain aiokafka (no group, none of k2d's code)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(messages)
        return out
    finally:
        await consumer.stop()


def test_simulator_to_kafka_to_iceberg_stores_what_was_sent(
    tmp_path: Path, simulator: Any, kafka_bootstrap: str
) -> None:
    sim = simulator(
        "--symbols",
        ",".join(SYMBOLS),
        "--rate",
        "500",
        "--seed",
        "8",
        "--faults",
        "drop=0.005",
        "--record-quotes",
    )
    extra, trades_topic, quotes_topic = kafka_section(kafka_bootstrap)
    data, port = tmp_path / "data", free_port()
    cfg = write_config(tmp_path / "c.toml", data, sim, SYMBOLS, extra, api_port=port)
    proc = daemon(cfg)
    try:
        wait_capturing(port)
        ready = get_json(port, "/ready")
        assert ready["actors"]["kafka-producer"] == ready["actors"]["kafka-consumer"] == "running"
        time.sleep(4)
        manifest = sim.close_market()
        wait_consumed(port)
        wait_gaps_closed(port, timeout=120)
        produced = metric_sum(port, "k2d_kafka_produced_total")
        consumed = metric_sum(port, "k2d_kafka_consumed_total")
        group_commits = metric_sum(port, "k2d_kafka_group_commits_total")
    finally:
        stop(proc)
    counts = assert_each_trade_once(data, manifest)
    assert counts.backfilled > 0, "the dropped trades came back by backfill"
    # Every produced record was consumed; a recovery inside the run (a rejoin after a
    # coordinator hiccup revokes and reassigns) reads again from the snapshot's offsets, and
    # those reads count too. That each trade is stored once is checked on the tables above.
    assert produced and consumed and consumed >= produced
    assert group_commits and group_commits > 0

    # What Kafka holds, read by an independent consumer with the .avsc files alone: every
    # live trade stored came through Kafka, on its symbol's one partition.
    records = asyncio.run(read_topics(kafka_bootstrap, [trades_topic, quotes_topic]))
    schemas = schemas_by_fingerprint()
    live_ids: set[str] = set()
    partitions: dict[bytes, set[int]] = {}
    for m in records:
        assert m.value[:2] == b"\xc3\x01"
        body = fastavro.schemaless_reader(io.BytesIO(m.value[10:]), schemas[m.value[2:10]])
        assert m.key == f"{body['exchange']}:{body['symbol']}".encode()
        partitions.setdefault(m.key, set()).add(m.partition)
        if m.topic == trades_topic and "trade_id" in body:
            live_ids.add(body["message_id"])
    assert all(len(p) == 1 for p in partitions.values())
    trades = read_table(data, "trades").to_pylist()
    stored_live = {t["message_id"] for t in trades if t["provenance"] == "live"}
    assert stored_live and stored_live <= live_ids
    print(
        f"kafka mode: {counts.sent} trades sent, {counts.stored} stored once "
        f"({counts.backfilled} by backfill), {len(records)} records in Kafka"
    )


def test_kill_loop_in_kafka_mode_loses_and_duplicates_nothing(
    tmp_path: Path, simulator: Any, kafka_bootstrap: str
) -> None:
    sim = simulator(
        "--symbols",
        ",".join(SYMBOLS),
        "--rate",
        "1000",
        "--seed",
        "23",
        "--faults",
        "drop=0.005,dup=0.005,reorder=0.005",
        "--record-quotes",
    )
    extra, _, _ = kafka_section(kafka_bootstrap)
    data, port = tmp_path / "data", free_port()
    cfg = write_config(tmp_path / "c.toml", data, sim, SYMBOLS, extra, api_port=port)
    rng = random.Random(2613)
    kills = 10
    log = (tmp_path / "daemon.log").open("a")
    for _ in range(kills):
        proc = daemon(cfg, stdout=log)
        wait_ready(port)
        time.sleep(rng.uniform(0.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    proc = daemon(cfg, stdout=log)
    try:
        wait_capturing(port)
        time.sleep(3)
        manifest = sim.close_market()
        wait_consumed(port)
        closed_after = wait_gaps_closed(port, timeout=240)
    finally:
        stop(proc)
    counts = assert_each_trade_once(data, manifest)
    trades = read_table(data, "trades")
    dupes = [m for m, n in Counter(trades.column("message_id").to_pylist()).items() if n > 1]
    assert dupes == []
    print(
        f"kafka kill loop: {kills} kills, {counts.stored} trades stored, 0 lost, 0 duplicated, "
        f"{counts.backfilled} backfilled; no gap open {closed_after:.1f}s after the close"
    )


def test_a_broker_away_for_30s_degrades_then_everything_resumes(
    tmp_path: Path, simulator: Any, kafka_broker: Broker
) -> None:
    sim = simulator(
        "--symbols",
        ",".join(SYMBOLS),
        "--rate",
        "300",
        "--seed",
        "31",
        "--faults",
        "drop=0.003",
        "--record-quotes",
    )
    extra, _, _ = kafka_section(kafka_broker.bootstrap)
    data, port = tmp_path / "data", free_port()
    cfg = write_config(tmp_path / "c.toml", data, sim, SYMBOLS, extra, api_port=port)
    log = (tmp_path / "daemon.log").open("w")
    proc = daemon(cfg, stdout=log)
    try:
        wait_capturing(port)
        kafka_broker.stop()
        stopped_at = time.monotonic()
        try:
            degraded: dict[str, Any] = {}
            deadline = stopped_at + 20
            while not degraded and time.monotonic() < deadline:
                degraded = {
                    k: v for k, v in get_json(port, "/ready")["degraded"].items() if "kafka" in k
                }
                time.sleep(0.5)
            assert degraded, "/ready shows Kafka degraded while the broker is away"
            assert all("kafka" in why for why in degraded.values()), degraded
            time.sleep(max(0.0, stopped_at + 30 - time.monotonic()))
            assert proc.poll() is None, "the daemon stays up without its broker"
        finally:
            kafka_broker.resume()
        consumed = metric_sum(port, "k2d_kafka_consumed_total") or 0
        deadline = time.monotonic() + 90
        while (metric_sum(port, "k2d_kafka_consumed_total") or 0) <= consumed:
            assert time.monotonic() < deadline, "consumption resumed after the broker returned"
            time.sleep(0.5)
        time.sleep(3)
        manifest = sim.close_market()
        wait_consumed(port)
        wait_gaps_closed(port, timeout=180)
        ready = get_json(port, "/ready")
        restarts = ready["restarts"]
    finally:
        stop(proc)
    assert not [k for k in ready["degraded"] if "kafka" in k], ready
    # A record the client gave up on may restart the capture chain once or twice (every
    # actor of it counts that round), never in a loop.
    assert max(restarts.values(), default=0) <= 2, restarts
    assert_each_trade_once(data, manifest)


def lagging_partitions(port: int) -> set[int]:
    """The partitions a daemon's consumer holds (those its lag metric reports)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
    found = re.findall(r'^k2d_kafka_lag_records\{partition="(\d+)"', text, re.MULTILINE)
    return {int(p) for p in found}


def test_two_members_of_a_group_share_the_partitions_and_one_takes_over_from_the_other(
    tmp_path: Path, simulator: Any, kafka_bootstrap: str
) -> None:
    # A symbol on every partition, so that both members have data to store.
    names = (f"{base}USDT" for base in ("BTC", "ETH", "BNB", "SOL", "XRP", "ADA", "DOGE", "TRX"))
    symbols: dict[int, str] = {}
    for name in names:
        symbols.setdefault(partition_of("BINANCE", name, PARTITIONS), name)
    assert len(symbols) == PARTITIONS
    chosen = sorted(symbols.values())
    sim = simulator(
        "--symbols", ",".join(chosen), "--rate", "600", "--seed", "41", "--record-quotes"
    )
    extra, _, _ = kafka_section(kafka_bootstrap)
    data, port_a, port_b = tmp_path / "a", free_port(), free_port()
    # Member a captures the venue and consumes; member b only consumes, into a's tables.
    cfg_a = write_config(tmp_path / "a.toml", data, sim, chosen, extra, api_port=port_a)
    cfg_b = tmp_path / "b.toml"
    cfg_b.write_text(
        f"""
[storage]
data_dir = "{tmp_path / "b"}"
catalog_uri = "sqlite:///{data / "catalog.db"}"
warehouse = "file://{data / "warehouse"}"
[api]
port = {port_b}
[feeds.binance]
enabled = false
{extra}
"""
    )
    log = (tmp_path / "daemons.log").open("a")
    a = daemon(cfg_a, stdout=log)
    try:
        wait_capturing(port_a)
        # b's 4th commit to trades stalls (10 s, in its commit thread) after the same
        # flush's quotes commit landed: b is killed there, in the middle of a flush.
        cut = 4
        b = daemon(cfg_b, env={"K2D_FAILPOINTS": f"writer.commit.trades={cut}:block"}, stdout=log)
        try:
            wait_ready(port_b)
            # The group splits the partitions between the two, and both store rows.
            deadline = time.monotonic() + 90
            while True:
                held_a, held_b = lagging_partitions(port_a), lagging_partitions(port_b)
                b_rows = metric_sum(port_b, "k2d_rows_committed_total") or 0
                if held_a and held_b and not held_a & held_b and b_rows > 0:
                    break
                assert time.monotonic() < deadline, (held_a, held_b, b_rows)
                time.sleep(0.5)
            assert held_a | held_b == set(range(PARTITIONS))
            deadline = time.monotonic() + 60
            while not (commits(port_b, "trades") == cut - 1 and commits(port_b, "quotes") >= cut):
                assert time.monotonic() < deadline, "b did not reach the stalled commit"
                time.sleep(0.2)
        finally:
            b.send_signal(signal.SIGKILL)
            b.wait(timeout=30)
        # a takes b's partitions over once b's session has expired.
        deadline = time.monotonic() + 90
        while lagging_partitions(port_a) != set(range(PARTITIONS)):
            assert time.monotonic() < deadline, "a did not take over b's partitions"
            time.sleep(0.5)
        time.sleep(3)
        manifest = sim.close_market()
        wait_consumed(port_a)
        wait_gaps_closed(port_a, timeout=120)
    finally:
        stop(a)
    counts = assert_each_trade_once(data, manifest)
    quote_ids = read_table(data, "quotes").column("message_id").to_pylist()
    assert len(quote_ids) == len(set(quote_ids)), "b's half flush was undone, not repeated"
    assert "of member" in (tmp_path / "daemons.log").read_text(), "a undid b's half flush"
    members = {
        s.summary.additional_properties.get("k2.member")
        for s in read_snapshots(data, "trades")
        if s.summary is not None
    }
    assert len(members - {None}) == 2, members
    print(
        f"two members: {counts.stored} trades stored once, partitions split "
        f"{sorted(held_a)} / {sorted(held_b)}, then all taken over by the survivor"
    )


def commits(port: int, table: str) -> float:
    return metric_sum(port, f'k2d_commits_total{{table="{table}"}}') or 0.0


def read_snapshots(data: Path, table: str) -> list[Any]:
    with Warehouse(StorageConfig(data_dir=str(data))) as wh:
        return list(wh.load_table(table).metadata.snapshots)
