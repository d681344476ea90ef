"""Issue 19, point 9, with real processes over a real broker (Mosquitto, mutual TLS): a round
whose weight cap and fixed-point precision cannot represent the sites' updates.

The issue: ResNet-18 sites of about 15 samples at the default `round.weight_cap` 10,000;
every weighted delta rounded to zero, the aggregators refused the sum ("metric 'dispersion'
is inf") as one more bad message, and the round aborted only at the agreement timeout, after
every site had spent its epsilon. The same happens here with the study's small CNN and sites
of one or two training samples (four images, half kept to validate) at the default cap and
16 fraction bits.

1. The leader refuses to start with a cap that starves the smallest weight, naming the fix.
2. An up-to-date node (site-a) refuses the round before it trains: its own update would
   round away. It says why and how to fix it, and spends no epsilon.
3. Two nodes that skip that check (`tests/support/unchecked_site`, as nodes did before it
   existed) train and send their genuinely rounded updates. Both aggregators refuse the
   aggregate at once, with the reason, in their logs and audit logs; nothing is released.
   The agreement timeout is 15 minutes, longer than this test waits: before the fix the
   round ended only then.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from support.e2e import REPO, LiveFederation, audit_entries, epsilon_agreement

from node.demo.federation import FederationSpec
from tessera.observability.events import Event

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
CHECKED, UNCHECKED = "site-a", ("site-b", "site-c")
SPEC = FederationSpec(
    sites=(CHECKED, *UNCHECKED),
    federation_id="degenerate-fed",
    min_participants=2,
    round={"collect_timeout_s": 20, "agreement_timeout_s": 900, "start_wait_s": 60,
           "pause_s": 3, "max_rounds": 1, "algorithm": "fedsgd", "learning_rate": 0.1},
    training={"batch_size": 4, "noise_multiplier": 0.8, "validation_fraction": 0.5},
)  # fmt: skip
PRECISION = "aggregate refused (precision)"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_round_that_rounds_updates_away_is_refused_before_training_or_aborted_at_once(
    tmp_path: Path,
) -> None:
    with LiveFederation(tmp_path, SPEC, images_per_site=4) as live:
        starved = live.start(LEADER, TESSERA_ROUND_WEIGHT_CAP="40000")
        assert starved.wait(120) == 2
        assert "lower round.weight_cap to at most 16384" in live.log_tail(LEADER)

        live.start_all([LEADER, FOLLOWER, CHECKED])
        path = os.pathsep.join(
            [str(REPO / "tests" / "support" / "unchecked_site"), os.environ.get("PYTHONPATH", "")]
        )
        for site in UNCHECKED:
            live.start(site, PYTHONPATH=path, TESSERA_TEST_UNCHECKED="1")

        refused = live.wait_for(CHECKED, Event.ROUND_REFUSED, timeout=180, round=1)
        assert refused["reason"] == "update-unrepresentable", refused
        assert re.search(r"a node with [12] training samples? weighs", refused["detail"])
        assert "lower round.weight_cap to at most" in refused["detail"]
        (entry,) = audit_entries(live.state(CHECKED), "round-refused")
        assert entry["reason"] == "update-unrepresentable"
        assert epsilon_agreement(live.state(CHECKED), SPEC.study_id) == (0.0, 0.0)

        for site in UNCHECKED:
            live.wait_for(site, Event.ROUND_JOINED, timeout=120, round=1)
        for aggregator in (LEADER, FOLLOWER):
            abort = live.wait_for(aggregator, Event.ROUND_ABORTED, timeout=120, round=1)
            assert PRECISION in abort["reason"] and "round.weight_cap" in abort["reason"], abort
            live.wait_until(
                lambda a=aggregator: audit_entries(live.state(a), "round-aborted"),
                f"{aggregator}'s audit entry",
                30,
            )
            (aborted,) = audit_entries(live.state(aggregator), "round-aborted")
            assert aborted["round"] == 1 and PRECISION in aborted["reason"]
            assert not live.find(aggregator, Event.MODEL_RELEASED)
