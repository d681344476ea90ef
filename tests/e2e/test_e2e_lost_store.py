"""End to end, real processes: a leader whose SQLite store was lost while its model registry
and audit log survived (issue 19, point 3).

Before the fix, a leader started on a deleted or emptied `aggregator.sqlite3` took itself for
a fresh one: it reported ready, opened round 1 again from the genesis model, the follower
refused it (it holds version 1), the nodes refused it (already joined round 1), and the
federation stalled for good with nothing saying why.

One federation (two aggregators, two sites, k = 2), one timeline:

1. round 1 is released and installed by both sites; the leader is stopped (SIGTERM);
2. its store is deleted: the leader refuses to start (exit 2), naming
   `tessera aggregator rebuild-state`; then the store is an empty file: the same refusal;
3. a registry whose signed release was altered is not trusted: the rebuild refuses it;
4. with the release restored, `tessera aggregator rebuild-state` rebuilds the store from the
   registry (every signature verified) and the audit log;
5. the leader starts and round 2 is released with both signatures: both sites install
   version 2, and both aggregators' registries verify versions 1 and 2.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support.e2e import TESSERA, LiveFederation

from aggregator.registry import Registry
from aggregator.store import Store
from broker.provisioning.bundle import load_bundle
from node.demo.federation import FederationSpec
from tessera.observability.events import Event
from tessera.wire.release import ModelRelease, verify_release

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
SITES = ("site-a", "site-b")
SPEC = FederationSpec(
    sites=SITES,
    federation_id="lost-store-fed",
    min_participants=2,
    round={"collect_timeout_s": 40, "agreement_timeout_s": 30, "start_wait_s": 3,
           "pause_s": 1, "max_rounds": 1, "local_epochs": 1},
    training={"batch_size": 16, "noise_multiplier": 0.8},
)  # fmt: skip
STUDY = SPEC.study_id


def _refused_start(live: LiveFederation) -> str:
    """Start the leader on its damaged state: it must exit 2 on its own; its log."""
    process = live.start(LEADER, TESSERA_ROUND_MAX_ROUNDS="2")
    try:
        status = process.wait(timeout=120)  # a hang guard: the refusal comes at start-up
    except subprocess.TimeoutExpired:
        tail = live.log_tail(LEADER)
        live.kill(LEADER)
        raise AssertionError(
            f"the leader started on a lost store instead of refusing:\n{tail}"
        ) from None
    text = live.log_tail(LEADER, lines=20)
    assert status == 2, text
    return text


def _rebuild(live: LiveFederation) -> subprocess.CompletedProcess[str]:
    command = [str(TESSERA), "aggregator", "rebuild-state", "--config",
               str(live.prepared.config(LEADER))]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_lost_leader_store_is_refused_rebuilt_and_the_federation_goes_on(
    tmp_path: Path,
) -> None:
    with LiveFederation(tmp_path, SPEC) as live:
        live.start_all([LEADER, FOLLOWER, *SITES])
        live.wait_for(LEADER, Event.MODEL_RELEASED, timeout=180, round=1)
        for site in SITES:
            live.wait_for(site, Event.RELEASE_INSTALLED, timeout=60, version=1)
        assert live.stop(LEADER) == 0

        state = live.state(LEADER)
        database = state / "aggregator.sqlite3"
        # 2. Deleted, then emptied: both refused, with the fix named.
        for name in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
            name.unlink(missing_ok=True)
        text = _refused_start(live)
        assert "tessera aggregator rebuild-state" in text and "version 1" in text, text
        assert not live.find(LEADER, Event.ROUND_OPENED, run=1)
        database.write_bytes(b"")
        text = _refused_start(live)
        assert "tessera aggregator rebuild-state" in text, text

        # 3. An altered signed release is not trusted.
        (release_file,) = (state / "models").rglob("release.bin")
        genuine = release_file.read_bytes()
        altered = bytearray(genuine)
        altered[-100] ^= 0x01  # inside the payload (the card, the ONNX file or the weights)
        release_file.write_bytes(bytes(altered))
        refused = _rebuild(live)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "signature" in refused.stderr or "does not verify" in refused.stderr, refused.stderr
        release_file.write_bytes(genuine)

        # 4. The rebuild.
        rebuilt = _rebuild(live)
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        assert "version 1" in rebuilt.stdout and "round 1" in rebuilt.stdout, rebuilt.stdout

        # 5. The federation goes on: round 2, signed by both, installed by both sites.
        live.start(LEADER, TESSERA_ROUND_MAX_ROUNDS="2")
        live.wait_for(LEADER, Event.MODEL_RELEASED, timeout=180, run=3, round=2, version=2)
        live.wait_for(FOLLOWER, Event.MODEL_RELEASED, timeout=60, round=2)
        for site in SITES:
            live.wait_for(site, Event.RELEASE_INSTALLED, timeout=60, version=2)
        live.stop_all()

        roster = load_bundle(live.prepared.bundle(LEADER)).roster
        keys = {a: roster.signing_keys()[a] for a in roster.aggregator_ids}
        for aggregator in (LEADER, FOLLOWER):
            folder = live.state(aggregator)
            with Store(folder / "aggregator.sqlite3", folder / "shares") as store:
                registry = Registry(store, folder / "models")
                assert [r.version for r in registry.list(STUDY)] == [1, 2]
                for version in (1, 2):
                    shown = registry.verify(STUDY, version)
                    release = ModelRelease.from_bytes(shown.release_path.read_bytes())
                    verify_release(release, keys)
                    assert {who for who, _ in release.signatures} == {LEADER, FOLLOWER}
