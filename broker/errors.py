"""Errors raised by the broker package."""

from tessera.errors import TesseraError


class BrokerError(TesseraError):
    """Base class of the broker package's errors."""
