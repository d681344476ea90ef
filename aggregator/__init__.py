"""Tessera aggregator."""
