"""The audit log's on-disk format and its verification (writer: `tessera.governance.audit`).

Line n (from 1) is the canonical JSON (`tessera.governance.canonical`) of `{seq: n, time, kind,
fields, prev_hash, hash}`: `prev_hash` is the previous entry's `hash` (64 zeros for the first) and
`hash` is the hex SHA-256 of the canonical JSON of the entry without `hash`. See
`tessera.governance.audit` for what verification guarantees and what it cannot.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError
from tessera.files import atomic_write
from tessera.governance.canonical import canonical_json

GENESIS = "0" * 64
MAX_ENTRY_BYTES = 1 << 20
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


def scan(path: Path, data: bytes) -> tuple[list[AuditEntry], int]:
    """Verify every complete line; return the entries and the length of the torn tail."""
    end = data.rfind(b"\n") + 1
    entries: list[AuditEntry] = []
    previous = GENESIS
    lines = data[:end].split(b"\n")[:-1]
    for number, line in enumerate(lines, start=1):
        obj = _check_line(path, number, line, previous, lines)
        entries.append(
            AuditEntry(number, obj["time"], obj["kind"], obj["fields"], previous, obj["hash"])
        )
        previous = obj["hash"]
    return entries, len(data) - end


def _line_holding(lines: list[bytes], seq: int) -> int | None:
    """The 1-based line whose entry claims `seq`, if any (only asked once a check failed)."""
    for number, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict) and obj.get("seq") == seq:
            return number
    return None


def _check_line(
    path: Path, number: int, line: bytes, previous: str, lines: list[bytes]
) -> dict[str, Any]:
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
    if seq != number:
        elsewhere = _line_holding(lines[number:], number)
        if elsewhere is not None:
            raise bad(
                f"has seq {seq} where {number} was expected, and entry {number} is at line "
                f"{number + elsewhere}: the entries were reordered (moved or swapped)"
            )
        if seq > number:
            raise bad(f"has seq {seq} where {number} was expected: entries before it were deleted")
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
        data = read_all(descriptor)
    finally:
        os.close(descriptor)
    entries, torn = scan(target, data)
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


def read_all(descriptor: int) -> bytes:
    """The whole file behind `descriptor`, from its start."""
    os.lseek(descriptor, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(descriptor, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
