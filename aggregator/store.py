"""The aggregator's durable state: SQLite in WAL mode, with synchronous=FULL.

What it keeps: rounds (stage, base model, ring parameters, deadline, participants, abort
reason), the shares received per round (node, kind, the seed or the path of the full-share
file, the envelope digest), the fact that a partial sum was published for a round, the
server optimiser's state, and the model registry rows (registry.py writes the files). The
tables, and how the database is opened, are in store_schema.py; the queries are here.

Ordering rules that make a crash harmless:

- A file (a full share, a model, the optimiser state) is written atomically and fsynced
  *before* the row that names it is committed, so a committed row never points at a missing
  or torn file. A crash in between leaves an unnamed file, which is ignored or replaced.
- The partial-sum fact is committed in the same transaction as the round's move to SUMMING,
  before anything is published, and names the round's base model and participant set (one
  fact per round). A restarted aggregator therefore refuses a second sum in the round, and
  holds any later round on the same base model to the retry rule (agreement.py).
- Each method is one transaction; SQLite's journal makes it all-or-nothing.

Restart policy: `recover()` aborts every round in flight ("aggregator restarted") and deletes
its shares: the other aggregators and the nodes keep their own deadlines, so a resumed round
would mostly wait for messages that never come again; the leader opens the next round.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aggregator.agreement import PublishedSum
from aggregator.errors import DuplicateShare, PartialSumRefused, StoreError
from aggregator.records import (
    ModelRecord,
    RoundRecord,
    ServerStateRecord,
    ShareRecord,
    ids_json,
    model_from_row,
    published_from_row,
    round_from_row,
    safe_folder_name,
)
from aggregator.rounds import RoundState, Stage
from aggregator.store_schema import disk_errors, open_database
from tessera.errors import DiskFull
from tessera.files import make_private_dir
from tessera.observability.events import Event

RESTART_REASON = "aggregator restarted"
DISK_FULL_REASON = "aggregator stopped while its disk was full"
log = logging.getLogger("tessera.aggregator.store")
_ORDER = {stage: rank for rank, stage in enumerate(Stage)}  # the happy path, in order


class Store:
    """One aggregator's SQLite state. Every public method is one transaction."""

    def __init__(self, path: Path, shares_dir: Path, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.shares_dir = Path(shares_dir)
        self._clock = clock
        self._lock = threading.Lock()  # paho callbacks and the main loop may share the store
        make_private_dir(self.path.parent)
        make_private_dir(self.shares_dir)
        self._db = open_database(self.path)

    def close(self) -> None:
        """Close the database (a checkpoint folds the WAL back into the main file)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _now(self) -> int:
        return int(self._clock() * 1000)

    @contextmanager
    def _transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction, all or nothing; DiskFull when the disk is full (rolled back)."""
        with self._lock, disk_errors(self.path):
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    # A COMMIT that found the disk full may have rolled back already.
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    # --- rounds -------------------------------------------------------------------------

    def create_round(self, record: RoundRecord) -> None:
        """Store a new round; StoreError if the study already has that round number."""
        s, now = record.state, self._now()
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (record.study_id, s.round, s.stage.value, record.base_model_hash,
                     record.ring_params, record.vector_length, record.deadline_ms,
                     record.algorithm, s.received, s.close_reason, ids_json(s.participants),
                     s.model_version, s.abort_reason, now, now),
                )  # fmt: skip
        except sqlite3.IntegrityError:
            raise StoreError(
                f"study {record.study_id} already has round {s.round}; "
                "open the next round number (store.latest_round + 1)"
            ) from None

    def save_state(self, study_id: str, state: RoundState) -> None:
        """Persist a state returned by rounds.transition. A finished round is never reopened.

        A COLLECTING state (one per accepted share) is committed without an fsync: a round
        still collecting never outlives a crash (recover() aborts it), so a flush per share
        would buy nothing. Every other stage is durable, and flushes the WAL.
        """
        with self._transaction(durable=state.stage is not Stage.COLLECTING) as db:
            self._save_state(db, study_id, state)

    def _save_state(self, db: sqlite3.Connection, study_id: str, state: RoundState) -> None:
        row = db.execute(
            "SELECT stage FROM rounds WHERE study_id = ? AND round = ?", (study_id, state.round)
        ).fetchone()
        if row is None:
            raise StoreError(f"study {study_id} has no round {state.round}; create_round first")
        stored = Stage(row[0])
        if stored.is_terminal and stored is not state.stage:
            raise StoreError(
                f"round {state.round} is already {stored.name} in the store; a finished round "
                f"cannot become {state.stage.name} (was it aborted by a restart?)"
            )
        # A stage may only stay or move forward (intermediate saves may be skipped), so a
        # stale state object can never roll a round back.
        if state.stage is not Stage.ABORTED and _ORDER[state.stage] < _ORDER[stored]:
            raise StoreError(
                f"round {state.round} is {stored.name} in the store and cannot move to "
                f"{state.stage.name}; save the states rounds.transition returns, in order"
            )
        db.execute(
            "UPDATE rounds SET stage=?, received=?, close_reason=?, participants=?, "
            "model_version=?, abort_reason=?, updated_ms=? WHERE study_id=? AND round=?",
            (state.stage.value, state.received, state.close_reason, ids_json(state.participants),
             state.model_version, state.abort_reason, self._now(), study_id, state.round),
        )  # fmt: skip

    def load_round(self, study_id: str, round_number: int) -> RoundRecord | None:
        """The stored round, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM rounds WHERE study_id = ? AND round = ?", (study_id, round_number)
            ).fetchone()
        return None if row is None else round_from_row(row)

    def list_rounds(self, study_id: str) -> list[RoundRecord]:
        """Every round of the study, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM rounds WHERE study_id = ? ORDER BY round", (study_id,)
            ).fetchall()
        return [round_from_row(row) for row in rows]

    def latest_round(self, study_id: str) -> int | None:
        """The highest round number stored for the study, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(round) FROM rounds WHERE study_id = ?", (study_id,)
            ).fetchone()
        return None if row[0] is None else int(row[0])

    # --- shares -------------------------------------------------------------------------

    def share_folder(self, study_id: str, round_number: int) -> Path:
        """Where this round's full-share files go (created on demand)."""
        folder = self.shares_dir / safe_folder_name(study_id) / f"{round_number:010d}"
        return make_private_dir(folder)

    def record_share(self, study_id: str, round_number: int, share: ShareRecord) -> None:
        """Record a received share; DuplicateShare if the node already has one this round.

        A full share's file must already be written (atomically) when this is called.
        """
        has_seed, has_path = share.seed is not None, share.path is not None
        if (has_seed, has_path) != ((True, False) if share.kind == "seed" else (False, True)):
            raise StoreError(f"share of kind {share.kind!r} must carry exactly its seed or path")
        try:
            # No fsync per share: recover() drops every share of a round in flight, so a row
            # never has to outlive a power cut (1,000 nodes would be 1,000 flushes); the next
            # durable commit (the partial-sum decision) flushes the WAL, these rows included.
            with self._transaction(durable=False) as db:
                db.execute(
                    "INSERT INTO shares VALUES (?,?,?,?,?,?,?,?)",
                    (study_id, round_number, share.node_id, share.kind, share.seed, share.path,
                     share.envelope_digest, self._now()),
                )  # fmt: skip
        except sqlite3.IntegrityError:
            raise DuplicateShare(round_number, share.node_id) from None

    def has_share(self, study_id: str, round_number: int, node_id: str) -> bool:
        """True when a share from `node_id` is recorded for the round."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM shares WHERE study_id=? AND round=? AND node_id=?",
                (study_id, round_number, node_id),
            ).fetchone()
        return row is not None

    def held_nodes(self, study_id: str, round_number: int) -> tuple[str, ...]:
        """The sorted node ids this aggregator holds shares from (its ReceivedSet)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT node_id FROM shares WHERE study_id=? AND round=? ORDER BY node_id",
                (study_id, round_number),
            ).fetchall()
        return tuple(row[0] for row in rows)

    def iter_shares(self, study_id: str, round_number: int) -> Iterator[ShareRecord]:
        """Stream the round's share records in node order; memory does not grow with count."""
        last = ""
        while True:  # pages, so that no cursor stays open across other transactions
            with self._lock:
                rows = self._db.execute(
                    "SELECT node_id, kind, seed, path, envelope_digest FROM shares "
                    "WHERE study_id=? AND round=? AND node_id > ? ORDER BY node_id LIMIT 64",
                    (study_id, round_number, last),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield ShareRecord(row[0], row[1], row[2], row[3], row[4])
            last = rows[-1][0]

    def purge_shares(self, study_id: str, round_number: int) -> None:
        """Forget a finished round's shares: rows (with their seeds, overwritten with zeros
        by secure_delete, and the WAL that wrote them truncated) and files."""
        with self._transaction() as db:
            db.execute("DELETE FROM shares WHERE study_id=? AND round=?", (study_id, round_number))
        self._truncate_wal()
        shutil.rmtree(self.shares_dir / safe_folder_name(study_id) / f"{round_number:010d}", True)

    def _truncate_wal(self) -> None:
        """Copy every WAL frame into the database and truncate the WAL. If another
        connection's reader is still open, this is logged and the next purge (or close)
        tries again: failing here would stop a finished round from being published."""
        with self._lock, disk_errors(self.path):
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning(
                Event.WAL_TRUNCATE_INCOMPLETE,
                extra={"fields": {"reason": "another connection reads the store; retried at "
                                  "the next purge (close `tessera aggregator models`)"}},
            )  # fmt: skip

    # --- the honest-aggregator fact -----------------------------------------------------

    def decide_partial_sum(self, study_id: str, state: RoundState, set_hash: bytes) -> None:
        """Commit, in one transaction, the round's move to SUMMING and the partial-sum fact,
        which names the round's base model (from the stored round, not from the caller) and
        its sorted participant set (`state.participants`).

        Call this after agreement.check_partial_sum_request and before publishing. If a fact
        already exists for the round, nothing is written and PartialSumRefused is raised.
        """
        if state.stage is not Stage.SUMMING or not state.participants:
            raise StoreError(f"the partial-sum decision goes with stage SUMMING, not {state.stage}")
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO partial_sums SELECT study_id, round, ?, ?, base_model_hash, ? "
                    "FROM rounds WHERE study_id = ? AND round = ?",
                    (set_hash, self._now(), ids_json(tuple(sorted(state.participants))),
                     study_id, state.round),
                )  # fmt: skip
                self._save_state(db, study_id, state)
        except sqlite3.IntegrityError:
            raise PartialSumRefused(
                f"round {state.round}: a partial sum was already decided and published in this "
                "round; an honest aggregator publishes at most one per round"
            ) from None

    def published_sum(self, study_id: str, round_number: int) -> PublishedSum | None:
        """The persisted partial-sum fact of a round, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT round, participant_set_hash, participants FROM partial_sums "
                "WHERE study_id=? AND round=?",
                (study_id, round_number),
            ).fetchone()
        return None if row is None else published_from_row(row)

    def published_on_base(self, study_id: str, base_model_hash: bytes) -> list[PublishedSum]:
        """Every persisted partial-sum fact on a base model (whichever round), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT round, participant_set_hash, participants FROM partial_sums "
                "WHERE study_id=? AND base_model_hash=? ORDER BY round",
                (study_id, base_model_hash),
            ).fetchall()
        return [published_from_row(row) for row in rows]

    # --- models and the optimiser state -------------------------------------------------

    def insert_model(self, record: ModelRecord, server_state: ServerStateRecord | None) -> None:
        """Register a model version (files already written) and, atomically with it, the
        optimiser state that produced it. StoreError if the version exists."""
        try:
            with self._transaction() as db:
                self._insert_model(db, record, server_state)
        except sqlite3.IntegrityError:
            raise StoreError(
                f"study {record.study_id} already has model version {record.version}; "
                "versions are never replaced, register the next one"
            ) from None

    def _insert_model(
        self, db: sqlite3.Connection, record: ModelRecord, server_state: ServerStateRecord | None
    ) -> None:
        signatures = json.dumps([[who, sig.hex()] for who, sig in record.signatures])
        db.execute(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (record.study_id, record.version, record.round, record.parent_hash,
             record.model_hash, record.onnx_hash, record.card_hash, record.folder,
             record.card_json, signatures, self._now()),
        )  # fmt: skip
        if server_state is not None:
            db.execute(
                "INSERT OR REPLACE INTO server_state VALUES (?,?,?,?,?)",
                (record.study_id, server_state.round, server_state.algorithm,
                 server_state.path, self._now()),
            )  # fmt: skip

    def list_models(self, study_id: str) -> list[ModelRecord]:
        """Every registered version of the study, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT study_id, version, round, parent_hash, model_hash, onnx_hash, card_hash,"
                " folder, card_json, signatures FROM models WHERE study_id=? ORDER BY version",
                (study_id,),
            ).fetchall()
        return [model_from_row(row) for row in rows]

    def model_index(self) -> list[tuple[str, int, int]]:
        """(study, version, registration time in ms) of every model, by study then version."""
        with self._lock:
            rows = self._db.execute(
                "SELECT study_id, version, created_ms FROM models ORDER BY study_id, version"
            ).fetchall()
        return [(str(study), int(version), int(ms)) for study, version, ms in rows]

    def server_state(self, study_id: str) -> ServerStateRecord | None:
        """The latest stored optimiser state of the study, or None before the first release."""
        with self._lock:
            row = self._db.execute(
                "SELECT round, algorithm, path FROM server_state WHERE study_id=?", (study_id,)
            ).fetchone()
        return None if row is None else ServerStateRecord(int(row[0]), row[1], row[2])

    # --- restart --------------------------------------------------------------------------

    def recover(self, reason: str = RESTART_REASON) -> list[tuple[str, int]]:
        """After a restart: abort every round in flight (with `reason`) and return the
        (study, round) pairs aborted. Call at startup (and after a full disk, which the
        daemon treats as a restart), before any round runs.

        No round is in flight afterwards, so every share (rows with their seeds, files, and
        temporary files a kill left behind) is deleted: nothing secret outlives its round.
        With nothing in flight, no share and an empty WAL, it writes nothing at all, so an
        idle aggregator starts on a full disk (issue 19); DiskFull when it must write and
        cannot.
        """
        with self._lock, disk_errors(self.path):
            in_flight = self._db.execute(
                "SELECT study_id, round FROM rounds WHERE stage NOT IN (?, ?) ORDER BY round",
                (Stage.RELEASED.value, Stage.ABORTED.value),
            ).fetchall()
            held = self._db.execute("SELECT EXISTS (SELECT 1 FROM shares)").fetchone()[0]
        wal = Path(f"{self.path}-wal")
        leftovers = any(self.shares_dir.iterdir())
        if in_flight or held:
            with self._transaction() as db:
                db.execute(
                    "UPDATE rounds SET stage=?, abort_reason=?, updated_ms=? "
                    "WHERE stage NOT IN (?,?)",
                    (Stage.ABORTED.value, reason, self._now(), Stage.RELEASED.value,
                     Stage.ABORTED.value),
                )  # fmt: skip
                db.execute("DELETE FROM shares")
        if in_flight or held:
            self._truncate_wal()
        elif wal.exists() and wal.stat().st_size:
            # A purge killed before its truncation may have left seeds in the WAL; fold it
            # back now if the disk allows, else at the next purge (as for a busy reader).
            try:
                self._truncate_wal()
            except DiskFull as full:
                fields = {"reason": f"{full}; retried at the next purge"}
                log.warning(Event.WAL_TRUNCATE_INCOMPLETE, extra={"fields": fields})
        if leftovers:
            for child in self.shares_dir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        return [(study, int(number)) for study, number in in_flight]

    def restore(
        self,
        rounds: list[RoundRecord],
        sums: list[tuple[str, int, bytes, tuple[str, ...]]],
        models: list[tuple[ModelRecord, ServerStateRecord | None]],
    ) -> None:
        """Fill an empty store, in one transaction, with what `tessera aggregator
        rebuild-state` recovered (aggregator.rebuild): finished rounds, the partial-sum facts
        (study, round, set hash, sorted set; each on its round's base model) and the
        registry's versions with their optimiser state, oldest first. StoreError, and nothing
        written, if the store holds anything."""
        with self._transaction() as db:
            held = [db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608
                    for t in ("rounds", "partial_sums", "models")]  # fmt: skip
            if any(held):
                raise StoreError(
                    f"state store {self.path} is not empty ({held[0]} rounds, {held[2]} model "
                    "versions); a rebuild only fills a lost or empty store: move it aside first"
                )
            for record in rounds:
                s, study = record.state, record.study_id
                db.execute(
                    "INSERT INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (study, s.round, s.stage.value, record.base_model_hash, record.ring_params,
                     record.vector_length, record.deadline_ms, record.algorithm, s.received,
                     s.close_reason, ids_json(s.participants), s.model_version, s.abort_reason,
                     self._now(), self._now()),
                )  # fmt: skip
            for study, number, set_hash, members in sums:
                db.execute(
                    "INSERT INTO partial_sums SELECT study_id, round, ?, ?, base_model_hash, ? "
                    "FROM rounds WHERE study_id = ? AND round = ?",
                    (set_hash, self._now(), ids_json(members), study, number),
                )  # fmt: skip
            for model, server_state in models:
                self._insert_model(db, model, server_state)

    def integrity_check(self) -> None:
        """Raise StoreError unless SQLite's own integrity check passes."""
        with self._lock:
            result = self._db.execute("PRAGMA integrity_check").fetchone()[0]
        if result != "ok":
            raise StoreError(f"state store {self.path} is damaged: {result}")
