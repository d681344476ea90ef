"""Issue 19, point 7: clock skew, with real daemons over a real broker (Mosquitto, mutual TLS).

site-b and site-c run with a wall clock 10 minutes ahead (`tests/support/skewed_clock`: the
real node daemon, whose `time.time` and `datetime.now` read 600 s ahead). They used to
refuse every round as "deadline-passed" while `/readyz` said 200, with no word about the
clock. Now each node measures its offset from the leader's signed RoundOpen and reports it
in `/readyz` and `/metrics`. site-b (the default tolerance, 900 s) judges the deadline on
the leader's clock and is counted in the round; site-c (tolerance 120 s) refuses it with a
reason that names the clock, and is not ready until its clock is fixed.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.e2e import REPO, LiveFederation, audit_entries

from node.demo.federation import FederationSpec
from tessera.observability.events import Event

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
SKEW_S = 600
SPEC = FederationSpec(
    sites=("site-a", "site-b", "site-c"),
    federation_id="skew-fed",
    min_participants=2,
    round={"collect_timeout_s": 25, "agreement_timeout_s": 30, "start_wait_s": 90,
           "pause_s": 3, "max_rounds": 1, "local_epochs": 1},
    training={"batch_size": 16, "noise_multiplier": 0.8},
)  # fmt: skip


def http(live: LiveFederation, site: str, path: str) -> tuple[int, bytes]:
    port = int(live.wait_for(site, Event.NODE_STARTED, timeout=120)["http_port"])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def offset_metric(metrics: bytes) -> float:
    match = re.search(rb"^tessera_clock_offset_seconds (\S+)$", metrics, re.MULTILINE)
    assert match, metrics.decode()[-2000:]
    return float(match.group(1))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_node_ten_minutes_ahead_is_counted_and_one_beyond_its_bound_is_told(
    tmp_path: Path,
) -> None:
    with LiveFederation(tmp_path, SPEC) as live:
        skewed = {
            "PYTHONPATH": os.pathsep.join(
                [str(REPO / "tests" / "support" / "skewed_clock"), os.environ.get("PYTHONPATH", "")]
            ),
            "TESSERA_TEST_CLOCK_SKEW_S": str(SKEW_S),
        }
        live.start_all([LEADER, FOLLOWER, "site-a"])
        live.start("site-b", **skewed)
        live.start("site-c", **skewed, TESSERA_MAX_CLOCK_SKEW_S="120")

        live.wait_for(LEADER, Event.MODEL_RELEASED, timeout=240, round=1)
        (agreed,) = audit_entries(live.state(LEADER), "participant-set")
        assert agreed["nodes"] == ["site-a", "site-b"], agreed

        refused = live.wait_for("site-c", Event.ROUND_REFUSED, timeout=30, round=1)
        assert refused["reason"] == "clock-skew", refused
        assert re.search(r"your clock is 6\d\d s ahead of the leader's", refused["detail"])
        assert "NTP" in refused["detail"], refused

        # site-b: ready, and its offset is measured (one-way: the skew plus transit time).
        live.wait_for("site-b", Event.RELEASE_INSTALLED, timeout=60, version=1)
        status, body = http(live, "site-b", "/readyz")
        ready: dict[str, Any] = json.loads(body)
        assert status == 200, ready
        offset = ready["info"]["clock"]["offset_s"]
        assert SKEW_S <= offset < SKEW_S + 60, ready
        _, metrics = http(live, "site-b", "/metrics")
        assert SKEW_S <= offset_metric(metrics) < SKEW_S + 60

        # site-c: not ready, and /readyz says why.
        status, body = http(live, "site-c", "/readyz")
        told: dict[str, Any] = json.loads(body)
        assert status == 503 and "clock" in told["failing"], told
        assert "ahead of the leader's" in told["reasons"]["clock"], told
