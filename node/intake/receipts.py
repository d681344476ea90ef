"""The C-STORE receiver's receipts: which instance came in with which content, for good.

One SQLite table under `<state>/intake/receipts.sqlite3`: the keyed instance hash, the keyed
hash of the object's bytes and its size, never a UID. A receipt outlives its file: the
intake deletes an original once it is cached or quarantined, and the receipt is what still
tells a re-sent object (the same bytes: nothing to do) from a different object under a
known SOP Instance UID (refused: it would change what the node trains on).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    instance_key TEXT PRIMARY KEY,
    content_key TEXT NOT NULL,
    size INTEGER NOT NULL
);
"""


def receipts_path(state_dir: Path) -> Path:
    """Where the receipts of `state_dir` live."""
    return state_dir / "intake" / "receipts.sqlite3"


class Receipts:
    """The receipts table. Each call opens its own connection, so the receiver's
    association threads share it through SQLite's locking and nothing stays open."""

    def __init__(self, state_dir: Path) -> None:
        self.path = receipts_path(state_dir)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.touch(mode=0o600, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)

    def content_of(self, instance_key: str) -> str | None:
        """The content key received under `instance_key`, or None if it never came in."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT content_key FROM receipts WHERE instance_key = ?", (instance_key,)
            ).fetchone()
        return None if row is None else str(row[0])

    def record(self, instance_key: str, content_key: str, size: int) -> None:
        """Record a receipt, durably; an instance keeps its first content (never replaced)."""
        with self._connect() as conn, conn:
            conn.execute(
                "INSERT OR IGNORE INTO receipts VALUES (?, ?, ?)", (instance_key, content_key, size)
            )

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30.0)
        try:
            # FULL: a receipt is on disk before the sender hears success.
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()
