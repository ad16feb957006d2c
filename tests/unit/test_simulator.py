"""Simulator settings: the `--faults` language, option checks and the command-line mapping."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import pytest

from k2d.simulator import (
    Faults,
    SimulatorOptions,
    add_arguments,
    options_from_args,
    parse_faults,
)
from k2d.simulator._history import BAD_ROW_KINDS, TradeHistory
from k2d.simulator._ledger import write_atomically


def test_parse_faults_reads_every_fault() -> None:
    faults = parse_faults(
        "drop=0.01, dup=0.02,reorder=0.03,malformed=0.04,reset=0.0005,disconnect_every=30"
    )

    assert faults == Faults(
        drop=0.01, dup=0.02, reorder=0.03, malformed=0.04, reset=0.0005, disconnect_every=30.0
    )


def test_parse_faults_reads_the_hostile_venue_faults() -> None:
    faults = parse_faults(
        "huge_id=0.01,id_jump=0.02,bad_history=0.03,shutdown_after=0,rest_ban=2.5"
    )

    assert faults == Faults(
        huge_id=0.01, id_jump=0.02, bad_history=0.03, shutdown_after=0.0, rest_ban=2.5
    )


@pytest.mark.parametrize("text", ["", " ", ","])
def test_parse_faults_empty_means_no_faults(text: str) -> None:
    assert parse_faults(text) == Faults()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("explode=0.1", "unknown fault 'explode'"),
        ("drop", "expected NAME=VALUE"),
        ("drop=", "expected NAME=VALUE"),
        ("drop=lots", "not a number"),
        ("drop=1.5", "probability must be in [0, 1]"),
        ("dup=-0.1", "probability must be in [0, 1]"),
        ("reorder=nan", "probability must be in [0, 1]"),
        ("disconnect_every=0", "positive number of seconds"),
        ("disconnect_every=inf", "positive number of seconds"),
        ("drop=0.1,drop=0.2", "given twice"),
        ("huge_id=2", "probability must be in [0, 1]"),
        ("bad_history=-0.5", "probability must be in [0, 1]"),
        ("rest_ban=0", "positive number of seconds"),
        ("shutdown_after=-1", "zero or more seconds"),
        ("shutdown_after=nan", "zero or more seconds"),
    ],
)
def test_parse_faults_rejects_bad_text_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_faults(text)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"symbols": ()}, "at least one symbol"),
        ({"symbols": ("btcusdt",)}, "upper-case"),
        ({"symbols": ("BTCUSDT", "BTCUSDT")}, "once"),
        ({"rate": -1.0}, "rate"),
        ({"ping_timeout": 0.0}, "ping_timeout"),
        ({"history_size": 0}, "history_size"),
        ({"weight_limit": 0}, "weight_limit"),
        ({"port": 70000}, "port"),
    ],
)
def test_options_reject_values_that_cannot_run(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimulatorOptions(**overrides)  # type: ignore[arg-type]


def test_command_line_maps_onto_options(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    args = parser.parse_args(
        [
            "--port=0",
            "--symbols=btcusdt,SOLUSDT",
            "--rate=250",
            "--seed=9",
            "--faults=drop=0.1,disconnect_every=5",
            f"--manifest={tmp_path / 'm.json'}",
            "--ping-interval=1",
            "--ping-timeout=2",
            "--connection-lifetime=60",
            "--history-size=1000",
            "--weight-limit=100",
            "--exit-after=3",
        ]
    )
    options = options_from_args(args)

    assert options == SimulatorOptions(
        port=0,
        symbols=("BTCUSDT", "SOLUSDT"),
        rate=250.0,
        seed=9,
        faults=Faults(drop=0.1, disconnect_every=5.0),
        manifest_path=tmp_path / "m.json",
        ping_interval=1.0,
        ping_timeout=2.0,
        connection_lifetime=60.0,
        history_size=1000,
        weight_limit=100,
    )
    assert args.exit_after == 3.0


def test_command_line_defaults_are_the_option_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    assert options_from_args(parser.parse_args([])) == SimulatorOptions()


def test_bad_faults_on_the_command_line_exit_2_naming_the_fault(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--faults", "drop=0.1,teleport=1"])

    assert exited.value.code == 2
    assert "unknown fault 'teleport'" in capsys.readouterr().err


def test_command_line_help_names_every_fault(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])

    text = " ".join(capsys.readouterr().out.split())
    for name in (
        "drop=P",
        "dup=P",
        "reorder=P",
        "malformed=P",
        "reset=P",
        "huge_id=P",
        "id_jump=P",
        "bad_history=P",
        "disconnect_every=S",
        "shutdown_after=S",
        "rest_ban=S",
    ):
        assert name in text


def test_concurrent_manifest_writes_never_lose_the_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    failures: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(200):
                write_atomically(path, json.dumps({"writer": n, "i": i}).encode())
        except BaseException as exc:  # a lost temp file was FileNotFoundError here
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert failures == []
    assert json.loads(path.read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp files left


def test_spoilt_history_rows_are_served_bad_and_the_others_are_not() -> None:
    history = TradeHistory(first_id=500, capacity=100)
    for i in range(20):
        history.append(6_500_000_000_000 + i, 10_000_000, 1_700_000_000_000, False)
    for n, kind in enumerate(BAD_ROW_KINDS):
        history.spoil(502 + 2 * n, kind)

    items = {502 + i: item for i, item in enumerate(history.from_id(502, 2 * len(BAD_ROW_KINDS)))}

    bad = {kind: items[502 + 2 * n] for n, kind in enumerate(BAD_ROW_KINDS)}
    assert bad["non_numeric_price"].price == "not-a-price"
    assert bad["zero_price"].price == "0.00000000"
    assert bad["too_many_digits"].price == "12345678901.00000000"
    assert bad["negative_time"].time == -1
    assert bad["far_time"].time >= 253_402_300_800_000
    assert bad["huge_id"].id == 2**64 - 1
    good = [items[502 + 2 * n + 1] for n in range(len(BAD_ROW_KINDS))]
    assert all(g.price.startswith("65000.0000") and g.time == 1_700_000_000_000 for g in good)
