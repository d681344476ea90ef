"""Issue 20, point 1: a member cannot use another member's MQTT client id.

The broker's client id is the member id, and a session (its subscriptions and queued
messages) is keyed by it. A hostile site that connects with its own certificate but the
victim's client id must not disconnect the victim or take over or wipe its session, on
either listener: the broker replaces every client id with the certificate's common name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from support.mosquitto import Inbox, MosquittoProcess, SessionFactory, raw_client

from broker import topics
from broker.session import ConnectionChange

FED, STUDY = "fed-test", "study-1"


@pytest.mark.parametrize(
    ("victim", "transport"),
    [("site-b", "tcp"), ("agg-1", "tcp"), ("site-b", "websockets")],
)
def test_a_member_using_anothers_client_id_does_not_disconnect_it(
    mosquitto: MosquittoProcess,
    connect: SessionFactory,
    provisioned: Path,
    victim: str,
    transport: Literal["tcp", "websockets"],
) -> None:
    changes: list[ConnectionChange] = []
    session = connect(victim, mosquitto, start=False)
    session.on_connection = changes.append
    session.start().wait_connected(10)
    attacker = raw_client(provisioned / "bundles/site-a", victim, mosquitto, transport=transport)
    try:
        # A round trip after the attacker's CONNACK: had the broker handed the victim's
        # session to the attacker, it would have sent the victim DISCONNECT before this.
        session.publish(topics.presence_topic(FED, victim), b"online", retain=True).wait(10)
        assert [c.connected for c in changes] == [True]
        assert session.connected
    finally:
        attacker.disconnect()
        attacker.loop_stop()


def test_a_member_cannot_wipe_anothers_queued_messages(
    mosquitto: MosquittoProcess, connect: SessionFactory, provisioned: Path
) -> None:
    candidate = topics.candidate_topic(FED, STUDY, "site-b")
    first = connect("site-b", mosquitto, start=False)
    first.subscribe(candidate, Inbox())
    first.start().wait_connected(10)
    first.close()  # offline; its persistent session keeps the subscription
    connect("agg-1", mosquitto).publish(candidate, b"candidate model").wait(10)
    # site-a asks for site-b's client id with a clean start, which would discard the session.
    attacker = raw_client(provisioned / "bundles/site-a", "site-b", mosquitto, clean_start=True)
    attacker.disconnect()
    attacker.loop_stop()
    inbox = Inbox()
    again = connect("site-b", mosquitto, start=False)
    again.subscribe(candidate, inbox)
    again.start().wait_connected(10)
    assert inbox.wait_for(1) == [(candidate, b"candidate model")]
