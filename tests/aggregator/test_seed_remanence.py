"""Attack 7 of issue 18: seeds must not outlive their round, and the aggregator's state must
be private. A real round through real AggregatorService objects with real stores on disk (the
in-memory loop of test_service); then every byte of each aggregator's state folder (the
SQLite database, its -wal and -shm, share files, registry files) is searched for every seed
the nodes sent, and every file and folder's mode is checked."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from aggregator.records import RoundRecord, ShareRecord
from aggregator.rounds import RoundState, Stage
from aggregator.store import Store
from broker import topics
from tessera.crypto.sealing import open_sealed
from tessera.crypto.sharing import SEED_BYTES, Share
from tessera.wire.envelopes import open_envelope, share_binding
from tessera.wire.messages import ShareEnvelope
from tests.aggregator.test_service import AGGREGATORS, LEADER, NODES, Federation, run_round


def seeds_sent(fed: Federation) -> dict[str, list[bytes]]:
    """Every seed share on the wire, opened with its aggregator's own key: per aggregator."""
    found: dict[str, list[bytes]] = {agg: [] for agg in AGGREGATORS}
    announcement = fed.announcement()
    for out in fed.wire:
        topic = topics.parse(out.topic)
        if topic.kind is not topics.Kind.SHARE:
            continue
        envelope = open_envelope(out.payload, fed.services[LEADER].signers, 1 << 30).message
        assert isinstance(envelope, ShareEnvelope)
        agg, node = envelope.aggregator_id, envelope.node_id
        binding = share_binding(announcement, node, agg)
        plain = open_sealed(envelope.sealed, fed.services[agg].keys.hpke, binding)
        index = announcement.aggregator_ids.index(agg)
        share = Share.from_bytes(plain, index, announcement.ring, announcement.vector_length)
        if share.seed is not None:
            found[agg].append(share.seed)
    return found


def state_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_no_seed_survives_the_round_in_the_database_its_wal_or_the_state_folder(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path)
    run_round(fed, skip=set())  # every node reaches both: the round releases at once
    assert all(fed.stage(a) is Stage.RELEASED for a in AGGREGATORS)
    seeds = seeds_sent(fed)
    assert sum(len(s) for s in seeds.values()) == len(NODES)  # one seed share per node
    for agg in AGGREGATORS:
        root = tmp_path / agg
        database = fed.services[agg].store.path
        names = {p.name for p in state_files(root)}
        assert {database.name, f"{database.name}-wal", f"{database.name}-shm"} <= names
        for path in state_files(root):  # the store is still open, as in a running daemon
            data = path.read_bytes()
            for seed in seeds[agg]:
                assert len(seed) == SEED_BYTES
                assert seed not in data, f"a seed is still in {path.relative_to(tmp_path)}"


def test_every_state_file_is_private(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    run_round(fed, skip={("site-d", "agg-2")})  # the full shares wait in files...
    share_files = [p for p in state_files(tmp_path) if p.suffix == ".share"]
    assert len(share_files) >= len(NODES) - 1  # each node's full share went to one of them
    for path in share_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        for folder in path.relative_to(tmp_path).parents:
            if folder != Path("."):
                assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o700, folder
    fed.past_deadline()  # ... until the round ends
    assert all(fed.stage(a) is Stage.RELEASED for a in AGGREGATORS)
    for agg in AGGREGATORS:
        root = tmp_path / agg
        assert not [p for p in state_files(root) if p.suffix == ".share"]
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            wanted = 0o700 if path.is_dir() else 0o600
            assert mode == wanted, f"{path.relative_to(tmp_path)} is {mode:o}, not {wanted:o}"


def test_a_reader_that_blocks_the_truncation_is_logged_and_the_next_purge_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.sqlite3"
    store = Store(path, tmp_path / "shares")
    seeds = [os.urandom(SEED_BYTES) for _ in range(2)]
    for number, seed in enumerate(seeds, start=1):
        store.create_round(
            RoundRecord("study-1", bytes(32), b"ring", 10, 1_000, "fedavg", RoundState(number))
        )
        store.record_share("study-1", number, ShareRecord("site-a", "seed", seed, None, b"d"))
    reader = sqlite3.connect(path, timeout=0)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM shares").fetchone()  # holds a snapshot of the WAL
    store._db.execute("PRAGMA busy_timeout=0")  # do not wait for it
    store.purge_shares("study-1", 1)  # the round's end goes on: no exception
    assert [r for r in caplog.records if r.getMessage() == "wal-truncate-incomplete"]
    assert seeds[0] in Path(f"{path}-wal").read_bytes()  # still there, for now
    reader.rollback()
    reader.close()
    store.purge_shares("study-1", 2)
    for name in (path, Path(f"{path}-wal")):
        data = name.read_bytes()
        assert all(seed not in data for seed in seeds), name
    store.close()
