"""k2d: market-data capture daemon."""

__version__ = "0.1.0"
