"""End to end, real processes: fewer than k nodes, then a node killed in the middle of a round.

One federation (two aggregators, four sites, k = 3), one timeline:

1. all four nodes run, but site-c and site-d are paused by their site policy, so only
   site-a and site-b take part: round 1 closes at its deadline with two nodes, fewer than
   k, and aborts with that reason at both aggregators (RoundAbort, the stores' rounds
   table); nothing is released: no model in either registry, none accepted by any node;
2. site-c and site-d resume (policy file rewritten; nodes re-read it at every RoundOpen);
   round 2 opens, and site-d is SIGKILLed while it trains (its privacy ledger has charged
   round 2, its audit log has not recorded the join). The round
   closes at its deadline with site-a, site-b and site-c (= k) and is released; each
   running node installs it;
3. every surviving node's privacy ledger agrees with the epsilon-spent entries of its audit
   log. The killed node's ledger is ahead of its audit log by exactly the round it was
   killed in (the ledger charges before training, the audit entry is written after it)
   until its start-up reconciliation records the charge.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support.e2e import LiveFederation, audit_entries, epsilon_agreement

from aggregator.registry import Registry
from aggregator.rounds import Stage
from aggregator.store import Store
from node.demo.federation import FederationSpec
from node.privacy.ledger import PrivacyLedger
from node.privacy.reconcile import reconcile_epsilon_audit
from tessera.governance.audit import AuditLog
from tessera.observability.events import Event

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
FIRST, LATE, VICTIM = ("site-a", "site-b"), "site-c", "site-d"
COLLECT_S, AGREEMENT_S = 15, 25
SPEC = FederationSpec(
    sites=(*FIRST, LATE, VICTIM),
    federation_id="dropout-fed",
    min_participants=3,
    round={
        "collect_timeout_s": COLLECT_S,
        "agreement_timeout_s": AGREEMENT_S,
        "start_wait_s": 3,
        "pause_s": 3,
        "max_rounds": 2,
        "local_epochs": 1,
        "learning_rate": 0.05,
    },
    training={"batch_size": 16, "noise_multiplier": 0.8},
)
STUDY = SPEC.study_id
BELOW_K = "fewer than the minimum k=3"


def models_registered(live: LiveFederation, aggregator: str) -> int:
    """Rows in the aggregator's models table (read-only, while it runs)."""
    path = live.state(aggregator) / "aggregator.sqlite3"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return int(db.execute("SELECT COUNT(*) FROM models").fetchone()[0])
    finally:
        db.close()


def charged_rounds(live: LiveFederation, site: str) -> list[int]:
    """Rounds the site's privacy ledger has charged (read while the node runs)."""
    path = live.state(site) / "privacy" / f"{STUDY}.json"
    try:
        return [r["round"] for r in json.loads(path.read_text())["rounds"]]
    except (OSError, ValueError):
        return []  # not written yet, or being replaced


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_fewer_than_k_aborts_then_a_node_killed_mid_round_is_left_out(tmp_path: Path) -> None:
    with LiveFederation(tmp_path, SPEC) as live:
        paused = {site: live.write_policy(site, paused=True) for site in (LATE, VICTIM)}
        live.start_all([LEADER, FOLLOWER, *FIRST])
        live.start(LATE, TESSERA_POLICY=str(paused[LATE]))
        # site-d trains slowly (batch size 1), so that the kill lands while it trains.
        live.start(VICTIM, TESSERA_POLICY=str(paused[VICTIM]), TESSERA_TRAINING_BATCH_SIZE="1")

        # 1. Two nodes of k = 3: abort with the reason, nothing released. The paused nodes
        # refuse round 1 early; resuming them now lets them take part in round 2.
        for site in (LATE, VICTIM):
            live.wait_for(site, Event.ROUND_REFUSED, timeout=90, round=1)
            live.write_policy(site, paused=False)
        abort = live.wait_for(LEADER, Event.ROUND_ABORTED, timeout=COLLECT_S + 90, round=1)
        assert BELOW_K in abort["reason"] and abort["reason"].startswith("2 node(s)")
        for site in FIRST:
            aborted = live.wait_for(site, Event.ROUND_ABORT_RECEIVED, timeout=30, round=1)
            assert BELOW_K in aborted["reason"]
        live.wait_until(
            lambda: any(
                r.get("round") == 1 and BELOW_K in str(r.get("reason"))
                for r in _rounds(live, FOLLOWER)
            ),
            "the follower to record round 1 aborted",
            timeout=30,
            watch=[FOLLOWER],
        )
        for aggregator in (LEADER, FOLLOWER):
            assert not live.find(aggregator, Event.MODEL_RELEASED)
            assert models_registered(live, aggregator) == 0
            assert not list((live.state(aggregator) / "models").rglob("release.bin"))
        for site in SPEC.sites:
            assert live.node_versions(site) == []
            assert not audit_entries(live.state(site), "release")
            joined = [e["round"] for e in audit_entries(live.state(site), "round-joined")]
            assert joined == ([1] if site in FIRST else []), site
        for site in (LATE, VICTIM):
            (refused,) = audit_entries(live.state(site), "round-refused")
            assert (refused["round"], refused["reason"]) == (1, "paused")

        # 2. site-d is killed while it trains in round 2.
        live.wait_for(LEADER, Event.ROUND_OPENED, timeout=60, round=2)
        live.wait_until(
            lambda: 2 in charged_rounds(live, VICTIM),
            "site-d to charge round 2 (it trains right after)",
            timeout=COLLECT_S + 30,
            watch=[VICTIM],
            interval=0.02,
        )
        live.kill(VICTIM)
        joined = [e["round"] for e in audit_entries(live.state(VICTIM), "round-joined")]
        assert 2 not in joined, "site-d finished round 2 before the kill landed"

        released = live.wait_for(
            LEADER, Event.MODEL_RELEASED, timeout=COLLECT_S + AGREEMENT_S + 60, round=2
        )
        assert released["version"] == 1
        live.wait_for(FOLLOWER, Event.MODEL_RELEASED, timeout=60, round=2)
        for site in (*FIRST, LATE):
            live.wait_for(site, Event.RELEASE_INSTALLED, timeout=60, version=1)

        # The running services' endpoints: ready once connected with a verified model,
        # metrics without patient data, inference with the version it used.
        _check_endpoints(live, FIRST[0], node=True)
        _check_endpoints(live, LEADER, node=False)

        live.stop_all()

        for aggregator, reason in ((LEADER, BELOW_K), (FOLLOWER, f"aborted by {LEADER}")):
            state = live.state(aggregator)
            with Store(state / "aggregator.sqlite3", state / "shares") as store:
                first, second = store.list_rounds(STUDY)
                assert first.state.stage is Stage.ABORTED
                assert reason in (first.state.abort_reason or "")
                assert BELOW_K in (first.state.abort_reason or "")
                assert first.state.participants is None
                assert second.state.stage is Stage.RELEASED
                assert second.state.close_reason == "deadline"
                assert second.state.participants == (*FIRST, LATE)
                registry = Registry(store, state / "models")
                assert [(r.version, r.round) for r in registry.list(STUDY)] == [(1, 2)]
                registry.verify(STUDY, 1)
        for site in (*FIRST, LATE):
            assert live.node_versions(site) == [1]
        assert live.node_versions(VICTIM) == []

        # 3. Ledger and audit log: equal at every surviving node.
        for site in (*FIRST, LATE):
            ledger_total, audit_total = epsilon_agreement(live.state(site), STUDY)
            assert ledger_total > 0
            assert audit_total == pytest.approx(ledger_total, rel=1e-9, abs=1e-12), site
        # The killed node: the ledger charged round 2, the audit log never heard of it...
        ledger_total, audit_total = epsilon_agreement(live.state(VICTIM), STUDY)
        assert charged_rounds(live, VICTIM) == [2]
        assert audit_total == 0.0 < ledger_total
        # ...until it starts again: the node's start-up reconciliation (what NodeDaemon runs
        # before it connects) records the charge, and the two agree.
        victim = live.state(VICTIM)
        data = json.loads((victim / "privacy" / f"{STUDY}.json").read_text())
        ledger = PrivacyLedger(victim / "privacy" / f"{STUDY}.json", STUDY, 1e9, data["delta"])
        with AuditLog.open(victim / "audit.log", counts_only=True) as audit:
            assert reconcile_epsilon_audit(ledger, audit) == 1
            assert reconcile_epsilon_audit(ledger, audit) == 0  # idempotent
        ledger_total, audit_total = epsilon_agreement(victim, STUDY)
        assert audit_total == pytest.approx(ledger_total, rel=1e-9) and ledger_total > 0


def _rounds(live: LiveFederation, aggregator: str) -> list[dict[str, object]]:
    """The aggregator's rounds table (read-only, while it runs)."""
    path = live.state(aggregator) / "aggregator.sqlite3"
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute("SELECT round, stage, abort_reason FROM rounds").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []
    return [{"round": r, "stage": s, "reason": why} for r, s, why in rows]


def _get(port: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _check_endpoints(live: LiveFederation, member: str, *, node: bool) -> None:
    started = live.find(member, Event.NODE_STARTED if node else Event.AGGREGATOR_STARTED)[-1]
    port = int(started["http_port"])
    assert _get(port, "/healthz")[0] == 200
    status, body = _get(port, "/readyz")
    ready = json.loads(body)  # a node adds `info` (its measured clock offset)
    assert status == 200 and (ready["ready"], ready["failing"]) == (True, []), body
    status, metrics = _get(port, "/metrics")
    text = metrics.decode()
    assert status == 200 and "tessera_broker_connected 1.0" in text
    assert "tessera_model_version 1.0" in text
    assert 'tessera_wire_bytes_total{direction="received"}' in text
    if not node:
        assert 'tessera_aggregator_rounds_total{outcome="released"} 1.0' in text
        assert 'tessera_aggregator_rounds_total{outcome="aborted"} 1.0' in text
        return
    assert "tessera_rounds_joined_total 2.0" in text  # rounds 1 (aborted later) and 2
    synth = live.root / "synth" / "site-00"
    names = {row["accession_number"] for row in csv.DictReader((synth / "labels.csv").open())}
    assert not any(name in text for name in names)  # no patient data in the metrics
    dicom = next((synth / "dicom").rglob("*.dcm"))
    status, body = _get(port, "/v1/infer", dicom.read_bytes())
    result = json.loads(body)
    assert status == 200 and result["model_version"] == "1", result
    assert result["label"] in ("absent", "present")
    assert (
        'tessera_inference_latency_seconds_count{outcome="ok"} 1.0'
        in _get(port, "/metrics")[1].decode()
    )
