"""A hostile member against the aggregators' MQTT intake, with real processes over a real
broker (Mosquitto, mutual TLS, the generated ACL): issue 19 point 8 and issue 20 point 5.

The hostile member is a real MQTT client with site-c's certificate, publishing only where
the ACL lets site-c publish (`tests/support/hostile_client.py`); site-a and site-b are real
nodes, agg-uni (leader) and agg-ngo real aggregators. k = 2, so a round over the two honest
sites releases.

- A flood: site-c publishes junk at QoS 1 as fast as it can on its share topics, its audit
  topic and its presence while the honest nodes train and send. Both honest shares are
  counted and the round releases; the broker dropped nothing for either aggregator; each
  aggregator refuses the flood in aggregate (`intake-throttled`, naming the sender, in its
  log and its audit log) and its log stays short whatever the flood's size.
- Stalled and oversized transfers: before the round and every few seconds during it,
  site-c opens 16 transfers it never finishes (160 bytes in all) at each aggregator, and
  two frames declaring 256 MiB each at the follower. The follower still adopts the
  leader's RoundOpen, both honest shares are counted, and the round releases; each
  aggregator displaced site-c's own transfers (`transfer-evicted`).
- In the same federation, a share that arrives after its aggregator closed collection:
  site-d's node sends its shares after the deadline (`tests/support/late_site`). Each
  aggregator publishes the commitments it holds; site-d learns from both that its share
  was not counted (log, metric, audit log), site-a and site-b that theirs were.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from support.e2e import REPO, LiveFederation, audit_entries
from support.hostile_client import HostileClient

from broker import topics
from node.demo.federation import FederationSpec
from tessera.observability.events import Event

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
AGGREGATORS = (LEADER, FOLLOWER)
HONEST, HOSTILE, LATE = ("site-a", "site-b"), "site-c", "site-d"
ATTACK_EVERY_S = 5.0  # 34 messages each time: within site-c's intake budget


def spec(federation_id: str, collect_s: int, *more_sites: str) -> FederationSpec:
    """site-a, site-b, site-c (and `more_sites`), k = 2, one round; the leader opens it
    once every member is online."""
    return FederationSpec(
        sites=(*HONEST, HOSTILE, *more_sites),
        federation_id=federation_id,
        min_participants=2,
        round={"collect_timeout_s": collect_s, "agreement_timeout_s": 60,
               "start_wait_s": 120, "pause_s": 3, "max_rounds": 1, "local_epochs": 1},
        training={"batch_size": 16, "noise_multiplier": 0.8},
    )  # fmt: skip


def hostile_topics(live: LiveFederation) -> list[str]:
    """Every topic the ACL lets site-c write in this study (and its presence)."""
    fed, study = live.spec.federation_id, live.spec.study_id
    return [
        *(topics.share_topic(fed, study, a, HOSTILE) for a in AGGREGATORS),
        topics.audit_topic(fed, study, HOSTILE),
        topics.presence_topic(fed, HOSTILE),
    ]


def hostile(live: LiveFederation) -> HostileClient:
    """site-c as a raw MQTT client under its own certificate."""
    return HostileClient(live.prepared.bundle(HOSTILE), live.broker.host, live.broker.mqtt_port)


def assert_released_over_the_honest_sites(live: LiveFederation) -> None:
    """Round 1 released at both aggregators over site-a and site-b; both nodes installed it."""
    live.wait_for(LEADER, Event.MODEL_RELEASED, timeout=240, round=1)
    live.wait_for(FOLLOWER, Event.MODEL_RELEASED, timeout=60, round=1)
    for aggregator in AGGREGATORS:
        live.wait_until(
            lambda a=aggregator: audit_entries(live.state(a), "participant-set"),
            f"{aggregator}'s participant-set audit entry",
            30,
        )
        (entry,) = audit_entries(live.state(aggregator), "participant-set")
        assert entry["nodes"] == list(HONEST), (aggregator, entry)
    for site in HONEST:
        live.wait_for(site, Event.RELEASE_INSTALLED, timeout=60, version=1)


def metric(port: int, name: str) -> float:
    """The sum of a Prometheus family's samples named `name` on a service's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_flooding_member_loses_no_honest_share_and_is_refused_in_aggregate(
    tmp_path: Path,
) -> None:
    with LiveFederation(tmp_path, spec("flood-fed", 30)) as live:
        live.start_all([*AGGREGATORS, *HONEST])
        client = hostile(live)
        client.online()  # every member online: the leader opens round 1
        client.close()
        live.wait_for(LEADER, Event.ROUND_OPENED, timeout=120, round=1)
        flood = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "support" / "hostile_client.py"), "flood",
             "--bundle", str(live.prepared.bundle(HOSTILE)), "--host", live.broker.host,
             "--port", str(live.broker.mqtt_port), *hostile_topics(live)],
            stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            assert flood.stdout is not None
            assert json.loads(flood.stdout.readline()) == {"connected": True}
            # The flood runs while both honest nodes train and send their shares.
            for site in HONEST:
                live.wait_for(site, Event.ROUND_JOINED, timeout=120, round=1)
        finally:
            flood.terminate()
            out, _ = flood.communicate(timeout=60)
        sent = json.loads(out.splitlines()[-1])
        assert_released_over_the_honest_sites(live)

        # The broker dropped nothing on its way to either aggregator.
        assert "Outgoing messages are being dropped" not in live.broker.log()
        lines = {a: len(live.events(a)) for a in AGGREGATORS}
        for aggregator in AGGREGATORS:
            # Refused visibly, in aggregate: the sender and how many, in the log and the
            # aggregator's audit log; the count on /metrics.
            throttled = live.wait_for(
                aggregator, Event.INTAKE_THROTTLED, timeout=60, sender=HOSTILE
            )
            assert throttled["dropped"] > 0
            entries = live.wait_until(
                lambda a=aggregator: audit_entries(live.state(a), "intake-throttled"),
                f"{aggregator}'s intake-throttled audit entry",
                30,
            )
            assert {e["sender"] for e in entries} == {HOSTILE}
            port = live.find(aggregator, Event.AGGREGATOR_STARTED)[0]["http_port"]
            dropped = metric(port, "tessera_aggregator_intake_dropped_total")
            assert dropped == sum(
                e["dropped"] for e in live.find(aggregator, Event.INTAKE_THROTTLED)
            )
            # A bounded log: a few dozen lines for the whole round, however many messages
            # the flood sent (thousands: each aggregator reads three of its four topics).
            assert lines[aggregator] < 150, (aggregator, lines[aggregator], sent)
        assert sent["published"] > 20 * max(lines.values()), sent
        for site in HONEST:
            for aggregator in AGGREGATORS:
                live.wait_for(site, Event.SHARE_CONFIRMED, timeout=30, aggregator=aggregator)
            assert not live.find(site, Event.SHARE_NOT_RECEIVED)


def attack_transfers(live: LiveFederation, client: HostileClient) -> None:
    """16 transfers of 10 bytes never finished at each aggregator, and two frames declaring
    256 MiB each at the follower (issue 20, point 5)."""
    fed, study = live.spec.federation_id, live.spec.study_id
    for aggregator in AGGREGATORS:
        client.stale_transfers(topics.share_topic(fed, study, aggregator, HOSTILE), 16)
    client.declare(topics.share_topic(fed, study, FOLLOWER, HOSTILE), 256 << 20, 2)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_stalled_and_oversized_transfers_block_no_one_and_a_late_node_learns_it(
    tmp_path: Path,
) -> None:
    with LiveFederation(tmp_path, spec("stall-fed", 20, LATE)) as live:
        live.start_all([*AGGREGATORS, *HONEST])  # the round opens once site-c is online
        path = os.pathsep.join(
            [str(REPO / "tests" / "support" / "late_site"), os.environ.get("PYTHONPATH", "")]
        )
        live.start(LATE, PYTHONPATH=path, TESSERA_TEST_LATE="1")
        for aggregator in AGGREGATORS:
            live.wait_for(aggregator, Event.AGGREGATOR_STARTED, timeout=120)
        client = hostile(live)
        stop = threading.Event()

        def keep_attacking() -> None:
            # Fresh every few seconds, so that the attack never waits on a transfer
            # timeout: at any moment of the round, site-c holds stalled transfers.
            while not stop.is_set():
                attack_transfers(live, client)
                stop.wait(ATTACK_EVERY_S)

        attacker = threading.Thread(target=keep_attacking, daemon=True)
        try:
            attack_transfers(live, client)
            # Presence comes after the attack on the same session: each aggregator reads it
            # (and so opens the round) only once it has handled the frames before it.
            client.online()
            attacker.start()
            live.wait_for(LEADER, Event.ROUND_OPENED, timeout=120, round=1)
            assert_released_over_the_honest_sites(live)
        finally:
            stop.set()
            if attacker.is_alive():
                attacker.join(60)
            client.close()
        for aggregator in AGGREGATORS:  # the attack was met by the quotas, not a timeout
            assert live.find(aggregator, Event.TRANSFER_EVICTED, sender=HOSTILE), aggregator

        # site-d sent its shares after collection closed: it learns so from each aggregator.
        for aggregator in AGGREGATORS:
            missed = live.wait_for(
                LATE, Event.SHARE_NOT_RECEIVED, timeout=120, round=1, aggregator=aggregator
            )
            assert missed["held"] == 2  # the honest sites' shares
            for site in HONEST:
                live.wait_for(site, Event.SHARE_CONFIRMED, timeout=30, aggregator=aggregator)
        for site in HONEST:
            assert not live.find(site, Event.SHARE_NOT_RECEIVED)
        entries = audit_entries(live.state(LATE), "share-not-received")
        assert sorted(e["aggregator"] for e in entries) == sorted(AGGREGATORS)
        assert all(e["round"] == 1 for e in entries)
        port = live.find(LATE, Event.NODE_STARTED)[0]["http_port"]
        assert metric(port, "tessera_node_shares_not_received_total") == 2
