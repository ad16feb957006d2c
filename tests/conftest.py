"""Suite-wide collection: the tests that use the Kafka broker share one (a session fixture),
so under pytest-xdist they run in one worker (one `xdist_group`) instead of each worker
starting a broker of its own."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        # fixturenames is the closure: a test that needs kafka_bootstrap needs the broker too.
        if "kafka_broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("kafka"))
