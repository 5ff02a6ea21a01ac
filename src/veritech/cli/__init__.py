"""Command-line entry points: ``veritech`` and ``cyclone``."""
