"""The SQLite state store: rounds, shares, the partial-sum fact, restart recovery, and a
process killed with SIGKILL in the middle of writing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.errors import DuplicateShare, PartialSumRefused, StoreError
from aggregator.records import RoundRecord, ShareRecord
from aggregator.rounds import (
    Abort,
    CollectionClosed,
    ParticipantsAgreed,
    RoundState,
    ShareAccepted,
    Stage,
    StartCollecting,
    transition,
)
from aggregator.store import RESTART_REASON, Store

STUDY = "study-1"


def open_store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.sqlite3", tmp_path / "shares")


def new_round(store: Store, number: int) -> RoundState:
    state = RoundState(number)
    store.create_round(RoundRecord(STUDY, bytes(32), b"ring", 10, 1_000, "fedavg", state))
    return state


def test_wal_and_full_sync_are_on(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Store(tmp_path / "state.sqlite3", tmp_path / "shares") as store:
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_only_collecting_states_skip_the_fsync(tmp_path: Path) -> None:
    """One save per accepted share must not cost a disk flush; stage moves still do."""
    with open_store(tmp_path) as store:
        state = transition(new_round(store, 1), StartCollecting())
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        for node in ("site-a", "site-b"):
            state = transition(state, ShareAccepted(node))
            store.save_state(STUDY, state)
        assert statements.count("PRAGMA synchronous=NORMAL") == 2
        statements.clear()
        store.save_state(STUDY, transition(state, CollectionClosed("all-reported")))
        assert not any("synchronous" in s for s in statements)
        store._db.set_trace_callback(None)
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
        loaded = store.load_round(STUDY, 1)
        assert loaded is not None and loaded.state.received == 2
        assert loaded.state.stage is Stage.AGREEING


def test_rounds_round_trip_and_numbers_are_unique(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        state = transition(new_round(store, 1), StartCollecting())
        store.save_state(STUDY, state)
        state = transition(state, CollectionClosed("deadline"))
        store.save_state(STUDY, state)
        loaded = store.load_round(STUDY, 1)
        assert loaded is not None and loaded.state == state and loaded.deadline_ms == 1_000
        with pytest.raises(StoreError, match="already has round 1"):
            new_round(store, 1)
        assert store.latest_round(STUDY) == 1 and store.latest_round("other") is None
        with pytest.raises(StoreError, match="no round 9"):
            store.save_state(STUDY, RoundState(9))
        # A stale state object cannot roll the round back (AGREEING -> COLLECTING).
        with pytest.raises(StoreError, match="AGREEING in the store and cannot move"):
            store.save_state(STUDY, transition(RoundState(1), StartCollecting()))
        assert store.load_round(STUDY, 1).state == state  # type: ignore[union-attr]


def test_shares_are_unique_per_node_and_streamed_in_order(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        new_round(store, 1)
        for node in ("site-c", "site-a", "site-b"):
            store.record_share(STUDY, 1, ShareRecord(node, "seed", os.urandom(32), None, b"d"))
        with pytest.raises(DuplicateShare, match="site-a"):
            store.record_share(STUDY, 1, ShareRecord("site-a", "seed", bytes(32), None, b"x"))
        with pytest.raises(StoreError, match="exactly"):
            store.record_share(STUDY, 1, ShareRecord("site-d", "full", None, None, b"x"))
        assert store.held_nodes(STUDY, 1) == ("site-a", "site-b", "site-c")
        assert [r.node_id for r in store.iter_shares(STUDY, 1)] == ["site-a", "site-b", "site-c"]
        assert store.has_share(STUDY, 1, "site-b") and not store.has_share(STUDY, 2, "site-b")


def test_the_partial_sum_fact_survives_a_restart(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        state = new_round(store, 3)
        for event in (StartCollecting(), CollectionClosed("all-reported")):
            state = transition(state, event)
        state = transition(state, ParticipantsAgreed(("a", "b", "c")))
        store.decide_partial_sum(STUDY, state, b"h" * 32)
    with open_store(tmp_path) as store:
        fact = store.published_sum(STUDY, 3)
        assert fact is not None and fact.participant_set_hash == b"h" * 32
        with pytest.raises(PartialSumRefused, match="at most one"):
            store.decide_partial_sum(STUDY, state, b"g" * 32)
        assert store.published_sum(STUDY, 3).participant_set_hash == b"h" * 32  # type: ignore[union-attr]


def summing(store: Store, number: int, base: bytes) -> RoundState:
    state = RoundState(number)
    store.create_round(RoundRecord(STUDY, base, b"ring", 10, 1_000, "fedavg", state))
    for event in (StartCollecting(), CollectionClosed("all-reported")):
        state = transition(state, event)
    return transition(state, ParticipantsAgreed(("a", "b", "c")))


def test_every_partial_sum_on_a_base_model_is_kept_with_its_set_across_a_restart(
    tmp_path: Path,
) -> None:
    """Issue #18, attack 2: a later round on the same base model is held to the retry rule
    against every earlier sum on it, so every fact keeps its base model and its set."""
    with open_store(tmp_path) as store:
        store.decide_partial_sum(STUDY, summing(store, 1, b"m" * 32), b"h" * 32)
        store.decide_partial_sum(STUDY, summing(store, 2, b"n" * 32), b"h" * 32)  # new model
        store.decide_partial_sum(STUDY, summing(store, 3, b"m" * 32), b"g" * 32)  # a retry
    with open_store(tmp_path) as store:
        facts = store.published_on_base(STUDY, b"m" * 32)
        hashes = [(f.round, f.participant_set_hash) for f in facts]
        assert hashes == [(1, b"h" * 32), (3, b"g" * 32)]
        assert all(f.participants == ("a", "b", "c") for f in facts)
        assert store.published_on_base(STUDY, b"o" * 32) == []


SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
CREATE TABLE rounds (
    study_id TEXT NOT NULL, round INTEGER NOT NULL, stage TEXT NOT NULL,
    base_model_hash BLOB NOT NULL, ring_params BLOB NOT NULL, vector_length INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL, algorithm TEXT NOT NULL, received INTEGER NOT NULL,
    close_reason TEXT, participants TEXT, model_version TEXT, abort_reason TEXT,
    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, PRIMARY KEY (study_id, round));
CREATE TABLE partial_sums (
    study_id TEXT NOT NULL, round INTEGER NOT NULL, participant_set_hash BLOB NOT NULL,
    decided_ms INTEGER NOT NULL, PRIMARY KEY (study_id, round));
"""


def old_store(tmp_path: Path, version: int) -> None:
    """A store of schema 1 (one fact per round) or 2 (one per base model, UNIQUE), with
    facts: round 1 and 2 on "m" (schema 1 let round 2 sum "m" again), round 3 on "n"."""
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    db.executescript(SCHEMA_1.replace("'1'", f"'{version}'"))
    if version == 2:
        db.executescript(
            "DROP TABLE partial_sums; CREATE TABLE partial_sums (study_id TEXT NOT NULL, "
            "round INTEGER NOT NULL, participant_set_hash BLOB NOT NULL, decided_ms INTEGER "
            "NOT NULL, base_model_hash BLOB NOT NULL, PRIMARY KEY (study_id, round), "
            "UNIQUE (study_id, base_model_hash));"
        )
    facts = ((1, b"m", '["a", "b", "c"]'), (2, b"m", None), (3, b"n", '["a", "b", "d"]'))
    for number, base, members in facts[::version]:  # schema 2 holds one fact per base
        db.execute(
            "INSERT INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (STUDY, number, "aborted", base * 32, b"ring", 10, 0, "fedavg", 3, None, members,
             None, "x", 0, 0),
        )  # fmt: skip
        fact = (STUDY, number, b"h" * 32, 0, *((base * 32,) if version == 2 else ()))
        db.execute(f"INSERT INTO partial_sums VALUES ({','.join('?' * len(fact))})", fact)
    db.commit()
    db.close()


@pytest.mark.parametrize("version", [1, 2])
def test_a_schema_1_or_2_store_is_migrated_to_3_and_keeps_its_facts(
    tmp_path: Path, version: int
) -> None:
    old_store(tmp_path, version)
    with open_store(tmp_path) as store:
        # then on to schema 4 (registry paths relative to the registry: no models here)
        assert store._db.execute("SELECT value FROM meta").fetchone()[0] == "4"
        on_m = store.published_on_base(STUDY, b"m" * 32)
        assert [(f.round, f.participants) for f in on_m] == [
            (1, ("a", "b", "c")),
            *([(2, None)] if version == 1 else []),  # no set recorded
        ]
        on_n = store.published_on_base(STUDY, b"n" * 32)
        assert [(f.round, f.participants) for f in on_n] == [(3, ("a", "b", "d"))]
        # The facts still refuse: a second sum in round 3, and (checked by the retry rule)
        # any set on "n" other than {a, b, d} or a superset adding k.
        state = RoundState(3)
        for event in (StartCollecting(), CollectionClosed("all-reported")):
            state = transition(state, event)
        state = transition(state, ParticipantsAgreed(("a", "b", "d")))
        with pytest.raises(PartialSumRefused, match="at most one per round"):
            store.decide_partial_sum(STUDY, state, b"g" * 32)
    with open_store(tmp_path) as store:  # reopened: schema 4 as is
        assert len(store.published_on_base(STUDY, b"n" * 32)) == 1


def test_recover_aborts_rounds_in_flight_and_drops_their_shares(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        new_round(store, 1)
        store.save_state(STUDY, transition(RoundState(1), Abort("deadline with 1 node")))
        state = transition(new_round(store, 2), StartCollecting())
        store.save_state(STUDY, state)
        folder = store.share_folder(STUDY, 2)
        (folder / "x.share").write_bytes(b"1234")
        store.record_share(STUDY, 2, ShareRecord("a", "full", None, str(folder / "x.share"), b"d"))
    with open_store(tmp_path) as store:
        assert store.recover() == [(STUDY, 2)]
        second = store.load_round(STUDY, 2)
        assert second is not None and second.state.stage is Stage.ABORTED
        assert second.state.abort_reason == RESTART_REASON
        first = store.load_round(STUDY, 1)
        assert first is not None and first.state.abort_reason == "deadline with 1 node"
        assert store.held_nodes(STUDY, 2) == () and not folder.exists()
        with pytest.raises(StoreError, match="already ABORTED"):
            store.save_state(STUDY, transition(state, CollectionClosed("deadline")))
        assert store.recover() == []


def test_a_damaged_database_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.sqlite3").write_bytes(b"this is not a database, just garbage" * 100)
    with pytest.raises(StoreError, match="backup"):
        open_store(tmp_path)


# --- SIGKILL in the middle of writing ---------------------------------------------------------

WRITER = r"""
import os, sys
from pathlib import Path
from aggregator.records import RoundRecord, ShareRecord
from aggregator.rounds import *
from aggregator.store import Store
from tessera.files import write_private_file

root = Path(sys.argv[1])
store = Store(root / "state.sqlite3", root / "shares")
number = 0
while True:
    number += 1
    state = RoundState(number)
    base = number.to_bytes(32, "big")  # each round on its own base model, as a release makes
    store.create_round(RoundRecord("study-1", base, b"ring", 8192, 0, "fedavg", state))
    state = transition(state, StartCollecting())
    store.save_state("study-1", state)
    for i in range(6):
        node = f"site-{i}"
        if i % 2:
            path = store.share_folder("study-1", number) / f"{node}.share"
            write_private_file(path, os.urandom(8192 * 4))
            record = ShareRecord(node, "full", None, str(path), os.urandom(32))
        else:
            record = ShareRecord(node, "seed", os.urandom(32), None, os.urandom(32))
        store.record_share("study-1", number, record)
        state = transition(state, ShareAccepted(node))
        store.save_state("study-1", state)
        print(f"{number} share {i}", flush=True)
    state = transition(state, CollectionClosed("all-reported"))
    store.save_state("study-1", state)
    state = transition(state, ParticipantsAgreed(tuple(f"site-{i}" for i in range(5))))
    store.decide_partial_sum("study-1", state, os.urandom(32))
    print(f"{number} decided", flush=True)
    state = transition(state, PartialSumPublished())
    store.save_state("study-1", state)
    state = transition(state, ModelReleased(str(number)))
    store.save_state("study-1", state)
    store.purge_shares("study-1", number)
    print(f"{number} released", flush=True)
"""


@pytest.mark.parametrize("lines_before_kill", [5, 23, 40])
def test_sigkill_mid_write_reopens_consistent(tmp_path: Path, lines_before_kill: int) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    for _ in range(lines_before_kill):
        assert writer.stdout.readline(), "the writer died on its own"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL

    with open_store(tmp_path) as store:
        store.integrity_check()
        rounds = store.list_rounds(STUDY)
        assert rounds, "nothing was written before the kill"
        in_flight = [r.state.round for r in rounds if not r.state.stage.is_terminal]
        # Whatever the kill interrupted, each round's rows agree with each other.
        for record in rounds:
            state, fact = record.state, store.published_sum(STUDY, record.state.round)
            if state.stage in (Stage.SUMMING, Stage.COMBINING, Stage.RELEASED):
                assert fact is not None and state.participants is not None
            else:
                assert fact is None
            if state.stage is Stage.COLLECTING:
                assert state.received == len(store.held_nodes(STUDY, state.round)) or (
                    state.received + 1 == len(store.held_nodes(STUDY, state.round))
                )  # killed between the share row and the stage row
            for share in store.iter_shares(STUDY, state.round):
                if share.kind == "full":
                    assert Path(share.path).stat().st_size == 8192 * 4  # type: ignore[arg-type]
        assert store.recover() == [(STUDY, n) for n in in_flight]
        for record in store.list_rounds(STUDY):
            assert record.state.stage in (Stage.RELEASED, Stage.ABORTED)
            if record.state.round in in_flight:
                assert record.state.abort_reason == RESTART_REASON
                assert store.held_nodes(STUDY, record.state.round) == ()
        leftovers = [p for p in (tmp_path / "shares").rglob("*") if p.is_file()]
        assert leftovers == []
        # The restarted aggregator can go on with the next round.
        new_round(store, max(r.state.round for r in rounds) + 1)
