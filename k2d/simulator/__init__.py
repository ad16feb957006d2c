"""A Binance-protocol spot venue on loopback (WebSocket streams + REST history) with seeded
fault injection and a manifest of what it did, for testing k2d against a realistic feed."""

from k2d.simulator._cli import add_arguments, options_from_args, run_from_args
from k2d.simulator._faults import Faults, parse_faults
from k2d.simulator._options import SimulatorOptions
from k2d.simulator._simulator import Simulator

__all__ = [
    "Faults",
    "Simulator",
    "SimulatorOptions",
    "add_arguments",
    "options_from_args",
    "parse_faults",
    "run_from_args",
]
