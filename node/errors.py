"""Errors raised by the node package."""

from tessera.errors import TesseraError


class NodeError(TesseraError):
    """Base class of the node package's errors."""
