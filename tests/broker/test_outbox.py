"""A service link's outbox against a real Mosquitto over TLS: posting never waits for the
broker, a payload posted during an outage goes out once it is back (once, in order), a
refused payload does not block the next, and closing during an outage says what was left.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mosquitto import Inbox, MosquittoProcess

from broker import topics
from broker.chunking import prepare_spool_dir
from broker.provisioning.bundle import load_bundle
from broker.provisioning.federation import Federation
from broker.service_link import ServiceLink
from tessera.observability.events import Event

FED, STUDY = "fed-test", "study-outbox"
PUBLISH_TIMEOUT_S = 1.0


@pytest.fixture
def broker(federation: Federation, provisioned: Path, tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A Mosquitto of this test's own, which it may stop and start again."""
    with MosquittoProcess(federation, provisioned, tmp_path / "mosquitto") as process:
        yield process


@pytest.fixture
def links(
    provisioned: Path, broker: MosquittoProcess, tmp_path: Path
) -> Iterator[dict[str, ServiceLink]]:
    """A link for agg-1 (receiving its shares) and one for site-a; both closed after."""
    made: dict[str, ServiceLink] = {}
    for member in ("agg-1", "site-a"):
        config = load_bundle(provisioned / "bundles" / member).session_config(
            broker.host,
            port=broker.mqtt_port,
            publish_timeout_s=PUBLISH_TIMEOUT_S,
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
        )
        made[member] = ServiceLink(config, spool_dir=prepare_spool_dir(tmp_path / "spool" / member))
    yield made
    for link in made.values():
        link.close()


def events(caplog: pytest.LogCaptureFixture, event: Event) -> list[logging.LogRecord]:
    """The captured records of `event`."""
    return [r for r in caplog.records if r.msg == event]


def wait_until(condition: object, timeout: float = 30.0) -> None:
    """Poll `condition()` until true; fail after `timeout` s (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)


def test_payloads_posted_during_an_outage_go_out_once_in_order_when_the_broker_is_back(
    broker: MosquittoProcess, links: dict[str, ServiceLink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker")
    inbox = Inbox()
    links["agg-1"].subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-1"), inbox)
    for link in links.values():
        link.start(connect_timeout_s=10)
    site = links["site-a"]
    topic = topics.share_topic(FED, STUDY, "agg-1", "site-a")
    large, small = os.urandom(3 << 20), b"the second payload"  # several chunk frames, then one

    broker.stop()
    wait_until(lambda: not site.connected)
    site.publish(topic, large)  # returns at once: the outbox waits for the broker
    site.publish(topic, small)
    assert site.outbox.pending == 2
    wait_until(lambda: events(caplog, Event.PUBLISH_STALLED))
    time.sleep(3 * PUBLISH_TIMEOUT_S)  # an outage of several publish timeouts
    assert site.outbox.pending == 2 and inbox.items == []

    broker.start()
    site.flush(60)
    assert inbox.wait_for(2, timeout=60) == [(topic, large), (topic, small)]
    inbox.wait_for(3, timeout=1)  # a frame resent across the reconnect is not a second copy
    assert len(inbox.items) == 2
    # One line for the outage per link, one for the stalled payload, one for its return.
    assert len(events(caplog, Event.BROKER_DISCONNECTED)) == 2
    assert len(events(caplog, Event.PUBLISH_STALLED)) == 1
    assert len(events(caplog, Event.PUBLISH_RESUMED)) == 1
    returns = [r for r in events(caplog, Event.BROKER_CONNECTED) if r.fields["down_s"]]  # type: ignore[attr-defined]
    assert len(returns) == 2


def test_a_refused_payload_is_logged_and_the_next_one_still_goes_out(
    links: dict[str, ServiceLink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker")
    inbox = Inbox()
    links["agg-1"].subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-1"), inbox)
    for link in links.values():
        link.start(connect_timeout_s=10)
    site = links["site-a"]
    forged = topics.share_topic(FED, STUDY, "agg-1", "site-b")  # the ACL refuses it to site-a
    own = topics.share_topic(FED, STUDY, "agg-1", "site-a")

    site.publish(forged, b"as site-b")
    site.publish(own, b"as site-a")
    site.flush(30)

    assert inbox.wait_for(1, timeout=30) == [(own, b"as site-a")]
    (refused,) = events(caplog, Event.PUBLISH_REFUSED)
    assert refused.fields["error"] == "NotAuthorizedError"  # type: ignore[attr-defined]
    assert site.outbox.refused == 1 and site.outbox.pending == 0


def test_closing_during_an_outage_says_how_many_payloads_were_not_sent(
    broker: MosquittoProcess, links: dict[str, ServiceLink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker")
    site = links["site-a"].start(connect_timeout_s=10)
    broker.stop()
    wait_until(lambda: not site.connected)
    site.publish(topics.share_topic(FED, STUDY, "agg-1", "site-a"), b"never sent")

    site.close()

    (abandoned,) = events(caplog, Event.OUTBOX_ABANDONED)
    assert abandoned.fields == {"queued": 1}  # type: ignore[attr-defined]
