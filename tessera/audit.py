"""The append-only, hash-chained audit log kept by every node and every aggregator.

Format: JSON lines. Line n (from 1) is the canonical JSON (`tessera.canonical`) of
`{seq: n, time, kind, fields, prev_hash, hash}`, where `prev_hash` is the previous entry's
`hash` (64 zeros for the first) and `hash` is the hex SHA-256 of the canonical JSON of the
entry without `hash`. `time` is UTC, ISO 8601 with milliseconds; it is recorded, not checked
(clocks jump).

Guarantees of `verify`: an entry modified, deleted, inserted or moved anywhere before the
last one, or a line edited by hand, is detected, and the error names the first line that is
not consistent with the lines before it (`AuditVerificationError.line`). An entry rewritten
together with its own hash shows up at the next line, whose `prev_hash` no longer matches.

Limitation: a chain only proves what it contains. Whoever can write the file can delete the
last entries, or rewrite a whole suffix consistently, and no check of the file alone can
notice. An **anchor** (the latest `seq:hash`, kept somewhere that attacker cannot write: a
second volume, the aggregators, a printout) closes that gap: `verify(path, anchor)` fails if
the anchored entry is missing or different. `AuditLog(anchor_path=...)` keeps one up to date.

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
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tessera.canonical import canonical_json
from tessera.errors import TesseraError
from tessera.files import atomic_write

GENESIS = "0" * 64
MAX_ENTRY_BYTES = 1 << 20
# What the log records. `recovery` is written by the log itself.
KINDS = frozenset(
    {
        "round-opened",
        "round-joined",
        "round-refused",
        "round-aborted",
        "participant-set",
        "release",
        "strategy-switch",
        "epsilon-spent",
        "key-change",
        "manifest-change",
        "approval-change",
        "policy-change",
        "quarantine",
        "recovery",
    }
)
# On a node these kinds may carry counts and scalars only, never a list of who or what.
COUNT_ONLY_KINDS = frozenset({"participant-set", "quarantine"})
_KEYS = {"seq", "time", "kind", "fields", "prev_hash", "hash"}


class AuditVerificationError(TesseraError):
    """The log is not an unbroken chain; `line` is the first inconsistent line (1-based)."""

    def __init__(self, path: Path, line: int, problem: str) -> None:
        super().__init__(f"audit log {path}: line {line}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class AuditEntry:
    """One verified entry of the log."""

    seq: int
    time: str
    kind: str
    fields: Mapping[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        """The entry as the JSON object stored on its line."""
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "fields": dict(self.fields),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class Anchor:
    """The latest entry's seq and hash, kept apart from the log to detect a cut-off tail."""

    seq: int
    hash: str

    def to_text(self) -> str:
        """`SEQ:HASH`, the form `tessera audit verify --anchor` takes."""
        return f"{self.seq}:{self.hash}"

    @classmethod
    def from_text(cls, text: str) -> Anchor:
        """Parse `SEQ:HASH`; ValueError with the expected form otherwise."""
        seq, _, digest = text.strip().partition(":")
        if not seq.isdigit() or len(digest) != 64 or not _is_hex(digest):
            raise ValueError(f"anchor {text!r} is not SEQ:HASH (e.g. 42:<64 hex digits>)")
        return cls(int(seq), digest)


def entry_hash(seq: int, time: str, kind: str, fields: Mapping[str, Any], prev_hash: str) -> str:
    """The hex SHA-256 that chains an entry: over the canonical JSON of all but `hash`."""
    body = {"seq": seq, "time": time, "kind": kind, "fields": fields, "prev_hash": prev_hash}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _scan(path: Path, data: bytes) -> tuple[list[AuditEntry], int]:
    """Verify every complete line; return the entries and the length of the torn tail."""
    end = data.rfind(b"\n") + 1
    entries: list[AuditEntry] = []
    previous = GENESIS
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        obj = _check_line(path, number, line, previous)
        entries.append(
            AuditEntry(number, obj["time"], obj["kind"], obj["fields"], previous, obj["hash"])
        )
        previous = obj["hash"]
    return entries, len(data) - end


def _check_line(path: Path, number: int, line: bytes, previous: str) -> dict[str, Any]:
    """One line's checks, in the order that names the most likely tampering."""

    def bad(problem: str) -> AuditVerificationError:
        return AuditVerificationError(path, number, problem)

    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad("not a JSON entry (the line was damaged or edited)") from None
    if not isinstance(obj, dict) or set(obj) != _KEYS:
        raise bad(f"not an audit entry: expected exactly the keys {sorted(_KEYS)}")
    seq, digest, prev = obj["seq"], obj["hash"], obj["prev_hash"]
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise bad(f"seq {seq!r} is not an integer")
    if not (isinstance(obj["fields"], dict) and isinstance(obj["kind"], str)):
        raise bad("kind must be a string and fields an object")
    if not (isinstance(obj["time"], str) and isinstance(digest, str)):
        raise bad("time and hash must be strings")
    if not isinstance(prev, str):
        raise bad("prev_hash must be a string")
    try:
        canonical = canonical_json(obj)
    except ValueError:
        raise bad("holds a value JSON cannot represent canonically") from None
    if canonical != line:
        raise bad("is not in canonical form: the line was edited")
    if seq > number:
        raise bad(f"has seq {seq} where {number} was expected: entries before it were deleted")
    if seq < number:
        raise bad(f"has seq {seq} where {number} was expected: it was inserted or moved")
    if prev != previous:
        raise bad(
            "does not chain to the entry before it (prev_hash differs): an entry was "
            "inserted, deleted, rewritten or moved"
        )
    if entry_hash(seq, obj["time"], obj["kind"], obj["fields"], prev) != digest:
        raise bad(f"entry {seq} does not match its hash: it was modified")
    return obj


@dataclass(frozen=True)
class VerifyResult:
    """What a successful `verify` saw: the entry count and the anchor of the last entry."""

    entries: int
    last: Anchor | None


def read_entries(path: str | os.PathLike[str], anchor: Anchor | None = None) -> list[AuditEntry]:
    """Every entry of a log that verifies (see `verify`); AuditVerificationError otherwise."""
    target = Path(path)
    try:
        descriptor = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AuditVerificationError(target, 0, "the file does not exist; check the path") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH)  # whole entries only, never a half-written one
        data = _read_all(descriptor)
    finally:
        os.close(descriptor)
    entries, torn = _scan(target, data)
    if torn:
        raise AuditVerificationError(
            target,
            len(entries) + 1,
            f"incomplete last entry ({torn} bytes without a newline): a write was interrupted; "
            "opening the log for writing cuts it off and records a recovery entry",
        )
    if anchor is not None:
        if anchor.seq > len(entries):
            raise AuditVerificationError(
                target,
                len(entries) + 1,
                f"the log ends at seq {len(entries)} but the anchor names seq {anchor.seq}: "
                "the last entries were deleted",
            )
        if anchor.seq >= 1 and entries[anchor.seq - 1].hash != anchor.hash:
            raise AuditVerificationError(
                target, anchor.seq, "differs from the anchored hash: the log was rewritten"
            )
    return entries


def verify(path: str | os.PathLike[str], anchor: Anchor | None = None) -> VerifyResult:
    """Check the whole chain (and the anchor, if given); raise AuditVerificationError naming
    the first bad line. Never returns a failure value."""
    entries = read_entries(path, anchor)
    last = Anchor(entries[-1].seq, entries[-1].hash) if entries else None
    return VerifyResult(len(entries), last)


def export(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    kinds: Iterable[str] | None = None,
    anchor: Anchor | None = None,
) -> int:
    """Verify the log, then write its entries (only `kinds`, if given) as JSON lines to `out`,
    atomically. Returns the number written. A log that does not verify is not exported."""
    wanted = set(kinds) if kinds is not None else None
    selected = [e for e in read_entries(path, anchor) if wanted is None or e.kind in wanted]
    atomic_write(out, b"".join(canonical_json(e.as_dict()) + b"\n" for e in selected))
    return len(selected)


def _read_all(descriptor: int) -> bytes:
    os.lseek(descriptor, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(descriptor, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AuditLog:
    """A writer of one audit log. Open with `AuditLog.open(path)`; close it (or use `with`).

    `counts_only=True` (nodes) refuses lists and tables in `participant-set` and `quarantine`
    entries, so a node's log cannot name who took part or which file was quarantined.
    `anchor_path`, if given, is rewritten atomically with the latest `seq:hash` after each
    append; keep it where whoever can edit the log cannot.
    """

    def __init__(
        self,
        path: Path,
        descriptor: int,
        counts_only: bool,
        clock: Callable[[], dt.datetime],
        anchor_path: Path | None,
    ) -> None:
        self.path = path
        self._fd = descriptor
        self._counts_only = counts_only
        self._clock = clock
        self._anchor_path = anchor_path
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
    ) -> AuditLog:
        """Open (creating if needed) and verify the log, cutting off a torn last line.

        Raises AuditVerificationError if the complete lines do not verify: the writer never
        appends to a broken chain.
        """
        target = Path(path)
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        descriptor = os.open(target, flags, 0o640)
        log = cls(
            target, descriptor, counts_only, clock, Path(anchor_path) if anchor_path else None
        )
        try:
            with log._locked():
                torn = log._sync()
                log.recovered_bytes = torn
                if torn:
                    log._write_entry("recovery", {"truncated_bytes": torn, "reason": "torn write"})
        except BaseException:
            os.close(descriptor)
            raise
        return log

    def append(self, kind: str, fields: Mapping[str, Any]) -> AuditEntry:
        """Append one entry durably (one write, flush, fsync) and return it.

        ValueError (with the fix) for an unknown kind, fields JSON cannot hold canonically,
        an entry over MAX_ENTRY_BYTES, or a list in a count-only kind on a node.
        """
        if kind not in KINDS or kind == "recovery":
            raise ValueError(
                f"unknown audit kind {kind!r}; use one of {sorted(KINDS - {'recovery'})}"
            )
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

    def close(self) -> None:
        """Release the file; appending afterwards raises."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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
        data = _read_all(self._fd)
        entries, torn = _scan(self.path, data)
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
        if self._anchor_path is not None:
            atomic_write(self._anchor_path, (self.anchor().to_text() + "\n").encode("ascii"))
        return entry


class _Lock:
    """An exclusive flock held for one append (or the open-time recovery)."""

    def __init__(self, descriptor: int) -> None:
        self._fd = descriptor

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
