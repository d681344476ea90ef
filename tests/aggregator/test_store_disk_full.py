"""The aggregator's store on a real full disk (a tmpfs filled until ENOSPC): issue 19, point 5.

An idle store (nothing in flight) recovers without writing, so a restarted aggregator gets
past start-up on a full disk; a write that finds no space raises one DiskFull naming the
database, the space needed and the space free (never a raw sqlite3.OperationalError), rolls
back, and the same write succeeds once space returns."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.disk import small_disk

from aggregator.records import RoundRecord
from aggregator.rounds import Abort, RoundState, transition
from aggregator.store import Store
from tessera.errors import DiskFull

STUDY = "study-1"


def record(number: int) -> RoundRecord:
    return RoundRecord(STUDY, bytes(32), b"ring", 10, 1_000, "fedavg", RoundState(number))


def test_an_idle_store_recovers_on_a_full_disk_and_a_write_says_disk_full(
    tmp_path: Path,
) -> None:
    with small_disk(tmp_path / "state", size_kib=1024) as disk:
        database = disk.path / "aggregator.sqlite3"
        with Store(database, disk.path / "shares") as store:
            store.create_round(record(1))
            store.save_state(STUDY, transition(RoundState(1), Abort("test")))
            disk.fill()

            assert store.recover() == []
            with pytest.raises(DiskFull) as caught:
                store.create_round(record(2))
            message = str(caught.value)
            assert message.startswith(f"disk full: {database}, needs about "), message
            assert caught.value.free < caught.value.needed
            assert store.latest_round(STUDY) == 1  # rolled back, the store still reads

            disk.free()
            store.create_round(record(2))
            assert store.latest_round(STUDY) == 2
