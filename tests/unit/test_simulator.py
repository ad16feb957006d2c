"""Simulator settings: the `--faults` language, option checks and the command-line mapping."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from k2d.simulator import (
    Faults,
    SimulatorOptions,
    add_arguments,
    options_from_args,
    parse_faults,
)


def test_parse_faults_reads_every_fault() -> None:
    faults = parse_faults(
        "drop=0.01, dup=0.02,reorder=0.03,malformed=0.04,reset=0.0005,disconnect_every=30"
    )

    assert faults == Faults(
        drop=0.01, dup=0.02, reorder=0.03, malformed=0.04, reset=0.0005, disconnect_every=30.0
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
