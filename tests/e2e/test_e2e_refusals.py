"""Refusals taken by running node daemons over a real broker (Mosquitto, mutual TLS).

Four sites, each breaking one term of the round in a different way, are started as real
`tessera node run` processes; two aggregator processes open one round. Every node refuses
before it touches patient data, records the refusal with its reason in its audit log, and
sends nothing: no aggregator holds a share, the nodes' privacy ledgers charged nothing, and
their metrics count the refusal and zero bytes sent. The round aborts below k.

- site-a: no steward approval for the study (its approvals folder is emptied);
- site-b: its policy insists on k >= 5, the round asks k = 2;
- site-c: its policy caps epsilon far below what one round costs;
- site-d: its policy allows training only in a window that excludes now.

(The other refusal paths — expired study, architecture outside the allowlist, a manifest
signature that does not verify, an approval for another study's hash — are each taken by
`node.round.participation.participate` in tests/node/test_participation.py; here the point is that
the daemon routes a real RoundOpen through that same check and sends nothing.)
"""

from __future__ import annotations

import datetime as dt
import shutil
import urllib.request
from pathlib import Path

import pytest
from support.e2e import LiveFederation, audit_entries

from node.demo.federation import FederationSpec
from tessera.observability.events import Event

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
SPEC = FederationSpec(
    sites=("site-a", "site-b", "site-c", "site-d"),
    federation_id="refusal-fed",
    min_participants=2,
    # Every node refuses within a second of the RoundOpen, so the round only waits out its
    # collection deadline to abort below k: 8 s, not more.
    round={"collect_timeout_s": 8, "agreement_timeout_s": 25, "start_wait_s": 60,
           "pause_s": 3, "max_rounds": 1, "local_epochs": 1},
    training={"batch_size": 16, "noise_multiplier": 0.8},
)  # fmt: skip
EXPECTED = {
    "site-a": "unapproved-study",
    "site-b": "k-below-minimum",
    "site-c": "budget-exhausted",
    "site-d": "outside-window",
}


def _policy(live: LiveFederation, site: str, extra: str) -> Path:
    path = live.write_policy(site, paused=False)
    path.write_text(path.read_text() + extra)
    return path


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_node_refuses_its_broken_term_and_sends_nothing(tmp_path: Path) -> None:
    with LiveFederation(tmp_path, SPEC) as live:
        shutil.rmtree(live.prepared.bundle("site-a") / "approvals")
        (live.prepared.bundle("site-a") / "approvals").mkdir()
        hour = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)).strftime("%H:00")
        later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=4)).strftime("%H:00")
        policies = {
            "site-b": _policy(live, "site-b", "min_participants = 5\n"),
            "site-c": _policy(live, "site-c", "max_epsilon = 0.001\n"),
            "site-d": _policy(
                live, "site-d", f'[window]\nstart = "{hour}"\nend = "{later}"\ntimezone = "UTC"\n'
            ),
        }
        live.start_all([LEADER, FOLLOWER, "site-a"])
        for site, path in policies.items():
            live.start(site, TESSERA_POLICY=str(path))

        abort = live.wait_for(LEADER, Event.ROUND_ABORTED, timeout=150, round=1)
        assert "0 node(s)" in abort["reason"] and "fewer than the minimum k=2" in abort["reason"]
        for site, reason in EXPECTED.items():
            refused = live.wait_for(site, Event.ROUND_REFUSED, timeout=30, round=1)
            assert refused["reason"] == reason, (site, refused)
            (entry,) = audit_entries(live.state(site), "round-refused")
            assert (entry["round"], entry["reason"]) == (1, reason)
            assert not audit_entries(live.state(site), "round-joined")
            assert not audit_entries(live.state(site), "epsilon-spent")
            ledger = live.state(site) / "privacy" / f"{SPEC.study_id}.json"
            assert not ledger.exists() or '"rounds": []' in ledger.read_text()
            port = int(live.find(site, Event.NODE_STARTED)[-1]["http_port"])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                metrics = r.read().decode()
            assert f'tessera_rounds_refused_total{{reason="{reason}"}} 1.0' in metrics
            assert 'tessera_wire_bytes_total{direction="sent"} 0.0' in metrics
            assert "tessera_rounds_joined_total 0.0" in metrics
        for aggregator in (LEADER, FOLLOWER):
            assert live.held_shares(aggregator, 1) == []
            assert not live.find(aggregator, Event.MODEL_RELEASED)
