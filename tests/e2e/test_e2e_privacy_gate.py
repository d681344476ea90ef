"""The privacy-audit release gate with real processes on a real broker (Mosquitto, mutual
TLS): a study that requires an audit, two aggregator processes, three node processes, two
rounds (the first candidate descends from the genesis model, the second from version 1).

The leader publishes the round's candidate, signed by itself alone; each node that trained it
runs the membership-inference audit on its own data (shadow models included, at a small
budget), signs a report of aggregate figures and publishes it; the aggregators gate and
release. The release every node installs carries each site's figures and epsilon on its
model card, and each node's audit log records the audit it ran. The hold paths (a site over
the limit, a report missing at the deadline, bad reports) are taken by the same service code
in tests/aggregator/test_service_audit.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.e2e import LiveFederation, audit_entries

from node.demo.federation import FederationSpec
from node.round.releases import CARD_FILE
from tessera.observability.events import Event

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
SITES = ("site-a", "site-b", "site-c")
SPEC = FederationSpec(
    sites=SITES,
    federation_id="gate-fed",
    architecture="spot-cnn-v1",
    min_participants=2,
    privacy_audit_limit=0.99,  # every report passes: this test follows the release path
    round={"collect_timeout_s": 60, "agreement_timeout_s": 60, "audit_timeout_s": 240,
           "start_wait_s": 60, "pause_s": 3, "max_rounds": 2, "local_epochs": 1},
    training={"batch_size": 16, "noise_multiplier": 0.8},
)  # fmt: skip
AUDIT_BUDGET = {"TESSERA_PRIVACY_AUDIT_SHADOW_MODELS": "2", "TESSERA_PRIVACY_AUDIT_BOOTSTRAP": "50"}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_every_site_audits_the_candidate_and_the_release_carries_the_figures(
    tmp_path: Path,
) -> None:
    with LiveFederation(tmp_path, SPEC, images_per_site=120) as live:
        live.start_all([LEADER, FOLLOWER])
        for site in SITES:
            live.start(site, **AUDIT_BUDGET)

        for number in (1, 2):  # the first candidate's parent is genesis, the second's v1
            live.wait_for(LEADER, Event.CANDIDATE_BUILT, timeout=200, round=number)
            for site in SITES:
                audit = live.wait_for(site, Event.PRIVACY_AUDIT, timeout=200, round=number)
                assert 0.0 <= audit["tpr_at_0_1pct_fpr"] <= 1.0 and 0.0 <= audit["auc"] <= 1.0
                # DP-trained: the empirical bound is reported beside the accountant's epsilon
                assert audit["empirical_epsilon"] <= audit["accountant_epsilon"]
            for aggregator in (LEADER, FOLLOWER):
                live.wait_for(aggregator, Event.AUDIT_PASSED, timeout=120, round=number)
                live.wait_for(aggregator, Event.MODEL_RELEASED, timeout=120, round=number)

        for site in SITES:
            live.wait_until(
                lambda s=site: live.node_versions(s) == [1, 2], f"{site} installs v2", timeout=60
            )
            audits = audit_entries(live.state(site), "privacy-audit")
            spent = audit_entries(live.state(site), "epsilon-spent")
            assert [(e["outcome"], e["version"]) for e in audits] == [("reported", 1),
                                                                      ("reported", 2)]  # fmt: skip
            for version, entry, charge in zip((1, 2), audits, spent, strict=True):
                folder = live.state(site) / "models" / str(version)
                card = json.loads((folder / CARD_FILE).read_text())
                assert set(card["privacy_audit"]["per_site"]) == set(SITES)
                assert set(card["privacy"]["epsilon_per_site"]) == set(SITES)
                figures = card["privacy_audit"]["per_site"][site]
                assert figures["tpr_at_0_1pct_fpr"] == entry["tpr_at_0_1pct_fpr"]
                total = charge["total"]  # the site's composed epsilon after that round
                assert card["privacy"]["epsilon_per_site"][site] == pytest.approx(total)
                assert figures["accountant_epsilon"] == pytest.approx(total)
        # the candidate was never installed: the store holds the jointly signed release only
        for site in SITES:
            assert not [e for e in audit_entries(live.state(site), "release")
                        if e.get("outcome") == "refused"]  # fmt: skip
