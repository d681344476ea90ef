"""End to end, real processes: the broker goes away mid-round for longer than the publish
timeout, and comes back on the same port (issue 19, point 2).

Two aggregators and two running sites over TLS Mosquitto; a third roster site never runs, so
a round closes only at its deadline. Timeline:

1. once both aggregators hold both running sites' shares of round 1, Mosquitto is stopped
   (gracefully: it keeps its persistence, as a broker restarted for maintenance does);
2. during the outage round 1's deadline passes, and the follower's tick publishes its
   ReceivedSet (and each aggregator its receipts) into the outage, where it waits longer
   than the publish timeout (2 s here, 300 s by default). The old code raised out of the
   follower's main loop, which held the service lock, and the daemon exited (rc 2). Every
   daemon must stay up, say in `/readyz` that the broker is down, and log the outage once,
   not once per message;
3. Mosquitto starts again on the same port, at least three publish timeouts after it
   stopped. The ReceivedSet goes out, so round 1 goes on where it was: the leader publishes
   the participant set and its partial sum, both aggregators sign, and round 1 is released.
   Then the next round, round 2, is released too, with both signatures (each node installs
   both releases, which it does only with every aggregator's signature). No one is
   restarted.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from support.e2e import LiveFederation

from node.demo.federation import FederationSpec
from tessera.observability.events import Event

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
RUNNING_SITES = ("site-a", "site-b")
ABSENT_SITE = "site-c"  # in the roster, never runs: collection waits for the deadline
MEMBERS = (LEADER, FOLLOWER, *RUNNING_SITES)
PUBLISH_TIMEOUT_S = 2.0
COLLECT_S, AGREEMENT_S = 15, 30  # the agreement timeout never fires here
SPEC = FederationSpec(
    sites=(*RUNNING_SITES, ABSENT_SITE),
    federation_id="outage-fed",
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
BROKER_ENV = {
    "TESSERA_BROKER_PUBLISH_TIMEOUT_S": str(PUBLISH_TIMEOUT_S),
    "TESSERA_BROKER_RECONNECT_MAX_S": "1",
}


def readiness(live: LiveFederation, member: str) -> tuple[int, list[str]]:
    """(HTTP status, failing checks) of `member`'s `/readyz`."""
    started = Event.AGGREGATOR_STARTED if live.is_aggregator(member) else Event.NODE_STARTED
    port = live.wait_for(member, started, timeout=60)["http_port"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
            return answer.status, json.loads(answer.read())["failing"]
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())["failing"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_broker_outage_longer_than_the_publish_timeout_ends_with_the_next_round_released(
    tmp_path: Path,
) -> None:
    with LiveFederation(tmp_path, SPEC) as live:
        for member in MEMBERS:
            live.start(member, **BROKER_ENV)

        # 1. Both aggregators hold both running sites' shares of round 1: stop the broker.
        live.wait_until(
            lambda: all(live.held_shares(a, 1) == list(RUNNING_SITES) for a in (LEADER, FOLLOWER)),
            "both aggregators to hold round 1's shares",
            timeout=180,
            watch=MEMBERS,
        )
        before = {m: len(live.events(m)) for m in MEMBERS}
        live.broker.stop()
        stopped_at = time.monotonic()

        # 2. During the outage: not ready, the follower's ReceivedSet stalls, nobody exits.
        for member in MEMBERS:
            live.wait_until(
                lambda m=member: "broker" in readiness(live, m)[1],
                f"{member}'s /readyz to say the broker is down",
                timeout=60,
                watch=MEMBERS,
            )
        live.wait_until(
            lambda: live.find(FOLLOWER, Event.PUBLISH_STALLED, kind="RECEIVED"),
            "the follower's ReceivedSet of round 1 to wait out the publish timeout",
            timeout=90,
            watch=MEMBERS,
        )
        time.sleep(max(0.0, stopped_at + 3 * PUBLISH_TIMEOUT_S - time.monotonic()))
        for member in MEMBERS:
            assert live.running(member), f"{member} exited:\n{live.log_tail(member)}"
        during = {m: live.events(m)[before[m] :] for m in MEMBERS}

        # 3. The broker is back on the same port: round 1 goes on and is released, then
        # round 2, each signed by both aggregators.
        live.broker.start()
        for number in (1, 2):
            live.wait_for(LEADER, Event.MODEL_RELEASED, timeout=180, round=number)
            live.wait_for(FOLLOWER, Event.MODEL_RELEASED, timeout=60, round=number)
            for site in RUNNING_SITES:
                live.wait_for(site, Event.RELEASE_INSTALLED, timeout=60, round=number)
        for site in RUNNING_SITES:
            assert live.node_versions(site) == [1, 2]
        assert not live.find(LEADER, Event.ROUND_ABORTED)
        for member in MEMBERS:
            assert live.running(member), f"{member} exited:\n{live.log_tail(member)}"
            live.wait_until(
                lambda m=member: readiness(live, m) == (200, []),
                f"{member} to be ready again",
                timeout=60,
                watch=MEMBERS,
            )

        # The outage is in each log once (not once per message), and so is the return.
        for member in MEMBERS:
            names = Counter(e["event"] for e in during[member])
            assert names[Event.BROKER_DISCONNECTED] == 1, (member, names)
            # Each aggregator had something to send: the follower its ReceivedSet, the leader
            # its receipts for the sites (published when it closed collection).
            stalls = 1 if member in (LEADER, FOLLOWER) else 0
            assert names[Event.PUBLISH_STALLED] == stalls, (member, names)
            assert max(names.values()) == 1, (member, names)
            assert len(live.find(member, Event.BROKER_DISCONNECTED)) == 1
            first, back = live.find(member, Event.BROKER_CONNECTED)  # at start, after the outage
            assert first["down_s"] is None and back["down_s"] > 0, (first, back)
