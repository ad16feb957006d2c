"""Outside tools the ops tests run (promtool, systemd-analyze): found on PATH, never
installed by a test. Missing in CI (CI=true) is a failure; elsewhere a skip with the reason."""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["require_tool"]


def require_tool(name: str, install_hint: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not on PATH ({install_hint})"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)
