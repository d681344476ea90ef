"""What the C-STORE receiver keeps of one received object, and what it answers.

pynetdicom has already streamed the object into a temp file (`node.intake.receiver`), so
nothing here holds it in memory. `ReceivedObjects.keep` then, in order:

1. copies it into the received folder under a temp name (a hard link where the temp folder
   is on the same file system), fsynced, hashing its bytes on the way;
2. reads its header, no pixel data, and refuses (0xA900) a dataset whose SOP Class or SOP
   Instance UID is not what its C-STORE request named: it would slip an object in under a
   name the node has not seen, or a class the study cannot use;
3. answers success and writes nothing when the instance came in before with the same
   bytes; refuses (0x0111, duplicate SOP instance) other bytes under a known instance,
   logs it and records it in the audit log (`dicom-refused`): a sender may not change what
   the node trains on;
4. refuses (0xA700, out of resources) an object that would take the objects waiting in the
   received folder past the quota;
5. links it to `<state>/received/<instance_key>.dcm` (a link never replaces a file),
   fsyncs the folder, and records the receipt (`node.intake.receipts`).

A kill at any step leaves no file, or a file without a receipt, which a re-send completes
(step 3 compares with the file when there is no receipt). Logs and the audit log carry the
keyed instance hash, never a UID.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom

from node.intake.phi import instance_key, keyed_hash, load_or_create_site_secret
from node.intake.receipts import Receipts
from node.intake.worker import TEMP_PREFIX
from tessera.governance.audit import AuditLog
from tessera.observability.events import Event
from tessera.observability.logs import log_event

LOGGER = logging.getLogger("tessera.node.receiver")
RECEIVED_DIR = "received"  # under the state folder
STATUS_SUCCESS = 0x0000
STATUS_DUPLICATE_INSTANCE = 0x0111
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Arrival:
    """One C-STORE as pynetdicom delivered it: its temp file and what its request named."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    calling_aet: str


class ReceivedObjects:
    """The received folder, its receipts and its quota (module docstring)."""

    def __init__(
        self, state_dir: Path, quota_bytes: int, classes: frozenset[str], audit_log: Path | None
    ) -> None:
        self.folder = state_dir / RECEIVED_DIR
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.quota_bytes = quota_bytes
        self.classes = classes
        self.audit_log = audit_log
        self.secret = load_or_create_site_secret(state_dir)
        self.receipts = Receipts(state_dir)
        self._lock = threading.Lock()  # one decision at a time: lookup, quota, link, receipt
        for stale in self.folder.glob(f"{TEMP_PREFIX}*"):  # staged by a killed receiver
            stale.unlink(missing_ok=True)

    def keep(self, arrival: Arrival) -> int:
        """Keep `arrival` or refuse it; the DICOM status to answer (module docstring)."""
        uid = arrival.sop_instance_uid
        key = instance_key(uid, self.secret) if uid else "none"
        try:
            with self._staged(arrival.path) as (staged, digest):
                size = staged.stat().st_size
                named = _header_uids(staged)
                if named is None:
                    log_event(LOGGER, Event.RECEIVER_UNREADABLE, logging.WARNING)
                    return STATUS_CANNOT_UNDERSTAND
                if named[1] != uid:  # named by the instance the dataset claims to be
                    claimed = instance_key(named[1], self.secret) if named[1] else "none"
                    self._refuse("uid-mismatch", claimed, size, arrival, record=True)
                    return STATUS_DOES_NOT_MATCH
                if named[0] != arrival.sop_class_uid or named[0] not in self.classes:
                    self._refuse("class-mismatch", key, size, arrival, record=False)
                    return STATUS_DOES_NOT_MATCH
                with self._lock:
                    return self._decide(staged, key, keyed_hash("content", digest, self.secret),
                                        size, arrival)  # fmt: skip
        except OSError as error:
            log_event(LOGGER, Event.RECEIVER_WRITE_FAILED, logging.ERROR, instance=key,
                      error=type(error).__name__)  # fmt: skip
            return STATUS_OUT_OF_RESOURCES

    def _decide(self, staged: Path, key: str, content: str, size: int, arrival: Arrival) -> int:
        final = self.folder / f"{key}.dcm"
        known = self.receipts.content_of(key)
        if known is None and final.exists():  # killed between the link and the receipt
            known = keyed_hash("content", _sha256(final), self.secret)
            self.receipts.record(key, known, final.stat().st_size)
        if known == content:
            log_event(LOGGER, Event.RECEIVER_DUPLICATE, instance=key)
            return STATUS_SUCCESS
        if known is not None:
            self._refuse("overwrite", key, size, arrival, record=True)
            return STATUS_DUPLICATE_INSTANCE
        if self.waiting_bytes() + size > self.quota_bytes:
            self._refuse("quota", key, size, arrival, record=False)
            return STATUS_OUT_OF_RESOURCES
        os.link(staged, final)
        _fsync_folder(self.folder)
        self.receipts.record(key, content, size)
        log_event(LOGGER, Event.RECEIVER_STORED, instance=key, size=size)
        return STATUS_SUCCESS

    def waiting_bytes(self) -> int:
        """Bytes of the received objects the intake has not yet deleted."""
        total = 0
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not entry.name.startswith(TEMP_PREFIX) and entry.is_file():
                    with contextlib.suppress(FileNotFoundError):  # deleted by the intake
                        total += entry.stat().st_size
        return total

    def _refuse(self, reason: str, key: str, size: int, arrival: Arrival, record: bool) -> None:
        log_event(LOGGER, Event.RECEIVER_STORE_REFUSED, logging.WARNING, reason=reason,
                  instance=key, size=size)  # fmt: skip
        if record and self.audit_log is not None:
            # Its own descriptor, so its flock also keeps other threads' appends apart.
            with AuditLog.open(self.audit_log, counts_only=True) as audit:
                audit.append("dicom-refused", {"reason": reason, "instance": key,
                                               "calling_aet": arrival.calling_aet})  # fmt: skip

    @contextlib.contextmanager
    def _staged(self, source: Path) -> Iterator[tuple[Path, str]]:
        """A private, fsynced copy of `source` in the received folder (a hard link when it
        is on the same file system) and the SHA-256 of its bytes; deleted afterwards."""
        staged = self.folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            try:
                os.link(source, staged)
                digest = _sha256(staged)
                with open(staged, "rb") as handle:
                    os.fsync(handle.fileno())
            except OSError:  # another file system (or links not allowed): copy it
                digest = _copy(source, staged)
            yield staged, digest
        finally:
            staged.unlink(missing_ok=True)


def _header_uids(path: Path) -> tuple[str, str] | None:
    """(SOP Class UID, SOP Instance UID) from the dataset's header; None if unreadable.

    Reads no pixel data and defers every large value, so a huge element costs no memory.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=4096,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])  # fmt: skip
        return str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
    except Exception:  # noqa: BLE001 - whatever a sender wrote, it gets a status
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy(source: Path, target: Path) -> str:
    """Copy in chunks to a new owner-only file, fsync it; return the SHA-256 of the bytes."""
    digest = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    with open(source, "rb") as src, os.fdopen(os.open(target, flags, 0o600), "wb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the new name survives a power cut
    finally:
        os.close(descriptor)
