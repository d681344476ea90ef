"""Issue 18, attack 4, with real processes over a real broker (Mosquitto, mutual TLS).

Two honest sites and one hostile site (`tests/support/hostile_site`: the real node daemon,
whose encoding step sends weighted deltas at the ring's bound instead of its clipped
update) join one round run by two aggregator processes. The aggregate is far outside what
the clip norm allows: before the check, the leader released the model it made of it. Now
both aggregators refuse it, abort the round with the reason (in their logs and in their
audit logs), and no model is released or installed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.e2e import REPO, LiveFederation, audit_entries

from node.demo.federation import FederationSpec
from tessera.observability.events import Event

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
HONEST, HOSTILE = ("site-a", "site-b"), "site-c"
SPEC = FederationSpec(
    sites=(*HONEST, HOSTILE),
    federation_id="poison-fed",
    min_participants=3,
    round={"collect_timeout_s": 60, "agreement_timeout_s": 60, "start_wait_s": 60,
           "pause_s": 3, "max_rounds": 1, "local_epochs": 1},
    training={"batch_size": 16, "noise_multiplier": 0.8},
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hostile_site_cannot_release_a_poisoned_model(tmp_path: Path) -> None:
    with LiveFederation(tmp_path, SPEC) as live:
        live.start_all([LEADER, FOLLOWER, *HONEST])
        path = os.pathsep.join(
            [str(REPO / "tests" / "support" / "hostile_site"), os.environ.get("PYTHONPATH", "")]
        )
        live.start(HOSTILE, PYTHONPATH=path, TESSERA_TEST_HOSTILE="1")

        def ended() -> list[dict[str, object]]:
            aborted = live.find(LEADER, Event.ROUND_ABORTED, round=1)
            return aborted + live.find(LEADER, Event.MODEL_RELEASED)

        live.wait_until(ended, "the round's end at the leader", 240, watch=[LEADER, FOLLOWER])
        for site in SPEC.sites:  # the hostile one too (logged once its shares are out)
            live.wait_for(site, "round-joined", timeout=60, round=1)
        assert not live.find(LEADER, Event.MODEL_RELEASED), "the poisoned model was released"
        for aggregator in (LEADER, FOLLOWER):
            abort = live.wait_for(aggregator, Event.ROUND_ABORTED, timeout=60, round=1)
            assert "aggregate refused (delta)" in abort["reason"], abort
            live.wait_until(
                lambda a=aggregator: audit_entries(live.state(a), "round-aborted"),
                f"{aggregator}'s audit entry",
                30,
            )
            (entry,) = audit_entries(live.state(aggregator), "round-aborted")
            assert entry["round"] == 1 and "aggregate refused (delta)" in entry["reason"]
            assert not live.find(aggregator, Event.MODEL_RELEASED)
        for site in HONEST:
            assert live.node_versions(site) == []
