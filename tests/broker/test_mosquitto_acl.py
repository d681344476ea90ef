"""Real Mosquitto with the provisioned TLS and ACL: who may connect, publish and read."""

from __future__ import annotations

import getpass
import time
from pathlib import Path

import pytest
from support.mosquitto import TEST_FEDERATION, Inbox, MosquittoProcess, SessionFactory

from broker import topics
from broker.errors import NotAuthorizedError, NotConnectedError
from broker.provisioning.federation import parse_federation
from broker.provisioning.provision import provision
from broker.session import Session, SessionConfig, TlsFiles

FED, STUDY = "fed-test", "study-1"


def test_site_publishes_its_share_and_only_the_addressed_aggregator_reads_it(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    agg1, agg2 = connect("agg-1", mosquitto), connect("agg-2", mosquitto)
    inbox1, inbox2 = Inbox(), Inbox()
    agg1.subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-1"), inbox1)
    agg2.subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-2"), inbox2)
    site = connect("site-a", mosquitto)
    topic = topics.share_topic(FED, STUDY, "agg-1", "site-a")
    site.publish(topic, b"sealed-share").wait(10)
    assert inbox1.wait_for(1) == [(topic, b"sealed-share")]
    assert inbox2.items == []


def test_site_cannot_publish_into_another_sites_topics(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    agg = connect("agg-1", mosquitto)
    inbox = Inbox()
    agg.subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-1"), inbox)
    site_b = connect("site-b", mosquitto)
    forged = topics.share_topic(FED, STUDY, "agg-1", "site-b")
    site_a = connect("site-a", mosquitto)
    with pytest.raises(NotAuthorizedError, match="not authorized"):
        site_a.publish(forged, b"forged").wait(10)
    with pytest.raises(NotAuthorizedError):
        site_a.publish(topics.presence_topic(FED, "site-b"), b"offline").wait(10)
    # A genuine message from B afterwards is the first and only one the aggregator sees.
    site_b.publish(forged, b"genuine").wait(10)
    assert inbox.wait_for(1) == [(forged, b"genuine")]
    time.sleep(0.3)
    assert inbox.items == [(forged, b"genuine")]


@pytest.mark.parametrize(
    "topic",
    [
        topics.round_topic(FED, STUDY),
        topics.release_topic(FED, STUDY),
        topics.participants_topic(FED, STUDY),
    ],
)
def test_only_aggregators_publish_round_control_and_releases(
    mosquitto: MosquittoProcess, connect: SessionFactory, topic: str
) -> None:
    site = connect("site-a", mosquitto)
    inbox = Inbox()
    site.subscribe(topics.round_topic(FED, STUDY), inbox)
    with pytest.raises(NotAuthorizedError):
        site.publish(topic, b"fake round").wait(10)
    agg = connect("agg-1", mosquitto)
    agg.publish(topics.round_topic(FED, STUDY), b"real round").wait(10)
    assert inbox.wait_for(1) == [(topics.round_topic(FED, STUDY), b"real round")]


def test_only_the_leader_publishes_the_participant_set(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    connect("agg-1", mosquitto).publish(topics.participants_topic(FED, STUDY), b"set").wait(10)
    with pytest.raises(NotAuthorizedError):
        connect("agg-2", mosquitto).publish(topics.participants_topic(FED, STUDY), b"x").wait(10)


def test_every_site_reads_each_aggregators_receipts_and_only_it_writes_them(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    inboxes = {site: Inbox() for site in ("site-a", "site-b")}
    sites = {site: connect(site, mosquitto) for site in inboxes}
    for site, inbox in inboxes.items():
        sites[site].subscribe(topics.all_receipts(FED, STUDY), inbox)
    own = topics.receipts_topic(FED, STUDY, "agg-2")
    with pytest.raises(NotAuthorizedError):
        sites["site-a"].publish(own, b"forged receipts").wait(10)
    with pytest.raises(NotAuthorizedError):
        connect("agg-1", mosquitto).publish(own, b"agg-1 posing as agg-2").wait(10)
    connect("agg-2", mosquitto).publish(own, b"receipts").wait(10)
    for inbox in inboxes.values():
        assert inbox.wait_for(1) == [(own, b"receipts")]


def test_a_release_sent_again_reaches_only_the_site_that_asked(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    agg, asking, other = (connect(m, mosquitto) for m in ("agg-2", "site-a", "site-b"))
    requests, copies, snooped = Inbox(), Inbox(), Inbox()
    agg.subscribe(topics.fetch_requests(FED, STUDY), requests)
    asking.subscribe(topics.release_copy_topic(FED, STUDY, "site-a"), copies)
    try:  # Mosquitto may grant the SUBSCRIBE and then withhold every message
        other.subscribe(topics.release_copy_topic(FED, STUDY, "site-a"), snooped)
    except NotAuthorizedError:
        pass
    with pytest.raises(NotAuthorizedError):
        other.publish(topics.fetch_topic(FED, STUDY, "site-a"), b"forged").wait(10)
    asking.publish(topics.fetch_topic(FED, STUDY, "site-a"), b"request").wait(10)
    assert requests.wait_for(1) == [(topics.fetch_topic(FED, STUDY, "site-a"), b"request")]
    agg.publish(topics.release_copy_topic(FED, STUDY, "site-a"), b"release").wait(10)
    assert copies.wait_for(1) == [(topics.release_copy_topic(FED, STUDY, "site-a"), b"release")]
    with pytest.raises(NotAuthorizedError):
        asking.publish(topics.release_copy_topic(FED, STUDY, "site-a"), b"self-made").wait(10)
    time.sleep(0.3)
    assert snooped.items == [] and len(copies.items) == 1


def test_site_cannot_read_shares_addressed_to_an_aggregator(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    snoop = connect("site-b", mosquitto)
    seen = Inbox()
    share_filter = topics.shares_for_aggregator(FED, STUDY, "agg-1")
    # Mosquitto 2.0 may grant the SUBSCRIBE but then checks read access per message;
    # either way nothing may arrive.
    try:
        snoop.subscribe(share_filter, seen)
    except NotAuthorizedError:
        pass
    agg = connect("agg-1", mosquitto)
    agg_inbox = Inbox()
    agg.subscribe(share_filter, agg_inbox)
    connect("site-a", mosquitto).publish(
        topics.share_topic(FED, STUDY, "agg-1", "site-a"), b"secret"
    ).wait(10)
    assert len(agg_inbox.wait_for(1)) == 1
    time.sleep(0.3)
    assert seen.items == []


@pytest.mark.parametrize(
    ("publisher", "made_up", "reader", "real"),
    [
        (
            "site-a",
            topics.share_topic(FED, "made-up-study", "agg-1", "site-a"),
            "agg-1",
            topics.share_topic(FED, STUDY, "agg-1", "site-a"),
        ),
        (
            "site-a",
            topics.audit_topic(FED, "made-up-study", "site-a"),
            "agg-2",
            topics.audit_topic(FED, STUDY, "site-a"),
        ),
        (
            "agg-2",
            topics.round_topic(FED, "made-up-study"),
            "site-b",
            topics.round_topic(FED, STUDY),
        ),
    ],
    ids=["share", "audit", "round"],
)
def test_no_retained_message_is_stored_under_a_made_up_study(
    mosquitto: MosquittoProcess,
    connect: SessionFactory,
    publisher: str,
    made_up: str,
    reader: str,
    real: str,
) -> None:
    sender = connect(publisher, mosquitto)
    with pytest.raises(NotAuthorizedError):
        sender.publish(made_up, bytes(256 << 10), retain=True).wait(10)
    seen = Inbox()
    receiver = connect(reader, mosquitto)
    try:  # Mosquitto may refuse the SUBSCRIBE, or grant it and deliver nothing
        receiver.subscribe(made_up, seen)
    except NotAuthorizedError:
        pass
    receiver.subscribe(real, seen)
    # Delivered after any retained message of the earlier subscription would have been (as a
    # set: the reader's persistent session may hold an overlapping subscription from an
    # earlier test, and Mosquitto then delivers the message once per subscription).
    sender.publish(real, b"real").wait(10)
    assert set(seen.wait_for(1)) == {(real, b"real")}


def test_the_leader_writes_candidates_only_for_the_federations_sites(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    leader = connect("agg-1", mosquitto)
    leader.publish(topics.candidate_topic(FED, STUDY, "site-a"), b"candidate").wait(10)
    with pytest.raises(NotAuthorizedError):
        leader.publish(
            topics.candidate_topic(FED, STUDY, "not-a-site"), bytes(256 << 10), retain=True
        ).wait(10)


def test_client_without_a_certificate_is_refused(
    mosquitto: MosquittoProcess, provisioned: Path, tmp_path: Path
) -> None:
    # A TLS client that trusts the CA but presents no certificate.
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, "anonymous", protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(provisioned / "bundles/site-a/ca.pem"))
    refused = False
    try:
        client.connect(mosquitto.host, mosquitto.mqtt_port)
        for _ in range(50):
            client.loop(0.1)
            if client.is_connected():
                break
        refused = not client.is_connected()
    except OSError:
        refused = True
    finally:
        client.disconnect()
    assert refused


def test_client_with_a_certificate_from_another_ca_is_refused(
    mosquitto: MosquittoProcess, provisioned: Path, tmp_path: Path
) -> None:
    rogue = parse_federation(
        {
            "federation": TEST_FEDERATION["federation"],
            "sites": [{"id": "site-a", "name": "Impostor"}],
            "aggregators": [{"id": "agg-1", "name": "x"}, {"id": "agg-2", "name": "y"}],
        }
    )
    provision(rogue, tmp_path, run_as_user=getpass.getuser())
    own = provisioned / "bundles/site-a"
    forged = tmp_path / "bundles/site-a"
    # Trusts the real CA (so the server check passes) but presents the rogue CA's cert.
    config = SessionConfig(
        client_id="site-a",
        host=mosquitto.host,
        port=mosquitto.mqtt_port,
        tls=TlsFiles(own / "ca.pem", forged / "client.pem", forged / "client.key"),
        reconnect_min_s=0.1,
        reconnect_max_s=0.2,
    )
    with Session(config) as session, pytest.raises(NotConnectedError, match="last error"):
        session.wait_connected(2)
