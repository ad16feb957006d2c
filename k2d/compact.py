"""`k2d compact`: one maintenance round on the data dir now, and an account of what it did.

Compacts the small files of closed partitions (or, with --before, of every day before a
date, today's included when the date is later), merges manifests, applies data retention,
expires snapshots and deletes the files nothing references any more. Safe while the
daemon runs: every commit retries conflicts and keeps the resume state.

The round is a `maintenance.round` trace (a span per rewrite and expiry below it) written to
the data dir's trace store, and to OTLP when configured, as the daemon's are: `k2d traces
list` shows it once the command has exited.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import date
from pathlib import Path

from opentelemetry.trace import StatusCode

from k2d.config import ConfigError, load_config

__all__ = ["add_arguments", "main", "run_from_args"]

EXIT_CONFIG = 2


def _date_arg(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `k2d compact`'s options to a (sub)command parser."""
    add = parser.add_argument
    add("--config", type=Path, default=None, help="config.toml (default: ./config.toml if present)")
    add("--data-dir", type=Path, default=None, help="override storage.data_dir")
    add("--table", default=None, help="only this table (default: all four)")
    add(
        "--before",
        type=_date_arg,
        default=None,
        metavar="DATE",
        help="compact the days before DATE (YYYY-MM-DD, UTC), open ones included "
        "(default: the days closed for maintenance.closed_partition_age)",
    )
    add("--no-expire", action="store_true", help="leave snapshots and files alone")


def run_from_args(args: argparse.Namespace) -> int:
    """Run one round; 0 when every operation succeeded, 1 when one failed, 2 on bad config."""
    # Imported here: pyiceberg and DuckDB load slowly, and the CLI's other verbs need neither.
    from k2d.storage import TABLE_NAMES, TableMaintenance, Warehouse
    from k2d.telemetry.tracing import setup_tracing

    if args.table is not None and args.table not in TABLE_NAMES:
        print(f"--table: expected one of {', '.join(TABLE_NAMES)}", file=sys.stderr)
        return EXIT_CONFIG
    path = args.config
    if path is None and Path("config.toml").exists():
        path = Path("config.toml")
    overrides = {"storage": {"data_dir": str(args.data_dir)}} if args.data_dir else None
    try:
        cfg = load_config(path, overrides=overrides)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    if not cfg.storage.catalog_uri and not (cfg.storage.data_path() / "catalog.db").exists():
        print(f"{cfg.storage.data_path()}: no k2d catalog here", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tables = (args.table,) if args.table else TABLE_NAMES
    started = time.perf_counter()
    tracing = setup_tracing(cfg.telemetry, store_dir=cfg.telemetry.trace_path(cfg.storage))
    try:
        with (
            Warehouse(cfg.storage, cfg.writer) as wh,
            tracing.tracer.start_as_current_span(
                "maintenance.round", attributes={"k2d.command": "compact", "k2d.full": True}
            ) as span,
        ):
            present = [t for t in tables if wh.catalog.table_exists((wh.namespace, t))]
            span.set_attribute("k2d.tables", present)
            compact = True
            if wh.incomplete_lanes():
                # The daemon undoes the commits of a flush cut short by a crash when it starts;
                # a compaction that rewrote their files first would leave it nothing to undo.
                print(
                    "a flush was cut short by a crash: start the daemon once to repair it; "
                    "compaction skipped",
                    file=sys.stderr,
                )
                compact = False
            maintenance = TableMaintenance(wh, cfg.maintenance, tracer=tracing.tracer)
            report = maintenance.run(
                present,
                before=args.before,
                compact=compact,
                compact_open=compact and cfg.maintenance.compact_open_partitions,
                expire=not args.no_expire,
            )
            if report.errors:
                span.set_status(StatusCode.ERROR, f"{len(report.errors)} operations failed")
    finally:
        # Writes what is queued to the store (and OTLP) before the process exits.
        tracing.shutdown()
    print(f"k2d compact: {cfg.storage.data_path()}, tables {', '.join(present) or 'none'}")
    for line in report.lines():
        print(line)
    done = len(report.compactions)
    print(f"{done} partitions compacted in {time.perf_counter() - started:.1f}s")
    return 1 if report.errors or not compact else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m k2d.compact`: the same as `k2d compact`."""
    parser = argparse.ArgumentParser(prog="k2d compact", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
