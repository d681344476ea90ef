"""The hash-chained audit log: tamper detection, crash recovery, concurrent writers."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.governance.audit import (
    KINDS,
    MAX_ENTRY_BYTES,
    Anchor,
    AuditLog,
    AuditVerificationError,
    entry_hash,
    epsilon_by_study,
    export,
    read_entries,
    verify,
)
from tessera.governance.canonical import canonical_json

ROOT = Path(__file__).parents[2]
SAMPLE_FIELDS = {
    "round-opened": {"study_id": "chest-xray", "round": 3, "k": 3},
    "round-joined": {"study_id": "chest-xray", "round": 3},
    "round-refused": {"study_id": "chest-xray", "round": 4, "reason": "budget-exhausted"},
    "round-aborted": {"study_id": "chest-xray", "round": 5, "reason": "too few"},
    "participant-set": {"study_id": "chest-xray", "round": 3, "count": 3},
    "release": {"version": 4, "model_hash": "ab" * 32},
    "strategy-switch": {"from": "fedavg", "to": "fedsgd", "dispersion": 1.7},
    "epsilon-spent": {"study_id": "chest-xray", "round": 3, "epsilon": 0.4123, "total": 1.2},
    "key-change": {"principal": "node", "fingerprint": "ed25519:00ff"},
    "manifest-change": {"from_version": 1, "to_version": 2},
    "approval-change": {"study_id": "chest-xray", "steward": "steward-a"},
    "policy-change": {"paused": True},
    "quarantine": {"count": 2, "reason": "unsupported-transfer-syntax"},
    "privacy-audit": {"study_id": "chest-xray", "round": 3, "version": 3, "auc": 0.52},
    "dicom-refused": {"reason": "overwrite", "instance": "5f" * 16, "calling_aet": "PACS1"},
    "ledger-rebuilt": {"study_id": "chest-xray", "rounds": 3, "restored": 3, "epsilon": 1.2},
    "state-rebuilt": {"study_id": "chest-xray", "versions": 3, "latest_round": 5},
    "share-received": {"study_id": "chest-xray", "round": 3, "aggregator": "agg-1", "held": 4},
    "share-not-received": {"study_id": "chest-xray", "round": 3, "aggregator": "agg-2", "held": 3},
    "intake-throttled": {"sender": "site-c", "dropped": 41_000, "interval_s": 10.0},
}
TICK = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


def test_every_kind_has_a_sample() -> None:
    assert set(SAMPLE_FIELDS) == KINDS - {"recovery"}


def write_log(path: Path) -> list[bytes]:
    """A log with one entry of each kind; returns its lines (with newlines)."""
    with AuditLog.open(path, clock=lambda: TICK) as log:
        for kind, fields in SAMPLE_FIELDS.items():
            log.append(kind, fields)
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def rehash(line: bytes, **changes: object) -> bytes:
    """An entry changed *and* given a fresh, self-consistent hash (a careful forger)."""
    obj = json.loads(line)
    obj.update(changes)
    body = {k: obj[k] for k in ("seq", "time", "kind", "fields", "prev_hash")}
    obj["hash"] = entry_hash(**body)
    return canonical_json(obj) + b"\n"


def bad_line(path: Path, anchor: Anchor | None = None) -> int:
    with pytest.raises(AuditVerificationError) as caught:
        verify(path, anchor)
    assert f"line {caught.value.line}:" in str(caught.value)
    return caught.value.line


def test_entries_chain_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    result = verify(path)
    assert result.entries == len(SAMPLE_FIELDS) == len(lines)
    entries = read_entries(path)
    assert [e.kind for e in entries] == list(SAMPLE_FIELDS)
    assert entries[0].prev_hash == "0" * 64
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    assert result.last == Anchor(len(lines), entries[-1].hash)
    assert entries[0].time == "2026-11-29T12:00:00.000Z"


@pytest.mark.parametrize("index", range(len(SAMPLE_FIELDS)))
def test_tampering_with_each_kind_of_entry_is_detected(tmp_path: Path, index: int) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    number = index + 1
    last = len(lines)
    anchor = verify(path).last

    # Modified in place (a field value changed, hash left alone).
    obj = json.loads(lines[index])
    obj["fields"]["tampered"] = 1
    rewrite(path, [*lines[:index], canonical_json(obj) + b"\n", *lines[index + 1 :]])
    assert bad_line(path) == number

    # Modified with a recomputed hash: the next entry no longer chains (the anchor, if last).
    forged = rehash(lines[index], fields={**obj["fields"]})
    rewrite(path, [*lines[:index], forged, *lines[index + 1 :]])
    if number < last:
        assert bad_line(path) == number + 1
    else:
        verify(path)  # the documented limit: a rewritten tail needs the anchor
        assert bad_line(path, anchor) == number

    # Deleted.
    rewrite(path, [*lines[:index], *lines[index + 1 :]])
    if number < last:
        assert bad_line(path) == number
    else:
        assert verify(path).entries == last - 1  # undetectable without the anchor...
        assert bad_line(path, anchor) == number  # ...and detected with it

    # Inserted: a copy of an entry placed before it.
    rewrite(path, [*lines[:index], lines[index], *lines[index:]])
    assert bad_line(path) == number + 1

    # Reordered: swapped with its neighbour.
    other = index + 1 if number < last else index - 1
    swapped = list(lines)
    swapped[index], swapped[other] = swapped[other], swapped[index]
    rewrite(path, swapped)
    assert bad_line(path) == min(index, other) + 1

    # Hand-edited whitespace (same JSON value, not canonical).
    rewrite(path, [*lines[:index], lines[index].replace(b'":', b'": ', 1), *lines[index + 1 :]])
    assert bad_line(path) == number


def test_truncation_mid_line_is_named_and_repaired_by_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    cut = len(lines[-1]) // 2
    rewrite(path, [*lines[:-1], lines[-1][:cut]])
    with pytest.raises(AuditVerificationError, match="incomplete last entry") as caught:
        verify(path)
    assert caught.value.line == len(lines)
    with AuditLog.open(path) as log:
        assert log.recovered_bytes == cut
        log.append("round-opened", {"round": 9})
    entries = read_entries(path)
    assert [e.kind for e in entries[-2:]] == ["recovery", "round-opened"]
    assert entries[-2].fields == {"truncated_bytes": cut, "reason": "torn write"}
    assert len(entries) == len(lines) + 1


def test_the_writer_refuses_a_broken_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    rewrite(path, [lines[1], lines[0], *lines[2:]])
    before = path.read_bytes()
    with pytest.raises(AuditVerificationError, match="line 1:"):
        AuditLog.open(path)
    assert path.read_bytes() == before  # evidence left untouched


def test_anchor_file_is_an_append_only_trail_outside_the_logs_folder(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    path, anchor_path = tmp_path / "state" / "audit.jsonl", tmp_path / "anchors"
    with pytest.raises(ValueError, match="beside the audit log"):
        AuditLog.open(path, anchor_path=tmp_path / "state" / "anchors")
    sent: list[Anchor] = []
    with AuditLog.open(path, anchor_path=anchor_path, on_anchor=sent.append) as log:
        first = log.append("round-opened", {"round": 1})
        second = log.append("round-joined", {"round": 1})
    trail = [Anchor.from_text(line) for line in anchor_path.read_text().splitlines()]
    assert trail == sent == [Anchor(1, first.hash), Anchor(2, second.hash)]
    assert verify(path, trail[-1]).entries == 2
    with AuditLog.open(path, anchor_path=anchor_path) as log:  # reopened: earlier lines kept
        log.append("round-opened", {"round": 2})
    assert anchor_path.read_text().splitlines()[:2] == [a.to_text() for a in trail]
    with pytest.raises(ValueError, match="SEQ:HASH"):
        Anchor.from_text("2:nothex")


def test_export_writes_verified_json_lines(tmp_path: Path) -> None:
    path, out = tmp_path / "audit.jsonl", tmp_path / "export.jsonl"
    lines = write_log(path)
    assert export(path, out) == len(lines)
    assert out.read_bytes() == path.read_bytes()
    assert export(path, out, kinds=["epsilon-spent", "round-refused"]) == 2
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["kind"] for e in exported] == ["round-refused", "epsilon-spent"]
    assert exported[1]["fields"]["epsilon"] == 0.4123
    rewrite(path, lines[1:])
    with pytest.raises(AuditVerificationError):
        export(path, tmp_path / "refused.jsonl")
    assert not (tmp_path / "refused.jsonl").exists()


def test_bad_entries_are_refused_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, counts_only=True) as log:
        with pytest.raises(ValueError, match="unknown audit kind"):
            log.append("coffee-break", {})
        with pytest.raises(ValueError, match="unknown audit kind"):
            log.append("recovery", {})
        with pytest.raises(ValueError, match=r"counts only: write e\.g\. node_ids_count = 2"):
            log.append("participant-set", {"node_ids": ["site-1", "site-2"]})
        with pytest.raises(ValueError, match="must be JSON"):
            log.append("release", {"loss": float("nan")})
        with pytest.raises(ValueError, match=r"need the fields \['round'\]"):
            log.append("epsilon-spent", {"study_id": "s", "epsilon": 0.1})
        with pytest.raises(ValueError, match="need the fields"):
            log.append("round-refused", {"study_id": "s", "round": 1})
        with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
            log.append("epsilon-spent", {"study_id": "s", "round": 1, "epsilon": -0.1})
        with pytest.raises(ValueError, match="over"):
            log.append("release", {"blob": "x" * MAX_ENTRY_BYTES})
        log.append("participant-set", {"count": 2})
    assert path.read_bytes().count(b"\n") == 1
    with AuditLog.open(path) as aggregator_log:  # aggregators may name participants
        aggregator_log.append("participant-set", {"node_ids": ["site-1", "site-2"]})
    assert verify(path).entries == 2
    with pytest.raises(ValueError, match="closed"):
        aggregator_log.append("round-opened", {})


def test_epsilon_totals_per_study_come_from_the_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path) as log:
        for study, epsilon in [("a", 0.25), ("b", 1.0), ("a", 0.5), ("a", 0.125)]:
            log.append("epsilon-spent", {"study_id": study, "round": 1, "epsilon": epsilon})
        log.append("round-joined", {"study_id": "a", "epsilon": 99.0})
    assert epsilon_by_study(read_entries(path)) == {"a": 0.875, "b": 1.0}


def test_two_writers_on_one_file_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first, second = AuditLog.open(path), AuditLog.open(path)
    for i in range(5):
        first.append("round-opened", {"round": i})
        second.append("round-joined", {"round": i})
    first.close()
    second.close()
    assert [e.seq for e in read_entries(path)] == list(range(1, 11))


CHILD = textwrap.dedent(
    """
    import signal, sys
    from tessera.governance.audit import AuditLog
    if sys.argv[2] == "default-sigxfsz":
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # the kernel kills us mid-write
    log = AuditLog.open(sys.argv[1])
    for i in range(int(sys.argv[3])):
        try:
            log.append(
                "epsilon-spent",
                {"study_id": "s", "round": i, "epsilon": 0.1, "pad": "x" * 5000},
            )
        except OSError as error:
            print("append failed:", error.errno, flush=True)
            raise SystemExit(3)
    """
)


def run_child(path: Path, mode: str, count: int, **popen: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode, str(count)],
        env=env,
        stdout=subprocess.PIPE,
        **popen,
    )


def test_kill_9_mid_loop_leaves_a_log_that_verifies_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    child = run_child(path, "python-default", 1_000_000)
    try:
        while not path.exists() or path.read_bytes().count(b"\n") < 20:
            assert child.poll() is None, "the writer died on its own"
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    seen = path.read_bytes().count(b"\n")
    with AuditLog.open(path) as log:
        log.append("round-opened", {"after": "crash"})
    result = verify(path)
    assert result.entries >= seen + 1
    assert read_entries(path)[-1].fields == {"after": "crash"}


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


def test_a_write_torn_by_a_crash_is_cut_off_and_recorded(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel write part of a line, then kill the writer (SIGXFSZ):
    a real torn write from a real crash, at a known point."""
    path = tmp_path / "audit.jsonl"
    child = run_child(path, "default-sigxfsz", 1000, preexec_fn=limit_file_size)
    child.communicate()
    assert child.returncode == -signal.SIGXFSZ
    data = path.read_bytes()
    assert len(data) == 60_000 and not data.endswith(b"\n")
    torn = len(data) - (data.rfind(b"\n") + 1)
    complete = data.count(b"\n")
    assert bad_line(path) == complete + 1
    with AuditLog.open(path) as log:
        assert log.recovered_bytes == torn
    entries = read_entries(path)
    assert len(entries) == complete + 1
    assert entries[-1].kind == "recovery" and entries[-1].fields["truncated_bytes"] == torn


def test_a_failed_write_is_rolled_back_so_the_log_stays_whole(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    child = run_child(path, "python-default", 1000, preexec_fn=limit_file_size)
    out, _ = child.communicate()
    assert child.returncode == 3 and b"append failed: 27" in out  # EFBIG after a short write
    assert path.read_bytes().endswith(b"\n")
    assert verify(path).entries == path.read_bytes().count(b"\n")


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog.open(path).close()
    children = [run_child(path, "python-default", 150) for _ in range(2)]
    for child in children:
        child.communicate()
        assert child.returncode == 0
    entries = read_entries(path)
    assert [e.seq for e in entries] == list(range(1, 301))


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=5), max_size=6))
def test_any_json_fields_round_trip_and_verify(batches: list[dict[str, object]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "audit.jsonl"
        with AuditLog.open(path) as log:
            written = [log.append("release", fields) for fields in batches]
        entries = read_entries(path)
        assert [e.fields for e in entries] == batches
        assert [e.hash for e in entries] == [e.hash for e in written]
