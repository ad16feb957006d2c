"""k2d: market-data capture daemon."""

from k2d.allocators import default_arrow_pool

__version__ = "0.1.0"

# First, before anything imports pyarrow: Arrow's C++ reads its pool from the environment
# once, at that import, and every k2d process (the daemon, `k2d load`, the benchmarks)
# should allocate from the pool the daemon was measured with.
default_arrow_pool()
