"""Chunk frames and the reassembler: geometry, hashes, repeats, conflicts, limits, expiry."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.chunking import (
    HEADER_SIZE,
    ChunkFrame,
    Reassembler,
    ReassemblyLimits,
    prepare_spool_dir,
    split_payload,
)
from broker.errors import ChunkError, PayloadTooLargeError
from broker.quotas import Origin
from tessera.errors import ConfigError


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reassembler(**limits: object) -> tuple[Reassembler, FakeClock]:
    clock = FakeClock()
    return Reassembler(ReassemblyLimits(**limits), clock), clock  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=5000), chunk_size=st.integers(1, 700), seed=st.integers(0, 99))
def test_any_payload_round_trips_in_any_order(payload: bytes, chunk_size: int, seed: int) -> None:
    frames = [ChunkFrame.from_bytes(f.to_bytes()) for f in split_payload(payload, chunk_size)]
    random.Random(seed).shuffle(frames)
    assembler, _ = reassembler(spool_threshold=2000)
    results = [assembler.accept("t", f) for f in frames]
    assert results[-1] == payload
    assert all(r is None for r in results[:-1])
    assert assembler.open_transfers == 0


def test_frame_layout_is_as_documented() -> None:
    frame = next(split_payload(b"abcdef", 4))
    raw = frame.to_bytes()
    assert raw[:4] == b"TSCK" and raw[4] == 1
    assert len(raw) == HEADER_SIZE + 4 == 109 + 4
    assert raw[HEADER_SIZE:] == b"abcd"
    assert frame.payload_sha256 == hashlib.sha256(b"abcdef").digest()
    assert frame.count == 2 and frame.total_size == 6


def test_empty_payload_is_one_empty_frame() -> None:
    frames = list(split_payload(b"", 10))
    assert len(frames) == 1
    assembler, _ = reassembler()
    assert assembler.accept("t", ChunkFrame.from_bytes(frames[0].to_bytes())) == b""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw[:50], "shorter than its header"),
        (lambda raw: b"XXXX" + raw[4:], "not a chunk frame"),
        (lambda raw: raw[:4] + b"\x02" + raw[5:], "not a chunk frame"),
        (lambda raw: raw + b"x", "declares"),
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "fails its SHA-256"),
    ],
)
def test_malformed_frames_are_refused(change, message: str) -> None:  # type: ignore[no-untyped-def]
    raw = next(split_payload(os.urandom(100), 64)).to_bytes()
    with pytest.raises(ChunkError, match=message):
        ChunkFrame.from_bytes(change(raw))


@pytest.mark.parametrize(
    "fields",
    [
        {"index": 5},
        {"count": 3},
        {"chunk_size": 0},
        {"total_size": 1000},
    ],
)
def test_inconsistent_geometry_is_refused(fields: dict[str, int]) -> None:
    frame = next(split_payload(os.urandom(100), 64))
    with pytest.raises(ChunkError):
        ChunkFrame.from_bytes(replace(frame, **fields).to_bytes())


def test_identical_repeat_is_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    payload = os.urandom(300)
    first, second, third = split_payload(payload, 100)
    assembler, _ = reassembler()
    assert assembler.accept("t", first) is None
    with caplog.at_level(logging.DEBUG, logger="broker.chunking"):
        assert assembler.accept("t", first) is None
    assert "repeated chunk 0" in caplog.text
    assert assembler.accept("t", second) is None
    assert assembler.accept("t", third) == payload
    # A late repeat after completion neither reopens the transfer nor delivers twice.
    assert assembler.accept("t", second) is None
    assert assembler.open_transfers == 0


def test_conflicting_chunk_is_rejected_and_the_original_kept() -> None:
    payload = os.urandom(200)
    first, second = split_payload(payload, 100)
    forged_data = os.urandom(100)
    forged = replace(first, data=forged_data, chunk_sha256=hashlib.sha256(forged_data).digest())
    assembler, _ = reassembler()
    assembler.accept("t", first)
    with pytest.raises(ChunkError, match="differs from the copy already received"):
        assembler.accept("t", forged)
    assert assembler.accept("t", second) == payload


def test_conflicting_header_is_rejected() -> None:
    first, _ = split_payload(os.urandom(200), 100)
    assembler, _ = reassembler()
    assembler.accept("t", first)
    other_hash = replace(first, index=1, payload_sha256=b"\x00" * 32)
    with pytest.raises(ChunkError, match="conflicts with the transfer"):
        assembler.accept("t", other_hash)


def test_wrong_whole_payload_hash_is_refused() -> None:
    (only,) = split_payload(b"hello", 10)
    lying = replace(only, payload_sha256=hashlib.sha256(b"other").digest())
    assembler, _ = reassembler()
    with pytest.raises(ChunkError, match="whole-payload SHA-256"):
        assembler.accept("t", lying)


def test_same_payload_id_on_another_topic_is_a_separate_transfer() -> None:
    payload = os.urandom(200)
    first, second = split_payload(payload, 100)
    assembler, _ = reassembler()
    assembler.accept("topic-1", first)
    assert assembler.accept("topic-2", second) is None
    assert assembler.open_transfers == 2


def test_stalled_transfer_is_dropped_after_the_timeout_and_recorded() -> None:
    first, _second = split_payload(os.urandom(200), 100)
    assembler, clock = reassembler(timeout_s=30)
    assembler.accept("t", first)
    clock.now += 29
    assert assembler.expire() == []
    clock.now += 1
    (dropped,) = assembler.expire()
    assert (dropped.key, dropped.received, dropped.count) == ("t", 1, 2)
    assert list(assembler.expired) == [dropped]
    assert assembler.open_transfers == 0


def test_progress_resets_the_timeout() -> None:
    payload = os.urandom(300)
    frames = list(split_payload(payload, 100))
    assembler, clock = reassembler(timeout_s=30)
    assembler.accept("t", frames[0])
    clock.now += 20
    assembler.accept("t", frames[1])
    clock.now += 20
    assert assembler.accept("t", frames[2]) == payload


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_payload_bytes": 100}, "over the limit"),
        ({"max_transfers": 1}, "pool's transfers are full"),
        ({"max_total_bytes": 300}, "pool's declared bytes are full"),
    ],
)
def test_limits_refuse_new_transfers(limits: dict[str, int], message: str) -> None:
    assembler, _ = reassembler(**limits)
    small = next(split_payload(os.urandom(100), 50))
    if "max_payload_bytes" not in limits:
        assembler.accept("other", small)  # another sender, holding no more than the newcomer
    big = next(split_payload(os.urandom(250), 50))
    with pytest.raises(PayloadTooLargeError, match=message):
        assembler.accept("t", big)


def first_frames(count: int, total: int = 20, chunk: int = 10) -> list[ChunkFrame]:
    """The first frame of each of `count` payloads of `total` bytes: never finished."""
    return [next(split_payload(os.urandom(total), chunk)) for _ in range(count)]


def test_a_senders_stalled_transfers_displace_only_its_own() -> None:
    # issue 20, point 5: sixteen never-finished transfers (160 bytes) used to fill the
    # receiver's 16 places and block every other topic.
    assembler, clock = reassembler(max_transfers=16, sender_transfers=4)
    for frame in first_frames(16):
        clock.now += 1
        assert assembler.accept("share/agg/site-c", frame) is None
    assert assembler.open_transfers == 4  # its four newest; the twelve before, evicted
    assert len(assembler.evicted) == 12
    payload = os.urandom(300)
    results = [assembler.accept(f"share/agg/{s}", f) for s in ("site-a", "site-b")
               for f in split_payload(payload, 100)]  # fmt: skip
    assert results.count(payload) == 2


def test_oversized_declarations_displace_their_own_not_others() -> None:
    # Two frames declaring 256 MiB each used to hold the whole 512 MiB budget.
    assembler, _ = reassembler(
        max_payload_bytes=256 << 20, max_total_bytes=512 << 20, spool_threshold=1 << 20
    )
    honest = list(split_payload(os.urandom(300), 100))
    assembler.accept("site-a", honest[0])
    for _ in range(2):
        data = os.urandom(1 << 20)
        frame = ChunkFrame(
            os.urandom(16), 0, 256, 1 << 20, 256 << 20, os.urandom(32),
            hashlib.sha256(data).digest(), data,
        )  # fmt: skip
        assert assembler.accept("site-c", frame) is None
    assert [e.key for e in assembler.evicted] == ["site-c"]
    assert assembler.accept("site-a", honest[1]) is None
    assert assembler.accept("site-a", honest[2]) is not None


def test_members_never_crowd_out_the_aggregators_pool() -> None:
    def origin(key: str) -> Origin:
        return Origin(key, "aggregators" if key == "round" else "members")

    assembler = Reassembler(ReassemblyLimits(max_transfers=4), FakeClock(), origin)
    for sender in ("site-a", "site-b", "site-c", "site-d"):
        assembler.accept(sender, first_frames(1)[0])
    with pytest.raises(PayloadTooLargeError, match="members pool"):
        assembler.accept("site-e", first_frames(1)[0])
    (round_open,) = split_payload(b"a RoundOpen", 100)
    assert assembler.accept("round", round_open) == b"a RoundOpen"


def test_a_full_pool_takes_from_the_sender_holding_most() -> None:
    assembler, clock = reassembler(max_transfers=4, sender_transfers=4)
    for frame in first_frames(3):
        clock.now += 1
        assembler.accept("greedy", frame)
    assembler.accept("modest", first_frames(1)[0])
    assembler.accept("newcomer", first_frames(1)[0])
    (evicted,) = assembler.evicted
    assert evicted.key == "greedy"
    held = sorted(t.origin.sender for t in assembler._open.values())
    assert held == ["greedy", "greedy", "modest", "newcomer"]


def test_time_disconnected_does_not_count_as_idle() -> None:
    first, second = split_payload(os.urandom(200), 100)
    assembler, clock = reassembler(timeout_s=30)
    assembler.accept("t", first)
    clock.now += 29
    assembler.resume()  # reconnected after an outage
    clock.now += 29
    assert assembler.expire() == []
    assert assembler.accept("t", second) is not None


def test_large_transfers_spool_to_disk_not_memory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    payload = os.urandom(50_000)
    frames = list(split_payload(payload, 10_000))
    assembler, _ = reassembler(spool_threshold=20_000, spool_dir=tmp_path)
    assembler.accept("t", frames[0])
    transfer = next(iter(assembler._open.values()))
    assert transfer.buffer is None and transfer.spool is not None
    for frame in frames[1:-1]:
        assembler.accept("t", frame)
    assert assembler.accept("t", frames[-1]) == payload
    assert list(tmp_path.iterdir()) == []


def test_a_missing_spool_folder_is_refused_when_the_reassembler_is_made(tmp_path: Path) -> None:
    # Issue 19, point 1: both daemons named <state>/spool and nothing made it, so every chunk
    # of a large payload failed later, one by one, and was dropped.
    with pytest.raises(ConfigError, match=r"spool folder .*/spool is not usable .*create it"):
        reassembler(spool_dir=tmp_path / "spool")


def test_prepare_spool_dir_makes_a_private_folder_that_spools(tmp_path: Path) -> None:
    folder = prepare_spool_dir(tmp_path / "state" / "spool")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    payload = os.urandom(30_000)
    assembler, _ = reassembler(spool_threshold=10_000, spool_dir=folder)
    *head, last = split_payload(payload, 10_000)
    for frame in head:
        assert assembler.accept("t", frame) is None
    assert assembler.accept("t", last) == payload


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_transfers"):
        ReassemblyLimits(max_transfers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        ReassemblyLimits(timeout_s=0)
