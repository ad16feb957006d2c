from tests.kafka_broker import kafka_bootstrap, kafka_config

__all__ = ["kafka_bootstrap", "kafka_config"]
