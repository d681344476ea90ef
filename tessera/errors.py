"""The core's errors.

Authentication failures are deliberately vague; the rest say what failed and how to fix it.
"""

import errno


class TesseraError(Exception):
    """Base class of every error Tessera raises on purpose."""


class CodecError(TesseraError, ValueError):
    """Bytes that are not a well-formed message of this protocol version."""


class AuthenticationError(TesseraError):
    """A signature, seal or hash did not verify. Says nothing more, on purpose."""


class ConfigError(TesseraError, ValueError):
    """A configuration value is missing or out of range; the message names it and the fix."""


class DiskFull(TesseraError, OSError):
    """A write found no space on the file system that holds `path`: ENOSPC or EDQUOT, or
    SQLite's SQLITE_FULL, or its "disk I/O error" while that file system is full
    (`tessera.files.disk_full_error` decides, in one place). The message names the folder,
    about how many bytes the write needed, how many are free, and the fix. It is an OSError
    (errno ENOSPC), so code that already handles a failed write still does."""

    def __init__(self, path: str, needed: int, free: int) -> None:
        self.path, self.needed, self.free = path, needed, free
        self.message = (
            f"disk full: {path}, needs about {needed} bytes, free {free}; free space on that "
            "file system or give it more (the service waits, not ready, and resumes by itself)"
        )
        super().__init__(errno.ENOSPC, self.message)

    def __str__(self) -> str:
        return self.message
