"""Suite-wide collection: the Kafka tests share one broker, so under pytest-xdist they run
in one worker (one `xdist_group`) instead of each worker starting a broker of its own."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("kafka") is not None:
            item.add_marker(pytest.mark.xdist_group("kafka"))
