"""Command line: run, demo, simulate, load, compact, journal inspect, traces, backup, restore,
check-config, version."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from k2d import __version__
from k2d.config import ConfigError, config_to_toml, load_config

__all__ = ["main"]

EXIT_CONFIG = 2


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config.toml to read (default: ./config.toml if present)",
    )


def _config_path(arg: Path | None) -> Path | None:
    if arg is not None:
        return arg
    default = Path("config.toml")
    return default if default.exists() else None


def _parser() -> argparse.ArgumentParser:
    from k2d import backup, batchload, simulator, traces
    from k2d import compact as compact_cli

    parser = argparse.ArgumentParser(prog="k2d", description="Market-data capture daemon.")
    sub = parser.add_subparsers(dest="verb", required=True)

    run = sub.add_parser("run", help="run the daemon (production entry point)")
    _add_config(run)
    run.add_argument(
        "--exit-after", type=float, default=None, metavar="S", help="drain and exit after S seconds"
    )

    demo = sub.add_parser("demo", help="run the simulator and the daemon pointed at it")
    _add_config(demo)
    demo.add_argument("--data-dir", type=Path, default=Path("./demo-data"))
    demo.add_argument("--exit-after", type=float, default=None, metavar="S")
    demo.add_argument("--rate", type=float, default=2_000.0, help="simulated trades/s in total")
    demo.add_argument(
        "--faults",
        # Each dropped trade is a gap, and each gap costs one history request; the backfiller
        # keeps to 120 requests a minute (half of Binance's weight limit). At the default
        # rate this drop share opens about one gap a second, so the demo keeps up with it.
        default="drop=0.0005,dup=0.002,reorder=0.002,malformed=0.001",
        help="simulator fault mix",
    )
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--symbols", default="BTCUSDT,ETHUSDT,SOLUSDT")
    demo.add_argument("--api-port", type=int, default=None)

    sim = sub.add_parser("simulate", help="a Binance-protocol venue on loopback")
    simulator.add_arguments(sim)

    check = sub.add_parser("check-config", help="print the effective config or its errors")
    _add_config(check)

    load = sub.add_parser("load", help="load historical files into the tables")
    lsub = load.add_subparsers(dest="load_verb", required=True)
    batchload.add_arguments(
        lsub.add_parser("asx", help="ASX equities trades/quotes CSV files (vendor format)")
    )

    compact_cli.add_arguments(
        sub.add_parser("compact", help="compact small files, expire snapshots, apply retention")
    )

    journal = sub.add_parser("journal", help="the capture journal")
    jsub = journal.add_subparsers(dest="journal_verb", required=True)
    inspect = jsub.add_parser("inspect", help="records, time range and damage of a segment")
    inspect.add_argument("path", type=Path, help="a segment file (*.k2j)")

    traces.add_arguments(
        sub.add_parser("traces", help="spans of this and earlier runs, from the trace store")
    )
    backup.add_backup_arguments(
        sub.add_parser("backup", help="copy the catalog and the tables' files, also while running")
    )
    backup.add_restore_arguments(
        sub.add_parser("restore", help="restore a backup into an empty (or stopped) data dir")
    )

    sub.add_parser("version", help="print the version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb == "version":
        print(f"k2d {__version__}")
        return 0
    if args.verb == "simulate":
        from k2d import simulator

        return simulator.run_from_args(args)
    if args.verb == "compact":
        from k2d import compact

        return compact.run_from_args(args)
    if args.verb == "load":
        from k2d import batchload

        return batchload.run_from_args(args)
    if args.verb == "traces":
        from k2d import traces

        return traces.run_from_args(args)
    if args.verb == "backup":
        from k2d import backup

        return backup.run_backup(args)
    if args.verb == "restore":
        from k2d import backup

        return backup.run_restore(args)
    if args.verb == "journal":
        from k2d.journal import format_report, inspect

        if not args.path.is_file():
            print(f"{args.path}: no such segment file", file=sys.stderr)
            return EXIT_CONFIG
        report = inspect(args.path)
        print(format_report(report))
        return 0 if report.ok else 1
    if args.verb == "check-config":
        try:
            cfg = load_config(_config_path(args.config))
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            return EXIT_CONFIG
        print(config_to_toml(cfg))
        return 0
    if args.verb == "run":
        from k2d.app import run_daemon

        try:
            cfg = load_config(_config_path(args.config))
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            return EXIT_CONFIG
        return anyio.run(lambda: run_daemon(cfg, exit_after=args.exit_after))
    if args.verb == "demo":
        from k2d.demo import run_demo

        return run_demo(args)
    raise AssertionError(args.verb)


if __name__ == "__main__":
    sys.exit(main())
