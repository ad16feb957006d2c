from tests.e2e.conftest import simulator
from tests.kafka_broker import kafka_bootstrap, kafka_broker, kafka_config

__all__ = ["kafka_bootstrap", "kafka_broker", "kafka_config", "simulator"]
