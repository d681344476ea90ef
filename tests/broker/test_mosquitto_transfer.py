"""Chunked transfer and persistent sessions through a real Mosquitto over TLS."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from support.mosquitto import Inbox, MosquittoProcess, SessionFactory

from broker import topics
from broker.chunking import ReassemblyLimits
from broker.provisioning.federation import Federation
from broker.session import PublishHandle, Session
from broker.transfer import PayloadReceiver, send_payload

FED, STUDY = "fed-test", "study-1"


class Payloads(Inbox):
    """Collects delivered payloads; also waits for one to be the last delivered."""

    def wait_until_last(self, item: tuple[str, bytes], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.items[-1:] == [item], timeout)


def test_100_mb_payload_round_trips_chunked_with_its_hash_verified(
    mosquitto: MosquittoProcess, connect: SessionFactory, tmp_path: Path
) -> None:
    payload = os.urandom(100 << 20)
    topic = topics.share_topic(FED, STUDY, "agg-1", "site-a")
    receiver = PayloadReceiver(
        connect("agg-1", mosquitto), ReassemblyLimits(spool_dir=tmp_path, timeout_s=120)
    )
    got = Payloads()
    receiver.subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-1"), got)
    send_payload(connect("site-a", mosquitto), topic, payload, timeout_s=120)
    (delivered,) = got.wait_for(1, timeout=120)
    assert delivered[0] == topic
    assert hashlib.sha256(delivered[1]).digest() == hashlib.sha256(payload).digest()
    assert receiver.rejected == 0 and receiver.reassembler.open_transfers == 0
    receiver.close()


class RestartAfter:
    """Looks like a Session to send_payload; restarts the broker after the n-th frame."""

    def __init__(self, session: Session, broker: MosquittoProcess, after: int) -> None:
        self.session, self.broker, self.after = session, broker, after
        self.config = session.config
        self.sent = 0
        self.restarted_at: int | None = None

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> PublishHandle:
        handle = self.session.publish(topic, payload, retain)
        self.sent += 1
        if self.sent == self.after:
            self.broker.restart()
            self.restarted_at = self.sent
        return handle


def test_broker_restart_mid_transfer_loses_and_duplicates_nothing(
    federation: Federation, provisioned: Path, tmp_path: Path, connect: SessionFactory
) -> None:
    payload = os.urandom(12 << 20)
    chunk = 256 << 10  # 48 frames; the broker restarts after frame 12
    topic = topics.share_topic(FED, STUDY, "agg-1", "site-a")
    with MosquittoProcess(federation, provisioned, tmp_path / "broker") as broker:
        fast = {"reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
        receiver_session = connect("agg-1", broker, start=False, **fast)
        receiver = PayloadReceiver(receiver_session, ReassemblyLimits(timeout_s=120))
        got = Payloads()
        receiver.subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-1"), got)
        receiver_session.start().wait_connected(10)
        sender = RestartAfter(connect("site-a", broker, **fast), broker, after=12)
        send_payload(sender, topic, payload, chunk_size=chunk, timeout_s=60)  # type: ignore[arg-type]
        delivered = got.wait_for(1, timeout=60)
        assert sender.restarted_at == 12 and sender.sent == 48
        assert broker.starts == 2
        assert len(delivered) == 1
        assert hashlib.sha256(delivered[0][1]).digest() == hashlib.sha256(payload).digest()
        # Nothing delivered twice: a late repeat of any frame is ignored, not re-delivered.
        got.wait_for(2, timeout=1)
        assert len(got.items) == 1
        assert receiver.rejected == 0
        receiver.close()


def test_node_offline_when_a_round_opens_receives_it_on_reconnect(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    round_topic = topics.round_topic(FED, "study-offline")
    node = connect("site-b", mosquitto, start=False)
    node.subscribe(round_topic, Payloads())
    node.start().wait_connected(10)
    node.close()  # the node goes offline; the broker keeps its session

    connect("agg-1", mosquitto).publish(round_topic, b"RoundOpen bytes").wait(10)

    returning = connect("site-b", mosquitto, start=False)
    announcements = Payloads()
    returning.subscribe(round_topic, announcements)
    returning.start().wait_connected(10)
    assert announcements.wait_for(1, timeout=10) == [(round_topic, b"RoundOpen bytes")]


def test_a_retained_replay_is_told_apart_from_a_live_message(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    """A node estimates its clock from the leader's RoundOpen timestamps (issue 19): a
    retained RoundOpen replayed on a new subscription may be old, so its handler must be
    able to tell it from one that was just published."""
    round_topic = topics.round_topic(FED, "study-retained")
    leader = connect("agg-1", mosquitto)
    leader.publish(round_topic, b"old RoundOpen", retain=True).wait(10)
    node = connect("site-a", mosquitto, start=False)
    flags: list[tuple[bytes, bool]] = []
    got = Payloads()

    def handler(topic: str, payload: bytes) -> None:
        flags.append((payload, node.delivering_retained))
        got(topic, payload)

    node.subscribe(round_topic, handler)
    node.start().wait_connected(10)
    got.wait_for(1, timeout=10)
    leader.publish(round_topic, b"new RoundOpen").wait(10)
    got.wait_for(2, timeout=10)
    assert flags == [(b"old RoundOpen", True), (b"new RoundOpen", False)]
    assert not node.delivering_retained  # outside a handler


def test_presence_is_online_then_offline(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    watcher = connect("agg-2", mosquitto)
    seen = Payloads()
    watcher.subscribe(topics.presence_topic(FED, "site-a"), seen)
    presence = topics.presence_topic(FED, "site-a")
    site = connect("site-a", mosquitto)
    assert seen.wait_until_last((presence, b"online"), timeout=10)
    site.close()
    assert seen.wait_until_last((presence, b"offline"), timeout=10)


def test_payload_too_large_for_one_packet_is_refused_before_sending(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    from broker.errors import PayloadTooLargeError

    session = connect("site-a", mosquitto)
    with pytest.raises(PayloadTooLargeError, match=r"send it through broker\.transfer"):
        session.publish(topics.share_topic(FED, STUDY, "agg-1", "site-a"), bytes(3 << 20))
    with pytest.raises(PayloadTooLargeError, match="chunk_size"):
        send_payload(session, topics.share_topic(FED, STUDY, "agg-1", "site-a"), b"x", 4 << 20)
