"""Atomic file writes, and the private-file rules that key files follow.

A write either leaves the old file or the complete new one on disk, never a torn mix: the
bytes go to a temporary file in the same folder, are flushed to the disk (fsync), and then
replace the target with one `os.replace`. The folder is fsynced too, so the rename itself
survives a power cut. A private file (a key) is created with mode 0600 from its very first
byte: `os.open` sets the mode at creation, so there is no window in which another user could
open it.

A full disk is recognised here, in one place (`disk_full_error`): ENOSPC and EDQUOT, and
SQLite's SQLITE_FULL, or its "disk I/O error" while the file system has less free than the
write needed, become one `DiskFull` naming the folder, the space needed and the space free.
`atomic_write` raises it itself. `DiskWatch` is what a daemon keeps while its disk is full:
its readiness says why, and it tells the daemon when enough space is back to resume.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import threading
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from tessera.errors import ConfigError, DiskFull
from tessera.limits import DISK_RESERVE_BYTES
from tessera.observability.events import Event

PRIVATE_MODE = 0o600
log = logging.getLogger("tessera.files")

Key = TypeVar("Key")


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | memoryview,
    mode: int = 0o644,
    *,
    durable: bool = True,
) -> None:
    """Replace `path` with `data` atomically; a crash leaves the old or the new file, whole.

    The new file gets exactly `mode` (not filtered by the umask). Callers must never write
    secrets with this function's default mode; use `write_private_file`. `durable=False`
    skips both fsyncs: still atomic against a killed process, but a power cut may lose the
    file; only for data that is worthless after a crash anyway.
    """
    target = Path(path)
    folder = target.parent
    # A random name in the same folder: the same file system (so os.replace is atomic), and
    # O_EXCL refuses to reuse a name that an attacker or a crashed run left behind.
    temporary = folder / f".{target.name}.{secrets.token_hex(8)}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(descriptor, mode)
            view = memoryview(data)
            while view:
                written = os.write(descriptor, view)
                view = view[written:]
            if durable:
                os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, target)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        full = disk_full_error(error, folder, len(data))
        if full is not None:
            raise full from None
        raise
    if durable:
        _fsync_folder(folder)


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a secret atomically with mode 0600 (owner read and write, nobody else)."""
    atomic_write(path, data, mode=PRIVATE_MODE)


def read_private_file(path: str | os.PathLike[str], what: str) -> bytes:
    """Read a secret, refusing it when group or others may read or write it.

    `what` names the file in error messages ("signing key"). Raises ConfigError with the fix
    when the file is missing, is not a regular file, or is too open.
    """
    target = Path(path)
    try:
        status = target.stat()
    except FileNotFoundError:
        raise ConfigError(
            f"{what} {target} does not exist; create it with `tessera provision` "
            "or point the configuration at the right file"
        ) from None
    if not stat.S_ISREG(status.st_mode):
        raise ConfigError(f"{what} {target} is not a regular file; point at the key file itself")
    loose = stat.S_IMODE(status.st_mode) & 0o077
    if loose:
        raise ConfigError(
            f"{what} {target} has mode {stat.S_IMODE(status.st_mode):04o}, so other users may "
            f"read it; run `chmod 600 {target}` (and rotate the key if others could read it)"
        )
    return target.read_bytes()


PRIVATE_DIR_MODE = 0o700


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` and any missing parents with mode 0700, and return it.

    An existing folder that group or others may enter is narrowed to 0700 where this user
    owns it; a folder owned by someone else (a mount point) is left as it is, since the
    files inside are private (0600) anyway.
    """
    target = Path(path)
    missing = []
    for folder in (target, *target.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
    status = target.stat()
    if stat.S_IMODE(status.st_mode) & 0o077 and status.st_uid == os.getuid():
        os.chmod(target, PRIVATE_DIR_MODE)
    return target


def make_private_file(path: str | os.PathLike[str]) -> Path:
    """Create `path` empty with mode 0600 if it does not exist, or narrow it to 0600 if it
    does (for files another library then opens, such as a SQLite database)."""
    target = Path(path)
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, PRIVATE_MODE)
    try:
        os.fchmod(descriptor, PRIVATE_MODE)
    finally:
        os.close(descriptor)
    return target


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; skipped where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        # Some file systems (and all of Windows) refuse fsync on a folder; the data itself
        # is already durable, only the rename's durability is best effort there.
        pass
    finally:
        os.close(descriptor)


def load_private_pem(
    path: str | os.PathLike[str], what: str, key_type: type[Key], algorithm: str
) -> Key:
    """Load an unencrypted PEM private key of `key_type` from a private (0600) file.

    Raises ConfigError, naming `what` and the fix, when the file is missing, readable by
    others, not PEM, or a key of another algorithm.
    """
    pem = read_private_file(path, what)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{what} {path} is not an unencrypted PEM private key; "
            "regenerate it with `tessera provision`"
        ) from None
    if not isinstance(key, key_type):
        raise ConfigError(
            f"{what} {path} is a {type(key).__name__}, not {algorithm}; "
            "regenerate it with `tessera provision`"
        )
    return key


# SQLite's primary result codes (the low byte of its extended codes).
_SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 10, 13, 14


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the file system that holds `path`
    (or its nearest existing parent)."""
    target = Path(path)
    while not target.exists() and target != target.parent:
        target = target.parent
    status = os.statvfs(target)
    return status.f_bavail * status.f_frsize


def disk_full_error(
    error: BaseException, path: str | os.PathLike[str], needed: int = DISK_RESERVE_BYTES
) -> DiskFull | None:
    """The DiskFull that `error` means, for a write of about `needed` bytes under `path`;
    None when `error` is not about space.

    ENOSPC and EDQUOT always are; so is SQLite's SQLITE_FULL ("database or disk is full").
    SQLite reports a file it could not grow or map (its -shm on a full disk) as a "disk I/O
    error" (SQLITE_IOERR) or "unable to open database file" (SQLITE_CANTOPEN): those are
    taken as a full disk only while less than `needed` is free, else they are left as they
    are (a failing disk is another problem).
    """
    if isinstance(error, DiskFull):
        return error
    where = str(path)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(where, needed, free_bytes(where))
    code = getattr(error, "sqlite_errorcode", None)
    if not isinstance(code, int):
        return None
    free = free_bytes(where)
    if code & 0xFF == _SQLITE_FULL or (
        code & 0xFF in (_SQLITE_IOERR, _SQLITE_CANTOPEN) and free < needed
    ):
        return DiskFull(where, needed, free)
    return None


class DiskWatch:
    """What a service keeps while a write found its disk full, until the space is back.

    `note` records the failure (logged once per episode, as `disk-full`); the service then
    reports not ready (`readiness` gives the sentence) and stops starting new work; `poll`
    says when at least `max(needed, reserve)` bytes are free again (logged as
    `disk-space-returned`), and the service retries what failed. Thread-safe.
    """

    def __init__(self, reserve: int = DISK_RESERVE_BYTES) -> None:
        self.reserve = reserve
        self._lock = threading.Lock()
        self._problem: DiskFull | None = None

    @property
    def full(self) -> bool:
        """True from a noted failure until `poll` finds the space back."""
        with self._lock:
            return self._problem is not None

    def note(self, full: DiskFull) -> None:
        """Record a write that found no space (the largest need counts)."""
        with self._lock:
            previous = self._problem
            needed = max(full.needed, self.reserve, previous.needed if previous else 0)
            self._problem = DiskFull(full.path, needed, full.free)
            first = previous is None
        if first:
            reason = str(DiskFull(full.path, needed, full.free))
            fields = {"path": full.path, "needed_bytes": needed, "free_bytes": full.free,
                      "reason": reason}  # fmt: skip
            log.error(Event.DISK_FULL, extra={"fields": fields})

    def poll(self) -> bool:
        """True when a failure was noted and enough space is free again (the episode ends
        here: the caller resumes); False otherwise."""
        with self._lock:
            problem = self._problem
        if problem is None or free_bytes(problem.path) < problem.needed:
            return False
        self.clear()
        return True

    def clear(self) -> None:
        """End the episode: the space is back, or the write that failed has now succeeded."""
        with self._lock:
            problem, self._problem = self._problem, None
        if problem is not None:
            fields = {"path": problem.path, "free_bytes": free_bytes(problem.path)}
            log.warning(Event.DISK_SPACE_RETURNED, extra={"fields": fields})

    def readiness(self) -> bool | str:
        """True, or the sentence that says what is full (with the space free now)."""
        with self._lock:
            problem = self._problem
        if problem is None:
            return True
        return str(DiskFull(problem.path, problem.needed, free_bytes(problem.path)))
