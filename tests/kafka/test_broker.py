"""k2d's producer and consumer adapters against a real Kafka broker (tests/kafka/broker.sh).

What goes on the wire is checked by an independent consumer: plain aiokafka and fastavro
with the .avsc files in schemas/, none of k2d's code."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form
from opentelemetry.trace import SpanContext, TraceFlags

from k2d.config import KafkaConfig
from k2d.kafka import Consumer, KafkaSendTimeout, KafkaTopicError, Producer
from k2d.model import Quote, Trade

pytestmark = pytest.mark.kafka

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")


def trade(symbol: str, n: int, exchange: str = "BINANCE") -> Trade:
    return Trade(
        message_id=f"{exchange}:{symbol}:trade:{n}",
        trade_id=str(n),
        symbol=symbol,
        exchange=exchange,
        asset_class="crypto",
        timestamp=1_700_000_000_000_000 + n * 1_001,
        price=f"{65000 + n}.{n:08d}",
        quantity="0.00000001",
        currency="USDT",
        side="BUY" if n % 2 else "SELL",
        source_sequence=n,
        ingestion_timestamp=1_700_000_000_500_000 + n,
        vendor_data=json.dumps({"m": n % 2 == 0}),
    )


def quote(symbol: str, n: int) -> Quote:
    return Quote(
        message_id=f"BINANCE:{symbol}:quote:{n}",
        symbol=symbol,
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=1_700_000_000_000_000 + n,
        bid_price=f"{100 + n}.5",
        bid_quantity="2",
        ask_price=None if n % 3 == 0 else f"{101 + n}.25000001",
        ask_quantity="3.1",
        currency="USDT",
        source_sequence=n,
        ingestion_timestamp=1_700_000_000_000_100 + n,
    )


def schemas_by_fingerprint() -> dict[bytes, dict[str, Any]]:
    """The independent consumer's own view of the contract: every .avsc in schemas/."""
    out = {}
    for path in [*SCHEMAS.glob("*.avsc"), *SCHEMAS.glob("history/*.avsc")]:
        schema = parse_schema(json.loads(path.read_text()))
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
        out[fp] = schema
    return out


def micros(value: Any) -> Any:
    if isinstance(value, datetime):
        return (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return value


async def read_all(config: KafkaConfig, topics: list[str], count: int) -> list[Any]:
    """Every record of the topics from the beginning, by plain aiokafka (no group)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=config.bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    try:
        # Every record sent must be found here, so a partition missed would show as a count.
        tps = [TopicPartition(t, p) for t in topics for p in range(config.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        deadline = time.monotonic() + 20
        while len(out) < count and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(messages)
        return out
    finally:
        await consumer.stop()


async def test_topics_are_created_with_the_configured_partitions(
    kafka_config: KafkaConfig,
) -> None:
    producer = Producer(kafka_config)
    await producer.start()
    await producer.stop()

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_config.bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics(
            [kafka_config.trades_topic, kafka_config.quotes_topic]
        )
    finally:
        await admin.close()
    assert {d["topic"]: len(d["partitions"]) for d in described} == {
        kafka_config.trades_topic: 3,
        kafka_config.quotes_topic: 3,
    }
    # Existing topics are used as they are; another partition count is refused by name.
    again = Producer(kafka_config)
    await again.start()
    await again.stop()
    other = Producer(msgspec.structs.replace(kafka_config, partitions=5))
    with pytest.raises(KafkaTopicError, match=f"{kafka_config.quotes_topic} has 3 partitions"):
        await other.start()


def _described_late(
    monkeypatch: pytest.MonkeyPatch, topic: str, times: int
) -> list[list[dict[str, Any]]]:
    """The broker's answer to describe_topics, with `topic` described as a broker does for a
    topic whose creation its metadata has not caught up with (LEADER_NOT_AVAILABLE, no
    partitions), the first `times` asks. That moment cannot be made on demand; the CI box
    met it once, under load, right after a broker's start. Returns the answers given."""
    real = AIOKafkaAdminClient.describe_topics
    answers: list[list[dict[str, Any]]] = []

    async def describe(self: AIOKafkaAdminClient, topics: list[str] | None = None) -> list[Any]:
        described: list[dict[str, Any]] = await real(self, topics)
        if len(answers) < times:
            described = [
                {**d, "error_code": 5, "partitions": []} if d["topic"] == topic else d
                for d in described
            ]
        answers.append(described)
        return described

    monkeypatch.setattr(AIOKafkaAdminClient, "describe_topics", describe)
    return answers


async def test_a_topic_not_yet_described_whole_is_waited_for_not_refused(
    kafka_config: KafkaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = _described_late(monkeypatch, kafka_config.quotes_topic, times=3)

    producer = Producer(kafka_config)
    await producer.start()
    await producer.stop()

    # Three answers without the quotes topic's partitions, then as many as the broker's own
    # metadata needed, the last one whole.
    assert len(answers) >= 4
    assert [len(d["partitions"]) for d in answers[-1]] == [3, 3]


async def test_a_topic_never_described_whole_is_refused_with_the_brokers_reason(
    kafka_config: KafkaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = msgspec.structs.replace(kafka_config, request_timeout=1.0)
    answers = _described_late(monkeypatch, config.quotes_topic, times=1_000_000)

    started = time.monotonic()
    with pytest.raises(
        KafkaTopicError,
        match=f"{config.quotes_topic} is not ready within kafka.request_timeout: "
        "the broker describes it with LeaderNotAvailableError",
    ):
        await Producer(config).start()
    assert 1.0 <= time.monotonic() - started < 10.0
    assert len(answers) > 2  # asked again meanwhile


async def test_every_record_decodes_with_the_avsc_files_alone(kafka_config: KafkaConfig) -> None:
    rng = random.Random(7)
    span = SpanContext(
        trace_id=rng.getrandbits(128),
        span_id=rng.getrandbits(64),
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    trades = [trade(SYMBOLS[n % 4], n) for n in range(400)]
    quotes = [quote(SYMBOLS[n % 3], n) for n in range(150)]
    producer = Producer(kafka_config)
    await producer.start()
    try:
        acks = await producer.send_batch(trades, span_context=span)
        acks += await producer.send_batch(quotes, span_context=span)
    finally:
        await producer.stop()
    assert len(acks) == 550

    received = await read_all(
        kafka_config, [kafka_config.trades_topic, kafka_config.quotes_topic], 550
    )

    schemas = schemas_by_fingerprint()
    sent = {r.message_id: r for r in [*trades, *quotes]}
    decoded: dict[str, dict[str, Any]] = {}
    partitions: dict[bytes, set[int]] = {}
    for m in received:
        assert m.value[:2] == b"\xc3\x01"
        body = fastavro.schemaless_reader(io.BytesIO(m.value[10:]), schemas[m.value[2:10]])
        assert m.key == f"{body['exchange']}:{body['symbol']}".encode()
        headers = dict(m.headers)
        assert headers["traceparent"] == (
            f"00-{span.trace_id:032x}-{span.span_id:016x}-01".encode()
        )
        decoded[body["message_id"]] = body
        partitions.setdefault(m.key, set()).add(m.partition)
    assert len(received) == 550 and decoded.keys() == sent.keys()
    for message_id, body in decoded.items():
        record = sent[message_id]
        for name in record.__struct_fields__:
            want, got = getattr(record, name), micros(body[name])
            if isinstance(got, Decimal):
                assert got == Decimal(want), (message_id, name)
            elif name == "trade_conditions":
                assert got is None and want is None
            else:
                assert got == want, (message_id, name)
    # One key, one partition: a symbol's stream stays ordered for its tracker.
    assert all(len(p) == 1 for p in partitions.values())
    by_key = {}
    for m in sorted(received, key=lambda m: (m.topic, m.partition, m.offset)):
        by_key.setdefault((m.topic, m.key), []).append(decoded_id(m))
    for (topic, key), ids in by_key.items():
        records = trades if topic == kafka_config.trades_topic else quotes
        expected = [r.message_id for r in records if f"{r.exchange}:{r.symbol}".encode() == key]
        assert ids == expected


def decoded_id(m: Any) -> str:
    # message_id is the first field: a length-prefixed string right after the header.
    buf = io.BytesIO(m.value[10:])
    value: str = fastavro.schemaless_reader(buf, {"type": "string"})
    return value


async def test_consumer_seeks_on_assignment_and_commits_only_when_told(
    kafka_config: KafkaConfig,
) -> None:
    config = kafka_config
    producer = Producer(config)
    await producer.start()
    try:
        acks = await producer.send_batch([trade("BTCUSDT", n) for n in range(30)])
    finally:
        await producer.stop()
    tp = TopicPartition(config.trades_topic, acks[0].partition)
    assert [a.offset for a in acks] == list(range(30))
    assigned: list[frozenset[TopicPartition]] = []
    revoked: list[frozenset[TopicPartition]] = []

    async def on_assigned(tps: frozenset[TopicPartition]) -> dict[TopicPartition, int]:
        assigned.append(tps)
        return {tp: 10}  # as if the Iceberg snapshot said: offsets 0-9 are stored

    async def on_revoked(tps: frozenset[TopicPartition]) -> None:
        revoked.append(tps)

    group = f"{config.trades_topic}.group"
    first = Consumer(
        config, group, [config.trades_topic], on_assigned=on_assigned, on_revoked=on_revoked
    )
    await first.start()
    try:
        got = await poll_until(first, 20)
        assert [d.offset for d in got] == list(range(10, 30))
        assert [d.record for d in got] == [trade("BTCUSDT", n) for n in range(10, 30)]
        assert all(d.key == b"BINANCE:BTCUSDT" and d.error is None for d in got)
        assert assigned == [frozenset(TopicPartition(config.trades_topic, p) for p in range(3))]
        assert await first.committed(tp) is None  # nothing is committed behind our back
        await first.commit({tp: 25})
        assert await first.committed(tp) == 25
    finally:
        await first.stop()
    assert revoked == assigned  # on_revoked ran before the partitions left this member

    # A member with no position of its own starts where the group's commit says.
    second = Consumer(config, group, [config.trades_topic])
    await second.start()
    try:
        assert [d.offset for d in await poll_until(second, 5)] == [25, 26, 27, 28, 29]
    finally:
        await second.stop()


async def poll_until(consumer: Consumer, count: int, wait: float = 20.0) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + wait
    while len(out) < count and time.monotonic() < deadline:
        out.extend(await consumer.poll(0.5))
    await asyncio.sleep(0)
    return sorted(out, key=lambda d: (d.partition, d.offset))


async def test_a_send_the_broker_does_not_acknowledge_in_time_raises(
    kafka_config: KafkaConfig,
) -> None:
    producer = Producer(msgspec.structs.replace(kafka_config, send_timeout=0.000_001))
    await producer.start()
    try:
        with pytest.raises(KafkaSendTimeout, match=r"kafka\.send_timeout"):
            await producer.send_batch([trade("BTCUSDT", n) for n in range(1000)])
    finally:
        await producer.stop()


async def test_a_rebalance_revokes_before_it_reassigns(kafka_config: KafkaConfig) -> None:
    config = kafka_config
    producer = Producer(config)
    await producer.start()  # creates the topics
    await producer.stop()
    events: list[tuple[str, str, frozenset[TopicPartition]]] = []

    def member(name: str) -> Consumer:
        async def on_assigned(tps: frozenset[TopicPartition]) -> dict[TopicPartition, int]:
            events.append((name, "assigned", tps))
            return {}

        async def on_revoked(tps: frozenset[TopicPartition]) -> None:
            events.append((name, "revoked", tps))

        return Consumer(
            config,
            "rebalance",
            [config.trades_topic],
            on_assigned=on_assigned,
            on_revoked=on_revoked,
        )

    everything = frozenset(TopicPartition(config.trades_topic, p) for p in range(3))
    a, b = member("a"), member("b")
    await a.start()
    try:
        await poll_until(a, 1, wait=1.0)
        await b.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not settled(a, b, everything):
                await asyncio.gather(a.poll(0.2), b.poll(0.2))
            assignments = a.assignment(), b.assignment()
        finally:
            await b.stop()
    finally:
        await a.stop()
    assert settled(*assignments, everything), assignments
    a_events = [(kind, tps) for name, kind, tps in events if name == "a"]
    b_first = next(
        i for i, (name, kind, _) in enumerate(events) if (name, kind) == ("b", "assigned")
    )
    # a held all three and gave them all up before b was given any; it ended with its share.
    assert a_events[0] == ("assigned", everything)
    assert ("a", "revoked", everything) in events[:b_first]
    assert [tps for kind, tps in a_events if kind == "assigned"][-1] == assignments[0]


def settled(a: Any, b: Any, everything: frozenset[TopicPartition]) -> bool:
    """Two members' assignments (or Consumers) split `everything` between them."""
    x = a.assignment() if isinstance(a, Consumer) else a
    y = b.assignment() if isinstance(b, Consumer) else b
    return bool(x) and bool(y) and not x & y and x | y == everything


async def test_a_failed_position_lookup_stops_the_consumer_instead_of_reading_on(
    kafka_config: KafkaConfig,
) -> None:
    producer = Producer(kafka_config)
    await producer.start()
    await producer.send(trade("BTCUSDT", 1))
    await producer.stop()

    async def on_assigned(tps: frozenset[TopicPartition]) -> dict[TopicPartition, int]:
        raise RuntimeError("snapshot unreadable")

    consumer = Consumer(
        kafka_config, "failing", [kafka_config.trades_topic], on_assigned=on_assigned
    )
    await consumer.start()
    try:
        with pytest.raises(RuntimeError, match="snapshot unreadable"):
            await poll_until(consumer, 1, wait=10.0)
    finally:
        await consumer.stop()


async def test_a_record_that_does_not_decode_is_delivered_with_the_reason(
    kafka_config: KafkaConfig,
) -> None:
    producer = Producer(kafka_config)
    await producer.start()
    await producer.stop()
    raw = AIOKafkaProducer(bootstrap_servers=kafka_config.bootstrap_servers)
    await raw.start()
    try:
        await raw.send_and_wait(kafka_config.trades_topic, b'{"p": "1"}', key=b"X:Y", partition=0)
    finally:
        await raw.stop()
    consumer = Consumer(kafka_config, "corrupt", [kafka_config.trades_topic])
    await consumer.start()
    try:
        (got,) = await poll_until(consumer, 1)
    finally:
        await consumer.stop()
    assert (got.record, got.value, got.key) == (None, b'{"p": "1"}', b"X:Y")
    assert got.error is not None and "not Avro single-object encoding" in got.error
