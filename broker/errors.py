"""Errors raised by the broker package.

Each says what failed, the value, and the fix. Refusals by the broker (TLS, ACL) stay
as vague as the broker itself is about them.
"""

from tessera.errors import TesseraError


class BrokerError(TesseraError):
    """Base class of the broker package's errors."""


class TopicError(BrokerError, ValueError):
    """A site id, study id or topic does not fit the topic schema."""


class NotConnectedError(BrokerError):
    """The session is not connected to the broker (yet, or any more)."""


class NotAuthorizedError(BrokerError):
    """The broker refused a publish or subscribe (MQTT v5 reason code 135, or 0x87 on SUBACK)."""


class PublishError(BrokerError):
    """The broker did not accept a publish, or it could not be queued."""


class PublishTimeoutError(PublishError):
    """No acknowledgement within the time waited; the publish stays queued in the session."""


class PayloadTooLargeError(BrokerError, ValueError):
    """A payload or a frame is over a configured size limit."""


class DeliveryDeferred(BrokerError):
    """A handler cannot take a message now for a reason of its own host, not of the message
    (its spool folder is missing, the disk is full). The session leaves the message
    unacknowledged, so the broker keeps it, and offers it to the handler again."""


class SpoolError(DeliveryDeferred):
    """A large transfer's spool file could not be created, written or read back."""


class ChunkError(BrokerError, ValueError):
    """A chunk frame is malformed, conflicts with an earlier chunk, or breaks a limit."""


class ProvisioningError(BrokerError):
    """Provisioning cannot proceed without losing or silently replacing something."""
