"""vtrace's version, in one place that imports nothing (the package, the store and the CLI
read it from here)."""

__version__ = "0.1.0"
