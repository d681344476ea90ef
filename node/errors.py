"""Errors raised by the node package."""

from tessera.errors import TesseraError


class NodeError(TesseraError):
    """Base class of the node package's errors."""


class UnusableImageError(NodeError):
    """A DICOM object the node cannot use; `reason` is a quarantine reason code.

    The message never carries patient data: it is built from the node's own words and
    numbers (sizes, transfer syntax names), never from a DICOM element's value or a path.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
