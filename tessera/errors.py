"""The core's errors.

Authentication failures are deliberately vague; the rest say what failed and how to fix it.
"""


class TesseraError(Exception):
    """Base class of every error Tessera raises on purpose."""


class CodecError(TesseraError, ValueError):
    """Bytes that are not a well-formed message of this protocol version."""


class AuthenticationError(TesseraError):
    """A signature, seal or hash did not verify. Says nothing more, on purpose."""


class ConfigError(TesseraError, ValueError):
    """A configuration value is missing or out of range; the message names it and the fix."""
