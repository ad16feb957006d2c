"""`k2d simulate`: run the simulated venue until SIGTERM/SIGINT or --exit-after."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from k2d.simulator._faults import FAULTS_HELP, Faults, parse_faults
from k2d.simulator._options import SimulatorOptions
from k2d.simulator._simulator import Simulator

_DEFAULTS = SimulatorOptions()


def _faults_arg(text: str) -> Faults:
    try:
        return parse_faults(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _symbols_arg(text: str) -> tuple[str, ...]:
    return tuple(symbol.strip().upper() for symbol in text.split(",") if symbol.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to a (sub)command parser."""
    d = _DEFAULTS
    add = parser.add_argument
    add("--host", default=d.host, help="interface to bind (default %(default)s)")
    add("--port", type=int, default=d.port, help="TCP port; 0 picks a free one (printed)")
    add(
        "--symbols",
        type=_symbols_arg,
        default=d.symbols,
        help="comma-separated symbols, e.g. BTCUSDT,ETHUSDT",
    )
    add("--rate", type=float, default=d.rate, help="trades per second across all symbols")
    add("--seed", type=int, default=d.seed, help="seed of trades, quotes and fault decisions")
    add(
        "--faults",
        type=_faults_arg,
        default=d.faults,
        help=FAULTS_HELP,
    )
    add("--manifest", type=Path, default=None, help="write the fault manifest (JSON) here")
    add("--ping-interval", type=float, default=d.ping_interval, help="seconds between pings")
    add("--ping-timeout", type=float, default=d.ping_timeout, help="seconds to wait for a pong")
    add(
        "--connection-lifetime",
        type=float,
        default=d.connection_lifetime,
        help="seconds before a connection is closed by the venue (Binance: 24 h)",
    )
    add("--history-size", type=int, default=d.history_size, help="REST trades kept per symbol")
    add("--weight-limit", type=int, default=d.weight_limit, help="REST weight per minute per IP")
    add("--request-weight", type=int, default=d.request_weight, help="weight of a trades call")
    add(
        "--quotes-per-trade",
        type=float,
        default=d.quotes_per_trade,
        help="bookTicker updates per trade",
    )
    add(
        "--record-quotes",
        action="store_true",
        help="list every quote's update id in the manifest (for tests; bounded)",
    )
    add("--exit-after", type=float, default=None, help="stop after this many seconds")


def options_from_args(args: argparse.Namespace) -> SimulatorOptions:
    """Build options from parsed arguments; raises ValueError on a bad value."""
    faults = args.faults if isinstance(args.faults, Faults) else parse_faults(args.faults)
    symbols = args.symbols if isinstance(args.symbols, tuple) else _symbols_arg(args.symbols)
    return SimulatorOptions(
        host=args.host,
        port=args.port,
        symbols=symbols,
        rate=args.rate,
        seed=args.seed,
        faults=faults,
        manifest_path=args.manifest,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        connection_lifetime=args.connection_lifetime,
        history_size=args.history_size,
        weight_limit=args.weight_limit,
        request_weight=args.request_weight,
        quotes_per_trade=args.quotes_per_trade,
        record_quotes=getattr(args, "record_quotes", False),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the simulator until SIGTERM/SIGINT or --exit-after; returns the exit code."""
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"k2d simulate: {exc}", file=sys.stderr)
        return 2
    exit_after: float | None = args.exit_after
    if exit_after is not None and not exit_after > 0:
        print(f"k2d simulate: --exit-after {exit_after}: must be more than zero", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(options, exit_after))
    except OSError as exc:
        print(f"k2d simulate: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run(options: SimulatorOptions, exit_after: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with Simulator(options) as simulator:
            # SIGUSR1 ends trading but keeps REST history up (see Simulator.close_market).
            closing: set[asyncio.Task[None]] = set()

            async def close_market() -> None:
                await simulator.close_market()
                print("simulator market closed", flush=True)

            loop.add_signal_handler(
                signal.SIGUSR1, lambda: closing.add(loop.create_task(close_market()))
            )
            print(f"simulator listening on {simulator.ws_url}", flush=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(exit_after):
                    await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(signum)
