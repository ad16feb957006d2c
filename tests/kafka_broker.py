"""The session's Kafka broker: tests/kafka/broker.sh start before the first Kafka test, stop
after the last. In CI (CI=true) a missing Java or Maven, or a broker that does not start,
fails the tests; elsewhere they are skipped with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from k2d.config import KafkaConfig

__all__ = ["Broker", "kafka_bootstrap", "kafka_broker", "kafka_config"]

ROOT = Path(__file__).resolve().parents[1]
BROKER_SH = ROOT / "tests" / "kafka" / "broker.sh"
JAR_CACHE = Path(os.environ.get("K2D_TEST_KAFKA_CACHE", ROOT / ".ci" / "cache" / "kafka"))


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Kafka test broker: {reason} (CI=true: this is a failure, not a skip)")
    pytest.skip(f"Kafka test broker: {reason}")


@dataclass
class Broker:
    bootstrap: str
    run_dir: Path

    def stop(self) -> None:
        subprocess.run(
            [str(BROKER_SH), "stop", str(self.run_dir)], capture_output=True, timeout=60, check=True
        )

    def resume(self) -> None:
        """Start it again after stop(): same port, same topics and offsets."""
        subprocess.run(
            [str(BROKER_SH), "resume", str(self.run_dir)],
            capture_output=True,
            timeout=180,
            check=True,
            env={**os.environ, "K2D_TEST_KAFKA_WATCH_PID": str(os.getpid())},
        )


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: Broker) -> str:
    """`127.0.0.1:PORT` of a single-node KRaft broker shared by the session."""
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A single-node KRaft broker shared by the session (a test may stop and resume it)."""
    if shutil.which("java") is None:
        _unavailable("java not found (a Java 17+ runtime is needed)")
    if not (JAR_CACHE / "jars" / ".complete").exists() and shutil.which("mvn") is None:
        _unavailable(f"mvn not found and no Kafka jars cached in {JAR_CACHE}")
    run_dir = tmp_path_factory.mktemp("kafka-broker")
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [str(BROKER_SH), "start", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "K2D_TEST_KAFKA_WATCH_PID": str(os.getpid())},
        )
    except subprocess.TimeoutExpired:
        subprocess.run([str(BROKER_SH), "stop", str(run_dir)], capture_output=True, check=False)
        _unavailable("broker.sh start did not finish within 600 s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("bootstrap=")]
    if proc.returncode != 0 or not lines:
        _unavailable(f"broker.sh start failed: {proc.stderr.strip() or proc.stdout.strip()}")
    bootstrap = lines[-1].removeprefix("bootstrap=")
    print(  # shown with -s; the figure the README quotes
        f"\nKafka test broker {bootstrap} ready in {time.monotonic() - started:.1f}s "
        f"(logs: {run_dir / 'broker.log'})",
        file=sys.stderr,
    )
    try:
        yield Broker(bootstrap, run_dir)
    finally:
        subprocess.run(
            [str(BROKER_SH), "stop", str(run_dir)], capture_output=True, timeout=60, check=False
        )


@pytest.fixture
def kafka_config(kafka_bootstrap: str) -> KafkaConfig:
    """A config with topics of this test's own, so tests never see each other's records."""
    run = uuid.uuid4().hex[:8]
    return KafkaConfig(
        bootstrap_servers=kafka_bootstrap,
        trades_topic=f"test.{run}.trades",
        quotes_topic=f"test.{run}.quotes",
        partitions=3,
        linger_ms=5,
        send_timeout=15.0,
        request_timeout=15.0,
    )
