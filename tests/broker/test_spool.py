"""Large transfers that cannot be spooled lose nothing (issue 19, point 1).

A transfer above the spool threshold (64 MiB; lowered here so that the tests stay small) is
reassembled in a file in the receiver's spool folder. When that file cannot be made or
written (the folder is missing, the disk is full), the chunk is neither taken nor
acknowledged: the broker, which acknowledged it to the sender long ago (the sender will
never send it again), keeps it; the receiver offers it to the reassembler again and takes it
once there is room, and a receiver that restarts gets it redelivered. Before, every such
chunk raised inside the handler and was acknowledged and dropped, so the payload was lost
for good.

The disk is real: a small tmpfs, mounted for the test and unmounted after it. The broker is
a real Mosquitto with mutual TLS.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.mosquitto import Inbox, MosquittoProcess, SessionFactory

from broker import topics
from broker.chunking import Reassembler, ReassemblyLimits, prepare_spool_dir, split_payload
from broker.errors import DeliveryDeferred, SpoolError
from broker.transfer import PayloadReceiver, send_payload

FED, STUDY = "fed-test", "study-1"
THRESHOLD = 64 << 10  # spool anything above 64 KiB
CHUNK = 16 << 10


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (a disk that fills up), unmounted after the test."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` up to `leave` free bytes with one file; return it (delete it to free)."""
    filler = disk / "filler"
    with filler.open("wb") as out:
        out.write(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - leave))
    return filler


def wait_until(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll `condition` (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waiting for {what}: not within {timeout:.0f} s")
        time.sleep(0.05)


def handler_trouble(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether the receiving session logged that a handler could not take a message
    (before the fix: "handler ... raised"; now: delivery-deferred)."""
    return any(
        r.name == "broker.session" and r.levelno >= logging.WARNING for r in caplog.records
    )


def test_a_chunk_that_finds_the_disk_full_is_taken_once_there_is_room(small_disk: Path) -> None:
    payload = os.urandom(10 * CHUNK)
    frames = list(split_payload(payload, CHUNK))
    folder = prepare_spool_dir(small_disk / "spool")
    now = [0.0]
    assembler = Reassembler(
        ReassemblyLimits(spool_threshold=THRESHOLD, spool_dir=folder, timeout_s=60),
        lambda: now[0],
    )
    filler = fill(small_disk, leave=4 * CHUNK)
    taken = 0
    with pytest.raises(SpoolError, match="No space left on device") as caught:
        for frame in frames:
            assert assembler.accept("t", frame) is None
            taken += 1
    assert isinstance(caught.value, DeliveryDeferred) and 0 < taken < len(frames)
    for _ in range(3):  # retried for longer than the transfer timeout: kept, not expired
        now[0] += 50
        with pytest.raises(SpoolError):
            assembler.accept("t", frames[taken])
    assert assembler.open_transfers == 1 and not assembler.expired
    filler.unlink()
    results = [assembler.accept("t", frame) for frame in frames[taken:]]
    assert results[-1] == payload and all(r is None for r in results[:-1])
    assert list(folder.iterdir()) == []


def test_a_transfer_that_fills_the_disk_is_delivered_once_space_returns(
    mosquitto: MosquittoProcess,
    connect: SessionFactory,
    small_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="broker.session")
    payload = os.urandom(10 * CHUNK)
    topic = topics.share_topic(FED, STUDY, "agg-1", "site-a")
    folder = prepare_spool_dir(small_disk / "spool")
    receiver = PayloadReceiver(
        connect("agg-1", mosquitto, deferred_retry_s=0.5),
        ReassemblyLimits(spool_threshold=THRESHOLD, spool_dir=folder, timeout_s=120),
    )
    got = Inbox()
    receiver.subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-1"), got)
    filler = fill(small_disk, leave=4 * CHUNK)
    send_payload(connect("site-a", mosquitto), topic, payload, chunk_size=CHUNK, timeout_s=60)
    wait_until(lambda: handler_trouble(caplog), "a chunk that finds the disk full")
    assert got.items == []
    filler.unlink()  # the operator frees space; nobody sends anything again
    delivered = got.wait_for(1, timeout=60)
    assert len(delivered) == 1, "the payload was lost (its chunks were acknowledged)"
    assert delivered[0][0] == topic
    assert hashlib.sha256(delivered[0][1]).digest() == hashlib.sha256(payload).digest()
    assert receiver.rejected == 0 and receiver.reassembler.open_transfers == 0
    receiver.close()


def test_chunks_that_found_no_spool_folder_reach_the_receiver_after_its_restart(
    mosquitto: MosquittoProcess,
    connect: SessionFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="broker.session")
    payload = os.urandom(10 * CHUNK)
    topic = topics.share_topic(FED, STUDY, "agg-2", "site-b")
    folder = prepare_spool_dir(tmp_path / "spool")
    limits = ReassemblyLimits(spool_threshold=THRESHOLD, spool_dir=folder, timeout_s=120)
    first = PayloadReceiver(connect("agg-2", mosquitto), limits)
    lost = Inbox()
    first.subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-2"), lost)
    folder.rmdir()  # removed under the running service
    send_payload(connect("site-b", mosquitto), topic, payload, chunk_size=CHUNK, timeout_s=60)
    wait_until(lambda: handler_trouble(caplog), "a chunk that finds no spool folder")
    first.close()
    first.session.close()
    assert lost.items == []

    prepare_spool_dir(folder)  # what the restarted daemon does at start-up
    session = connect("agg-2", mosquitto, start=False)  # the same persistent session
    second = PayloadReceiver(session, limits)
    got = Inbox()
    second.subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-2"), got)
    session.start().wait_connected(10)
    delivered = got.wait_for(1, timeout=60)
    assert len(delivered) == 1, "the payload was lost (its chunks were acknowledged)"
    assert hashlib.sha256(delivered[0][1]).digest() == hashlib.sha256(payload).digest()
    second.close()


def test_a_payload_its_handler_defers_is_handed_over_again_and_once(
    mosquitto: MosquittoProcess, connect: SessionFactory, tmp_path: Path
) -> None:
    # What a handler that cannot store a complete payload now (a full disk) may do.
    payload = os.urandom(10 * CHUNK)
    topic = topics.share_topic(FED, STUDY, "agg-1", "site-b")
    receiver = PayloadReceiver(
        connect("agg-1", mosquitto, deferred_retry_s=0.2),
        ReassemblyLimits(spool_threshold=THRESHOLD, spool_dir=prepare_spool_dir(tmp_path / "s")),
    )
    calls: list[bytes] = []
    got = Inbox()

    def handler(topic: str, data: bytes) -> None:
        calls.append(data)
        if len(calls) < 3:
            raise DeliveryDeferred("no room to store it yet")
        got(topic, data)

    receiver.subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-1"), handler)
    send_payload(connect("site-b", mosquitto), topic, payload, chunk_size=CHUNK, timeout_s=60)
    (delivered,) = got.wait_for(1, timeout=60)
    assert delivered == (topic, payload) and calls == [payload] * 3
    assert receiver.session.deliveries_deferred == 1
    receiver.close()
