"""The append-only, hash-chained audit log kept by every node and every aggregator.

Format: JSON lines. Line n (from 1) is the canonical JSON (`tessera.governance.canonical`) of
`{seq: n, time, kind, fields, prev_hash, hash}`, where `prev_hash` is the previous entry's
`hash` (64 zeros for the first) and `hash` is the hex SHA-256 of the canonical JSON of the
entry without `hash`. `time` is UTC, ISO 8601 with milliseconds; it is recorded, not checked
(clocks jump).

Guarantees of `verify`: an entry modified, deleted, inserted or moved anywhere before the
last one, or a line edited by hand, is detected, and the error names the first line that is
not consistent with the lines before it (`AuditVerificationError.line`). An entry rewritten
together with its own hash shows up at the next line, whose `prev_hash` no longer matches.

An entry found at another line than its seq (two entries swapped, one moved) is named as a
reorder, not as a deletion.

Limitation: a chain only proves what it contains. Whoever can write the file can delete the
last entries, or rewrite a whole suffix consistently (every hash recomputed), and no check
of the file alone can notice: `tessera audit verify` says so whenever no anchor is given. An
**anchor** (the latest `seq:hash`, kept somewhere that attacker cannot write: a second
volume, the log collector, a printout) closes that gap: `verify(path, anchor)` fails if the
anchored entry is missing or different. Every new entry's anchor goes to `on_anchor` and,
with `anchor_path`, is appended to that file (`tessera.governance.audit_anchors`);
`open_service_audit` is what the daemons open: their anchors go to the JSON log stream
(`audit-anchor`), out of the service's reach.

Durability: each entry is one `write` of one complete line, then fsync, under an exclusive
`flock`, so concurrent writers (processes or objects) never interleave and a reader holding
the shared lock sees whole entries. A crash can only leave an incomplete *last* line; the
next `AuditLog.open` cuts it off and records a `recovery` entry saying how many bytes went.
A log whose complete lines do not verify is refused (fail closed): move it aside to keep it
as evidence, and start a new one.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from tessera.governance.audit_anchors import AnchorTrail
from tessera.governance.audit_chain import (
    GENESIS,
    MAX_ENTRY_BYTES,
    Anchor,
    AuditEntry,
    AuditVerificationError,
    VerifyResult,
    entry_hash,
    export,
    read_all,
    read_entries,
    scan,
    verify,
)
from tessera.governance.canonical import canonical_json
from tessera.observability.events import Event

__all__ = [
    "COUNT_ONLY_KINDS",
    "GENESIS",
    "KINDS",
    "MAX_ENTRY_BYTES",
    "REQUIRED_FIELDS",
    "Anchor",
    "AuditEntry",
    "AuditLog",
    "AuditVerificationError",
    "VerifyResult",
    "entry_hash",
    "epsilon_by_study",
    "export",
    "open_service_audit",
    "read_entries",
    "verify",
]

# What the log records. `recovery` is written by the log itself.
KINDS = frozenset(
    {"round-opened", "round-joined", "round-refused", "round-aborted", "participant-set"}
    | {"release", "strategy-switch", "epsilon-spent", "key-change", "manifest-change"}
    | {"approval-change", "policy-change", "quarantine", "privacy-audit", "recovery"}
    | {"dicom-refused"}  # a C-STORE that would have replaced a received object: tampering
    | {"ledger-rebuilt"}
    | {"state-rebuilt"}
    | {"share-received", "share-not-received", "intake-throttled"}
)
# On a node these kinds may carry counts and scalars only, never a list of who or what.
COUNT_ONLY_KINDS = frozenset({"participant-set", "quarantine"})
# Fields some kinds must carry, so that logs can be summed and compared with the ledger.
REQUIRED_FIELDS = {
    "epsilon-spent": ("study_id", "round", "epsilon"),
    "round-refused": ("study_id", "round", "reason"),
}


def epsilon_by_study(entries: Iterable[AuditEntry]) -> dict[str, float]:
    """Total epsilon that `epsilon-spent` entries record, per study id (to compare with the
    privacy ledger after a run)."""
    totals: dict[str, float] = {}
    for entry in entries:
        if entry.kind == "epsilon-spent":
            study = str(entry.fields["study_id"])
            totals[study] = totals.get(study, 0.0) + float(entry.fields["epsilon"])
    return totals


def _is_amount(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value >= 0


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AuditLog:
    """A writer of one audit log. Open with `AuditLog.open(path)`; close it (or use `with`).

    `counts_only=True` (nodes) refuses lists and tables in `participant-set` and `quarantine`
    entries, so a node's log cannot name who took part or which file was quarantined.
    Whenever the chain has moved (at open, after each append, at `catch_up`), its anchor goes
    to `on_anchor` and, with `anchor_path`, is appended to that file, which must lie outside
    the log's folder (`tessera.governance.audit_anchors`).
    """

    def __init__(
        self,
        path: Path,
        descriptor: int,
        counts_only: bool,
        clock: Callable[[], dt.datetime],
        anchors: tuple[AnchorTrail | None, Callable[[Anchor], None] | None],
    ) -> None:
        self.path = path
        self._fd = descriptor
        self._counts_only = counts_only
        self._clock = clock
        self._trail, self._on_anchor = anchors
        self._anchored = 0  # the seq whose anchor went out last
        self._size = -1
        self._seq = 0
        self._last = GENESIS
        self.recovered_bytes = 0

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        counts_only: bool = False,
        clock: Callable[[], dt.datetime] = _utc_now,
        anchor_path: str | os.PathLike[str] | None = None,
        on_anchor: Callable[[Anchor], None] | None = None,
    ) -> AuditLog:
        """Open (creating if needed) and verify the log, cutting off a torn last line.

        Raises AuditVerificationError if the complete lines do not verify: the writer never
        appends to a broken chain; ValueError for an `anchor_path` in the log's folder.
        """
        target = Path(path)
        trail = AnchorTrail(Path(anchor_path), target) if anchor_path else None
        created = not target.exists()
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        descriptor = os.open(target, flags, 0o640)
        if created:  # make the new file's name durable too, not only its bytes
            _fsync_folder(target.parent)
        log = cls(target, descriptor, counts_only, clock, (trail, on_anchor))
        try:
            with log._locked():
                torn = log._sync()
                log.recovered_bytes = torn
                if torn:
                    log._write_entry("recovery", {"truncated_bytes": torn, "reason": "torn write"})
                log._send_anchor()
        except BaseException:
            log.close()
            raise
        return log

    def append(self, kind: str, fields: Mapping[str, Any]) -> AuditEntry:
        """Append one entry durably (one write, flush, fsync) and return it.

        ValueError (with the fix) for an unknown kind, fields JSON cannot hold canonically,
        an entry over MAX_ENTRY_BYTES, a missing REQUIRED_FIELDS entry, a negative or
        non-numeric `epsilon`, or a list in a count-only kind on a node.
        """
        if kind not in KINDS or kind == "recovery":
            raise ValueError(
                f"unknown audit kind {kind!r}; use one of {sorted(KINDS - {'recovery'})}"
            )
        missing = [name for name in REQUIRED_FIELDS.get(kind, ()) if name not in fields]
        if missing:
            raise ValueError(f"{kind} entries need the fields {missing}; add them")
        if kind == "epsilon-spent" and not _is_amount(fields["epsilon"]):
            raise ValueError(f"epsilon must be a finite number >= 0, got {fields['epsilon']!r}")
        if self._counts_only and kind in COUNT_ONLY_KINDS:
            for name, value in fields.items():
                if isinstance(value, (list, tuple, dict)):
                    raise ValueError(
                        f"{kind} field {name!r} is a list or table; a node records counts "
                        f"only: write e.g. {name}_count = {len(value)}"
                    )
        with self._locked():
            self._sync()
            return self._write_entry(kind, dict(fields))

    def anchor(self) -> Anchor:
        """The latest entry's seq and hash (seq 0 and 64 zeros for an empty log)."""
        return Anchor(self._seq, self._last)

    def catch_up(self) -> Anchor:
        """Read what other writers appended (the C-STORE receiver, a command-line tool) and,
        if the chain moved, send its anchor out; the latest anchor."""
        with self._locked():
            self._sync()
            self._send_anchor()
        return self.anchor()

    def close(self) -> None:
        """Release the file; appending afterwards raises."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._trail is not None:
            self._trail.close()

    def _send_anchor(self) -> None:
        """Under the lock: the latest anchor to the trail and `on_anchor`, once per seq."""
        if self._seq == self._anchored:
            return
        anchor = self.anchor()
        if self._on_anchor is not None:
            self._on_anchor(anchor)
        if self._trail is not None:
            try:
                self._trail.append(anchor)
            except OSError as error:  # the entry is written; the next anchor supersedes
                fields = {"path": str(self._trail.path), "error_type": type(error).__name__}
                _anchor_log.warning(Event.AUDIT_ANCHOR_NOT_WRITTEN, extra={"fields": fields})
        self._anchored = self._seq

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def _locked(self) -> _Lock:
        if self._fd < 0:
            raise ValueError(f"audit log {self.path} is closed; open it again")
        return _Lock(self._fd)

    def _sync(self) -> int:
        """Under the lock: catch up with other writers, cut a torn tail, verify. Returns the
        number of torn bytes cut off."""
        size = os.fstat(self._fd).st_size
        if size == self._size:
            return 0
        data = read_all(self._fd)
        entries, torn = scan(self.path, data)
        if torn:
            os.ftruncate(self._fd, len(data) - torn)
            os.fsync(self._fd)
        self._size = len(data) - torn
        self._seq = entries[-1].seq if entries else 0
        self._last = entries[-1].hash if entries else GENESIS
        return torn

    def _write_entry(self, kind: str, fields: dict[str, Any]) -> AuditEntry:
        seq = self._seq + 1
        moment = self._clock().astimezone(dt.UTC)
        time = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        try:
            digest = entry_hash(seq, time, kind, fields, self._last)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"audit fields for {kind} must be JSON (str keys; str, int, finite float, "
                f"bool, None, lists, tables): {error}"
            ) from None
        entry = AuditEntry(seq, time, kind, fields, self._last, digest)
        line = canonical_json(entry.as_dict()) + b"\n"
        if len(line) > MAX_ENTRY_BYTES:
            raise ValueError(
                f"audit entry of {len(line)} bytes is over {MAX_ENTRY_BYTES}; record counts "
                "and hashes, not payloads"
            )
        try:
            view = memoryview(line)
            while view:  # one write in practice; the loop covers a short write
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except BaseException:
            # Never leave a partial line that the next entry would be glued onto.
            os.ftruncate(self._fd, self._size)
            raise
        self._size += len(line)
        self._seq, self._last = seq, digest
        self._send_anchor()
        return entry


_anchor_log = logging.getLogger("tessera.audit")


def _log_anchor(anchor: Anchor) -> None:
    _anchor_log.info(Event.AUDIT_ANCHOR, extra={"fields": {"anchor": anchor.to_text()}})


def open_service_audit(
    path: str | os.PathLike[str],
    *,
    counts_only: bool = False,
    anchor_file: str | os.PathLike[str] | None = None,
) -> AuditLog:
    """The audit log a daemon keeps. Each new anchor is logged as `audit-anchor` (JSON on
    stderr: the site's log collector takes it beyond the service's reach) and, with
    `anchor_file`, appended to that file, which must lie outside the log's folder.
    `tessera audit verify LOG --anchor SEQ:HASH` then detects a deleted tail."""
    return AuditLog.open(path, counts_only=counts_only, anchor_path=anchor_file,
                         on_anchor=_log_anchor)  # fmt: skip


class _Lock:
    """An exclusive flock held for one append (or the open-time recovery)."""

    def __init__(self, descriptor: int) -> None:
        self._fd = descriptor

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
