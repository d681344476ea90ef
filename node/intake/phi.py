"""Keyed hashes that name instances, studies and paths without revealing them.

A SOP Instance UID, a path or an accession number can identify a patient. Wherever the node
must name one (index, logs, ledger, file names), it writes HMAC-SHA256 under a per-site
secret instead. Without the secret the hash cannot be linked back, not even by someone who
guesses candidate UIDs; with it, the hospital can still re-identify its own files.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from node.errors import NodeError

SECRET_FILE = "site-secret.key"  # noqa: S105 - a file name, not a secret
SECRET_BYTES = 32
# Domain tags keep a UID's hash distinct from the same string hashed as a path or accession.
_DOMAINS = ("instance", "study", "accession", "path", "content")


def keyed_hash(domain: str, value: str, secret: bytes) -> str:
    """HMAC-SHA256 of `value` in `domain` under `secret`, as 32 hex characters (128 bits)."""
    if domain not in _DOMAINS:
        raise ValueError(f"unknown keyed-hash domain {domain!r}; use one of {_DOMAINS}")
    if len(secret) < 16:
        raise ValueError(f"site secret is {len(secret)} bytes; it must be at least 16")
    mac = hmac.new(secret, f"tessera/{domain}\x00{value.strip()}".encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


def instance_key(sop_instance_uid: str, secret: bytes) -> str:
    """The keyed hash that names one DICOM instance everywhere in the node."""
    return keyed_hash("instance", sop_instance_uid, secret)


def load_or_create_site_secret(state_dir: Path) -> bytes:
    """Read the site secret from `state_dir`, creating it (mode 0600) on first use.

    Refuses a secret file that group or others can read: the keyed hashes are only as
    private as this file.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / SECRET_FILE
    if not path.exists():
        # Write a temp file, then hard-link it into place: the link fails if another
        # process won the race, and nobody ever sees a half-written secret.
        tmp = state_dir / f".{SECRET_FILE}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(SECRET_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise NodeError(
            f"site secret {path} has mode {mode:o}; it must be readable by its owner only. "
            f"Fix: chmod 600 {path}"
        )
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise NodeError(
            f"site secret {path} holds {len(secret)} bytes, expected {SECRET_BYTES}; it is "
            "damaged. Restore it from backup (deleting it re-keys every hash in the index)."
        )
    return secret
