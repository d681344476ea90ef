"""kill -9 in the middle of an ingest, then a resume: consistent, and finishes the job."""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from node.intake.cache import CachedDataset
from node.intake.ingest import IntakeConfig, run_ingest
from node.intake.preprocess import PreprocessConfig
from node.intake.worker import TEMP_PREFIX, shard_path
from node.synth.sites import SynthConfig, generate

CFG = PreprocessConfig(size=32)
N = 600


def ingested_rows(index: Path) -> int:
    if not index.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM files").fetchone()[0])
    except sqlite3.Error:
        return 0


def wait_until_the_killed_workers_are_gone(lock: Path, timeout: float = 60.0) -> None:
    """The pool workers share the parent's lock on `lock` (forked with it), and a SIGKILLed
    process releases it only once the kernel has torn it down, which under load can come
    after the parent's exit status. A restarted node that finds it held says "another intake
    pass holds" and retries at its next pass; this test resumes at once, so it waits."""
    deadline = time.monotonic() + timeout
    with open(lock, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                assert time.monotonic() < deadline, "the killed workers still hold the lock"
                time.sleep(0.05)
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
            return


def test_kill_during_ingest_then_resume(tmp_path: Path) -> None:
    generate(SynthConfig(tmp_path / "synth", sites=1, seed=5, images_per_site=N, size=32))
    intake = tmp_path / "synth" / "site-00" / "dicom"
    state = tmp_path / "state"
    index = state / "intake" / "index.sqlite3"
    command = [sys.executable, "-m", "tessera.cli", "node", "ingest", "--intake", str(intake),
               "--state", str(state), "--size", "32", "--workers", "2"]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while ingested_rows(index) < 40 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the parent and its pool workers, like an OOM kill
    process.wait()
    wait_until_the_killed_workers_are_gone(state / "intake" / "ingest.lock")
    at_kill = ingested_rows(index)
    assert 0 < at_kill < N, f"the kill must land mid-ingest ({at_kill} of {N} rows)"

    # consistent: every committed row points at a complete, loadable shard row
    with sqlite3.connect(index) as conn:
        rows = conn.execute("SELECT shard, row FROM files WHERE status='ingested'").fetchall()
    assert len(rows) >= at_kill
    for shard, row in rows:
        array = np.load(shard_path(state / "cache", CFG.digest(), shard), mmap_mode="r")[row]
        assert array.shape == (1, 32, 32) and np.isfinite(array).all()
    keys = rows

    resumed = run_ingest(IntakeConfig(intake, state, preprocess=CFG))
    assert resumed.quarantined == 0
    assert resumed.unchanged == len(keys) and resumed.unchanged + resumed.ingested == N
    assert not list((state / "cache").rglob(f"{TEMP_PREFIX}*"))

    clean_state = tmp_path / "clean"
    run_ingest(IntakeConfig(intake, clean_state, preprocess=CFG))
    resumed_view = CachedDataset(state, CFG)
    clean_view = CachedDataset(clean_state, CFG)
    assert len(resumed_view) == len(clean_view) == N
    # keyed hashes differ between the two state dirs (separate site secrets); arrays do not
    resumed_arrays = sorted(resumed_view.array(i).tobytes() for i in range(N))
    clean_arrays = sorted(clean_view.array(i).tobytes() for i in range(N))
    assert resumed_arrays == clean_arrays
