"""Tessera's shared core: what node and aggregator must agree on bit for bit."""

__version__ = "0.1.0"
