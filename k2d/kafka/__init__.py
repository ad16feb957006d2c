"""Kafka adapter: the Avro codec for schemas/*.avsc and small aiokafka producer/consumer
adapters; actors/kafka_producer.py and actors/kafka_consumer.py wire them into Kafka mode."""

from k2d.kafka.cluster import close_client, reachable
from k2d.kafka.codec import (
    AvroCodec,
    CorruptRecordError,
    MarketRecord,
    UnknownSchemaError,
    schema_fingerprint,
)
from k2d.kafka.consumer import Consumer, Delivery, OnAssigned, OnRevoked, TopicPartition
from k2d.kafka.producer import (
    KafkaSendTimeout,
    KafkaTopicError,
    Producer,
    ensure_topics,
    record_key,
    trace_headers,
)

__all__ = [
    "AvroCodec",
    "Consumer",
    "CorruptRecordError",
    "Delivery",
    "KafkaSendTimeout",
    "KafkaTopicError",
    "MarketRecord",
    "OnAssigned",
    "OnRevoked",
    "Producer",
    "TopicPartition",
    "UnknownSchemaError",
    "close_client",
    "ensure_topics",
    "reachable",
    "record_key",
    "schema_fingerprint",
    "trace_headers",
]
