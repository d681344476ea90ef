"""End to end, real processes: an aggregator killed mid-round, what it left on disk, a
restart, and forged releases.

One federation (two aggregators, four sites of which three run; k = 2), one timeline:

1. round 1 is released (collection closes at the deadline: site-d never runs);
2. round 2: once the leader holds the three running sites' shares, it is SIGKILLed. Its
   state folder, copied at that moment, is everything it stored for the round: the share
   files and the share rows in SQLite. Their bytes must pass the chi-square uniformity checks
   of tests/tessera/test_sharing_uniformity.py, which reject the plaintext update vector
   (negative control). The follower aborts round 2 after its deadline plus its agreement
   timeout, with that reason;
3. the leader restarts: `store.recover()` marks round 2 aborted ("aggregator restarted")
   and deletes its shares; round 3 is released; both registries still load and verify
   version 1, and every node holds versions 1 and 2;
4. with the aggregators stopped, a release signed by one aggregator only and a release with
   a tampered ONNX file are published on the release topic: every node audits a refusal and
   its model store is unchanged;
5. every node's privacy ledger agrees with the epsilon-spent entries of its audit log.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sqlite3
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from support.e2e import LiveFederation, audit_entries, epsilon_agreement

from aggregator.registry import Registry
from aggregator.rounds import Stage
from aggregator.store import RESTART_REASON, Store
from broker import topics
from broker.provisioning.bundle import load_bundle
from broker.session import Session
from broker.transfer import send_payload
from node.demo.federation import FederationSpec
from tessera.crypto.flatten import flatten
from tessera.crypto.sharing import ShareContext, full_share_holder
from tessera.crypto.signing import load_private_key
from tessera.observability.events import Event
from tessera.wire.envelopes import seal_envelope
from tessera.wire.release import ModelRelease, ReleaseBundle, sign_release, verify_release

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
RUNNING_SITES = ("site-a", "site-b", "site-c")  # site-d is in the roster but never runs
# The follower waits out COLLECT_S + AGREEMENT_S in round 2; an honest round's agreement
# (rounds 1 and 3) took under 3 s on the loaded 2-core machine, so 15 s is ample.
COLLECT_S, AGREEMENT_S = 15, 15
SPEC = FederationSpec(
    sites=(*RUNNING_SITES, "site-d"),
    # With this id the leader carries all three running sites' full-length shares in
    # round 2 (tessera.crypto.sharing.full_share_holder), so the uniformity check has ~280 KB.
    federation_id="crash-fed-10",
    min_participants=2,
    round={
        "collect_timeout_s": COLLECT_S,
        "agreement_timeout_s": AGREEMENT_S,
        "start_wait_s": 3,
        "pause_s": 1,
        "max_rounds": 2,
        "local_epochs": 1,
        "learning_rate": 0.05,
    },
    training={"batch_size": 16, "noise_multiplier": 0.8},
)
STUDY = SPEC.study_id


def uniformity_helpers() -> ModuleType:
    """tests/tessera/test_sharing_uniformity.py, loaded by path (test folders are not
    packages): its `uniformity_p_values` and `ALPHA` are the checks reused here."""
    path = Path(__file__).parents[1] / "tessera" / "test_sharing_uniformity.py"
    spec = importlib.util.spec_from_file_location("_e2e_sharing_uniformity", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stored_share_bytes(state_copy: Path, round_number: int) -> tuple[bytes, int, int]:
    """Every share byte an aggregator's state folder holds for a round: the full-share
    files and the seeds of its SQLite share rows. Also the file and seed counts."""
    db = sqlite3.connect(state_copy / "aggregator.sqlite3")
    try:
        rows = db.execute(
            "SELECT kind, seed, path FROM shares WHERE study_id=? AND round=?",
            (STUDY, round_number),
        ).fetchall()
    finally:
        db.close()
    files = sorted((state_copy / "shares").rglob("*.share"))
    # Only this round's: a finished round's shares are deleted when it ends. The rows name
    # the files by their path in the live folder; the copy holds the same names.
    assert {f.parent.name for f in files} <= {f"{round_number:010d}"}
    assert {Path(p).name for kind, _, p in rows if kind == "full"} == {f.name for f in files}
    every_row = sqlite3.connect(state_copy / "aggregator.sqlite3")
    try:
        (other_rounds,) = every_row.execute(
            "SELECT COUNT(*) FROM shares WHERE round != ?", (round_number,)
        ).fetchone()
    finally:
        every_row.close()
    assert other_rounds == 0
    seeds = [bytes(seed) for kind, seed, _ in rows if kind == "seed"]
    data = b"".join(f.read_bytes() for f in files) + b"".join(seeds)
    return data, len(files), len(seeds)


def assert_uniform(helpers: ModuleType, data: bytes, what: str) -> None:
    """The byte-histogram chi-square test of test_sharing_uniformity, and its 16-bit one
    where there are enough bytes for it (5 expected per bin)."""
    vector = np.frombuffer(data[: len(data) // 4 * 4], dtype="<u4")
    p_values = helpers.uniformity_p_values(vector)
    if vector.size * 2 < 5 * (1 << 16):
        del p_values["16-bit"]
    for test, p_value in p_values.items():
        assert p_value > helpers.ALPHA, f"{what}: {test} chi-square p = {p_value:.3g}"


def forged_releases(live: LiveFederation) -> list[tuple[str, bytes]]:
    """(what, wire bytes): a release signed by the leader only, and version 2 with its ONNX
    file tampered with after both aggregators signed."""
    registry_folder = Path(live.state(LEADER)) / "models"
    (release_file,) = [
        p for p in registry_folder.rglob("release.bin") if p.parent.name == f"{2:010d}"
    ]
    real = ModelRelease.from_bytes(release_file.read_bytes())
    bundle = ReleaseBundle.from_bytes(real.payload)
    leader_key = load_private_key(live.prepared.bundle(LEADER) / "signing.key")

    unsigned = ModelRelease(
        real.federation_id, real.study_id, real.round + 1, real.version + 1, real.model_hash,
        real.model_hash, real.onnx_hash, real.card_hash, real.payload,
    )  # fmt: skip
    one_signature = sign_release(unsigned, LEADER, leader_key)
    assert len(one_signature.signatures) == 1 and one_signature.payload

    onnx = bytearray(bundle.onnx)
    onnx[len(onnx) // 2] ^= 0xFF
    tampered_payload = ReleaseBundle(bundle.weights, bytes(onnx), bundle.card).to_bytes()
    tampered = ModelRelease(
        real.federation_id, real.study_id, real.round, real.version, real.parent_hash,
        real.model_hash, real.onnx_hash, real.card_hash, tampered_payload, real.signatures,
    )  # fmt: skip
    return [
        ("signed by one aggregator", seal_envelope(one_signature, LEADER, leader_key)),
        ("tampered ONNX", tampered.to_bytes()),
    ]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_an_aggregator_killed_mid_round_aborts_cleanly_and_leaves_only_uniform_bytes(
    tmp_path: Path,
) -> None:
    helpers = uniformity_helpers()
    with LiveFederation(tmp_path, SPEC) as live:
        live.start_all([LEADER, FOLLOWER, *RUNNING_SITES])

        # 1. A first release, so that the registry has a version to keep intact.
        live.wait_for(LEADER, Event.MODEL_RELEASED, timeout=150, round=1)
        for site in RUNNING_SITES:
            live.wait_for(site, Event.RELEASE_INSTALLED, timeout=60, version=1)

        # 2. Kill the leader once it holds every running site's share of round 2.
        live.wait_for(LEADER, Event.ROUND_OPENED, timeout=60, round=2)
        live.wait_until(
            lambda: live.held_shares(LEADER, 2) == sorted(RUNNING_SITES),
            "the leader to hold three shares of round 2",
            timeout=COLLECT_S + 30,
            watch=[LEADER],
            interval=0.05,
        )
        live.kill(LEADER)
        assert not live.find(LEADER, Event.MODEL_RELEASED, round=2), "killed too late"
        killed_state = tmp_path / "killed-leader-state"
        shutil.copytree(live.state(LEADER), killed_state)

        data, files, seeds = stored_share_bytes(killed_state, 2)
        leader_index = sorted(SPEC.aggregators).index(LEADER)  # the roster's order
        expected_files = sum(
            full_share_holder(ShareContext(SPEC.federation_id, STUDY, 2, site), 2) == leader_index
            for site in RUNNING_SITES
        )
        assert (files, seeds) == (expected_files, len(RUNNING_SITES) - expected_files)
        assert files >= 1 and len(data) >= 1 << 16, f"only {len(data)} share bytes to test"
        assert_uniform(helpers, data, f"{files} share files + {seeds} seeds")

        # Negative control: the same check on a plaintext float32 update vector (the
        # round 1 model minus the genesis model) must reject uniformity.
        with Store(killed_state / "aggregator.sqlite3", tmp_path / "scratch-shares") as store:
            registry = Registry(store, killed_state / "models")
            v1, _ = flatten(registry.weights(STUDY, 1))
        model = live.prepared.study_model()
        genesis, _ = flatten(model.genesis())
        update = (np.asarray(v1, np.float32) - np.asarray(genesis, np.float32)).astype("<f4")
        assert np.any(update != 0)
        with pytest.raises(AssertionError, match="chi-square"):
            assert_uniform(helpers, update.tobytes(), "plaintext float32 update")

        # The follower aborts round 2 after its deadline plus its agreement timeout.
        abort = live.wait_for(
            FOLLOWER, Event.ROUND_ABORTED, timeout=COLLECT_S + AGREEMENT_S + 60, round=2
        )
        assert "agreement timeout" in abort["reason"]
        deadline_ms, aborted_ms = _deadline_and_update(live, FOLLOWER, 2)
        assert aborted_ms >= deadline_ms + AGREEMENT_S * 1000
        assert not live.find(FOLLOWER, Event.MODEL_RELEASED, round=2)

        # 3. Restart the leader: it recovers and opens round 3 (max_rounds counts the rounds
        # its store already holds, so raise it by one), which is released.
        live.start(LEADER, TESSERA_ROUND_MAX_ROUNDS="3", TESSERA_ROUND_START_WAIT_S="1")
        recovered = live.wait_for(LEADER, Event.ROUND_RECOVERED, timeout=60, run=1)
        assert recovered["round"] == 2
        assert not list((live.state(LEADER) / "shares").rglob("*.share"))
        live.wait_for(LEADER, Event.MODEL_RELEASED, timeout=150, run=1, round=3)
        live.wait_for(FOLLOWER, Event.MODEL_RELEASED, timeout=60, round=3)
        for site in RUNNING_SITES:
            live.wait_for(site, Event.RELEASE_INSTALLED, timeout=60, version=2)

        # 4. Forged releases, published with the leader's certificate while it is stopped.
        assert live.stop(LEADER) == 0
        assert live.stop(FOLLOWER) == 0
        before = {site: live.node_versions(site) for site in RUNNING_SITES}
        assert all(versions == [1, 2] for versions in before.values()), before
        refused_before = {s: len(_refusals(live, s)) for s in RUNNING_SITES}
        forged = forged_releases(live)
        bundle = load_bundle(live.prepared.bundle(LEADER))
        session = Session(bundle.session_config("127.0.0.1", port=live.broker.mqtt_port))
        session.start()
        try:
            session.wait_connected(20)
            for _, wire in forged:
                send_payload(session, topics.release_topic(SPEC.federation_id, STUDY), wire)
        finally:
            session.close()
        for site in RUNNING_SITES:
            # The audit entry is written before the log line: wait for both.
            live.wait_until(
                lambda site=site: (
                    len(_refusals(live, site)) >= refused_before[site] + len(forged)
                    and len(live.find(site, Event.RELEASE_REFUSED)) >= len(forged)
                ),
                f"{site} to audit and log {len(forged)} refused releases",
                timeout=60,
                watch=[site],
            )
            refusals = _refusals(live, site)[refused_before[site] :]
            assert [r["reason"] for r in refusals] == ["not-verified"] * len(forged), refusals
            after = live.node_versions(site)
            assert after == before[site], f"{site}'s model store changed: {after}"

        live.stop_all()

        # The stores: round 2 aborted at both, with the reasons; round 1 and 3 released.
        roster = load_bundle(live.prepared.bundle(LEADER)).roster
        keys = {a: roster.signing_keys()[a] for a in roster.aggregator_ids}
        for aggregator, reason in ((LEADER, RESTART_REASON), (FOLLOWER, "agreement timeout")):
            with Store(
                live.state(aggregator) / "aggregator.sqlite3", live.state(aggregator) / "shares"
            ) as store:
                stages = {r.state.round: r.state.stage for r in store.list_rounds(STUDY)}
                assert stages == {1: Stage.RELEASED, 2: Stage.ABORTED, 3: Stage.RELEASED}
                aborted = store.load_round(STUDY, 2)
                assert aborted is not None and reason in (aborted.state.abort_reason or "")
                registry = Registry(store, live.state(aggregator) / "models")
                assert [r.version for r in registry.list(STUDY)] == [1, 2]
                for version in (1, 2):
                    shown = registry.verify(STUDY, version)
                    registry.weights(STUDY, version)
                    release = ModelRelease.from_bytes(shown.release_path.read_bytes())
                    verify_release(release, keys)
                    assert hashlib.sha256(shown.weights_path.read_bytes()).digest() == (
                        release.model_hash
                    )
            assert not list((live.state(aggregator) / "shares").rglob("*.share"))

        # 5. The privacy ledger and the audit log agree at every node.
        for site in RUNNING_SITES:
            ledger_total, audit_total = epsilon_agreement(live.state(site), STUDY)
            assert ledger_total > 0
            assert audit_total == pytest.approx(ledger_total, rel=1e-9, abs=1e-12), site


def _deadline_and_update(
    live: LiveFederation, aggregator: str, round_number: int
) -> tuple[int, int]:
    """(deadline, last update) of a round in the aggregator's store, in ms (read-only)."""
    path = live.state(aggregator) / "aggregator.sqlite3"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute(
            "SELECT deadline_ms, updated_ms FROM rounds WHERE study_id=? AND round=?",
            (STUDY, round_number),
        ).fetchone()
    finally:
        db.close()
    return int(row[0]), int(row[1])


def _refusals(live: LiveFederation, site: str) -> list[dict[str, object]]:
    return [
        dict(f) for f in audit_entries(live.state(site), "release") if f["outcome"] == "refused"
    ]
