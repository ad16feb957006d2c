"""The one compiled part of k2d, beside pyproject.toml (which holds everything else).

optional=True: without a C compiler the install goes on, and k2d's Binance parser takes
every batch in Python (the same rows, more CPU a frame; k2d/venues/binance.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "k2d.venues._binance_scan",
            ["k2d/venues/_binance_scan.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
