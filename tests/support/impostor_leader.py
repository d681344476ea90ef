"""The leader as an attacker runs it against a live federation (tests/support/e2e.py): with
the leader's provisioned bundle (its TLS client certificate for the broker, its Ed25519
signing key), connected to Mosquitto as the leader, as `tessera aggregator run` connects,
while the leader's own daemon is not running. It signs whatever it likes and reads what
the broker's ACL lets the leader read: the partial sums addressed to it.

    with ImpostorLeader(live) as leader:
        leader.announce(leader.round_open(1, min_participants=1))
        leader.participants(1, ["site-c"])
        leader.partial_sums()   # every PartialSum the follower sent the leader so far
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from aggregator.config import AggregatorConfig, load_config
from aggregator.leader import plan_round
from aggregator.registry import GENESIS_PARENT
from aggregator.round_context import BaseModel
from aggregator.setup import StudySetup, load_study_setup
from broker import topics
from broker.service_link import Endpoint, ServiceLink, endpoint_config
from tessera.crypto.flatten import flatten
from tessera.crypto.signing import load_private_key
from tessera.crypto.update_layout import vector_length
from tessera.wire.envelopes import Message, open_envelope, seal_envelope
from tessera.wire.messages import PartialSum, ParticipantSet, RoundOpen

from .e2e import LiveFederation

CONNECT_TIMEOUT_S = 60.0


class ImpostorLeader:
    """An MQTT session as the spec's leader, and the leader's keys (module docstring)."""

    def __init__(self, live: LiveFederation) -> None:
        self.me = live.spec.leader
        env = {"TESSERA_BROKER_PORT": str(live.broker.mqtt_port)}
        self.config: AggregatorConfig = load_config(live.prepared.config(self.me), env)
        self.setup: StudySetup = load_study_setup(self.config)
        self.key = load_private_key(self.config.signing_key)
        self.federation, self.study = self.config.federation_id, self.config.study_id
        broker = self.config.broker
        self.link = ServiceLink(
            endpoint_config(self.setup.bundle, Endpoint(broker.host, broker.port, broker.tls))
        )
        self._lock = threading.Lock()
        self._partials: list[bytes] = []
        inbox = topics.partials_for_aggregator(self.federation, self.study, self.me)
        self.link.subscribe(inbox, self._on_partial)

    def __enter__(self) -> ImpostorLeader:
        self.link.start(connect_timeout_s=CONNECT_TIMEOUT_S)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.link.close()

    def _on_partial(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._partials.append(payload)

    # --- what it signs -------------------------------------------------------------------

    def round_open(self, round_number: int, **lies: Any) -> RoundOpen:
        """The RoundOpen the honest leader would plan for `round_number` on the genesis
        model over every roster site (aggregator.leader.plan_round), with `lies` replaced."""
        genesis = self.setup.model.genesis()
        vector, _ = flatten(genesis)
        honest = plan_round(
            self.config, round_number=round_number,
            base_model_hash=BaseModel(genesis, 0, GENESIS_PARENT).weights_hash(),
            model_version=0, algorithm=self.config.round.algorithm,
            aggregator_ids=self.setup.roster.aggregator_ids,
            expected_nodes=self.setup.roster_sites, vector_length=vector_length(vector.size),
            now_ms=int(time.time() * 1000),
        )  # fmt: skip
        lying: RoundOpen = dataclasses.replace(honest, **lies)
        return lying

    def publish(self, topic: str, message: Message, retain: bool = False) -> None:
        """`message` signed with the leader's key, on `topic` (waits for the broker's ack)."""
        self.link.publish(topic, seal_envelope(message, self.me, self.key), retain=retain)
        self.link.flush(CONNECT_TIMEOUT_S)

    def announce(self, announcement: RoundOpen) -> None:
        """Publish `announcement` on the study's round topic, retained, as the daemon does."""
        topic = topics.round_topic(self.federation, self.study)
        self.publish(topic, announcement, retain=True)

    def participants(self, round_number: int, node_ids: Iterable[str]) -> None:
        """Publish the leader's ParticipantSet (the request for every partial sum)."""
        message = ParticipantSet(
            self.federation, self.study, round_number, self.me, tuple(sorted(node_ids))
        )
        self.publish(topics.participants_topic(self.federation, self.study), message)

    # --- what it reads -------------------------------------------------------------------

    def partial_sums(self) -> list[PartialSum]:
        """Every PartialSum that reached the leader so far, verified against the roster."""
        with self._lock:
            payloads = list(self._partials)
        keys = self.setup.roster.aggregator_signing
        opened = [open_envelope(p, keys, len(p)).message for p in payloads]
        return [m for m in opened if isinstance(m, PartialSum)]
