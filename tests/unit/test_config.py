"""Config: unknown keys and bad values are named; env overrides; check-config exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from k2d.config import Config, ConfigError, config_to_toml, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_is_valid_and_points_at_the_real_venue() -> None:
    cfg = load_config(ROOT / "config.toml", environ={})
    assert cfg.feeds.binance.ws_url == "wss://stream.binance.com:9443"
    assert cfg.feeds.binance.rest_url == "https://api.binance.com"
    assert cfg.feeds.binance.symbols == ("BTCUSDT", "ETHUSDT")
    assert cfg.storage.data_dir == "./data"


def test_every_key_of_the_shipped_config_is_commented() -> None:
    lines = (ROOT / "config.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            previous = lines[i - 1].strip()
            assert previous.startswith("#") or "#" in line, f"key without comment: {line!r}"


def test_misspelled_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[api]\nprot = 9000\n[storage]\ndata_dirr = 'x'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "api.prot: unknown key" in info.value.problems
    assert "storage.data_dirr: unknown key" in info.value.problems


def test_wrong_type_and_range_are_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, overrides={"api": {"port": "eighty"}})
    assert info.value.problems[0].startswith("api.port: ")
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, overrides={"pipeline": {"stream_size": 0}})
    assert "pipeline.stream_size: must be greater than 0, got 0" in info.value.problems


def test_bad_symbol_and_url_are_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            environ={},
            overrides={"feeds": {"binance": {"symbols": ["btc-usdt"], "ws_url": "http://x"}}},
        )
    joined = "\n".join(info.value.problems)
    assert "feeds.binance.symbols.0:" in joined
    assert "feeds.binance.ws_url: must start with ws:// or wss://" in joined


def test_env_overrides_use_double_underscores() -> None:
    cfg = load_config(
        environ={
            "K2D_API__PORT": "9000",
            "K2D_FEEDS__BINANCE__SYMBOLS": '["SOLUSDT"]',
            "K2D_STORAGE__DATA_DIR": "/tmp/k2d",
        }
    )
    assert cfg.api.port == 9000
    assert cfg.feeds.binance.symbols == ("SOLUSDT",)
    assert cfg.storage.data_dir == "/tmp/k2d"


def test_unknown_env_key_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"K2D_API__PROT": "1"})
    assert info.value.problems == ["api.prot: unknown key"]


def test_config_renders_back_to_equivalent_toml(tmp_path: Path) -> None:
    path = tmp_path / "round.toml"
    path.write_text(config_to_toml(Config()))
    assert load_config(path, environ={}) == Config()


def test_check_config_cli_prints_key_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[feeds.binance]\nsymbolz = ['BTCUSDT']\n")
    proc = subprocess.run(
        [sys.executable, "-m", "k2d", "check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "feeds.binance.symbolz: unknown key" in proc.stderr
    good = subprocess.run(
        [sys.executable, "-m", "k2d", "check-config", "--config", str(ROOT / "config.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert good.returncode == 0, good.stderr
    assert "[feeds.binance]" in good.stdout


def test_kafka_keys_are_checked_by_name() -> None:
    assert load_config(environ={"K2D_KAFKA__ENABLED": "true"}).kafka.enabled
    with pytest.raises(ConfigError) as info:
        load_config(environ={"K2D_KAFKA__GROUP_ID": ""})
    assert info.value.problems == ["kafka.group_id: must not be empty"]
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, overrides={"kafka": {"topic_prefix": "k2d"}})
    assert "kafka.topic_prefix: unknown key" in info.value.problems


def test_kafka_topics_default_and_bounds_are_named() -> None:
    kafka = load_config(ROOT / "config.toml", environ={}).kafka
    assert (kafka.enabled, kafka.trades_topic, kafka.quotes_topic) == (
        False,
        "k2.trades.v2",
        "k2.quotes.v2",
    )
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, overrides={"kafka": {"partitions": 0, "send_timeout": -1}})
    assert info.value.problems == [
        "kafka.partitions: must be greater than 0, got 0",
        "kafka.send_timeout: must be greater than 0, got -1.0",
    ]
