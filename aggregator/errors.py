"""Errors raised by the aggregator package."""

from tessera.errors import TesseraError


class AggregatorError(TesseraError):
    """Base class of the aggregator package's errors."""
