"""The aggregator service's plain data: what it publishes, its keys, the roster's keys, and
what it remembers about the round in progress; plus the topic/message consistency check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from aggregator.accumulator import ShareAccumulator
from aggregator.errors import MessageRejected
from aggregator.release_build import BuiltRelease
from aggregator.rounds import RoundState
from broker import topics
from tessera.governance.privacy_report import PrivacyAuditReport
from tessera.wire.envelopes import Message
from tessera.wire.messages import ModelRelease, PartialSum, ReceivedSet, RoundOpen, ShareEnvelope


@dataclass(frozen=True)
class Outgoing:
    """One message to publish."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class ServiceKeys:
    """This aggregator's own private keys."""

    signing: Ed25519PrivateKey
    hpke: X25519PrivateKey


@dataclass(frozen=True)
class RosterKeys:
    """Public keys from the federation manifest; `aggregator_ids` order is the index order."""

    aggregator_ids: tuple[str, ...]
    aggregator_signing: Mapping[str, Ed25519PublicKey]
    aggregator_hpke: Mapping[str, X25519PublicKey]
    node_signing: Mapping[str, Ed25519PublicKey]


@dataclass
class RoundMemory:
    """What this aggregator keeps in memory for the round in progress."""

    announcement: RoundOpen
    state: RoundState
    accumulator: ShareAccumulator
    base_params: Mapping[str, np.ndarray]
    version: int
    parent_hash: bytes
    stall_ms: int  # past this, a round that is not collecting any more aborts
    received: dict[str, tuple[str, ...]] = field(default_factory=dict)  # leader only
    set_hash: bytes | None = None
    partials: dict[str, PartialSum] = field(default_factory=dict)
    own_partial: np.ndarray | None = None
    epsilon: dict[str, float] = field(default_factory=dict)  # per node, from its shares
    candidate: BuiltRelease | None = None  # audited studies: the release before the gate
    audit_deadline_ms: int | None = None
    reports: dict[str, PrivacyAuditReport] = field(default_factory=dict)  # per site
    built: BuiltRelease | None = None  # the release to sign (after the gate, if audited)
    note_sent: bool = False  # follower: its signature is out; the leader decides now
    notes: dict[str, ModelRelease] = field(default_factory=dict)  # leader only


def check_topic(topic: topics.Topic, message: Message) -> None:
    """Refuse a message whose routing ids on the topic differ from its own fields (the ACL
    decides who may publish where; this keeps the two from telling different stories)."""
    if isinstance(message, ShareEnvelope):
        routed = (topic.aggregator, topic.node) == (message.aggregator_id, message.node_id)
    elif isinstance(message, PartialSum):
        pair = (message.to_aggregator, message.from_aggregator)
        routed = (topic.aggregator, topic.from_aggregator) == pair
    elif isinstance(message, ReceivedSet):
        routed = topic.aggregator == message.aggregator_id
    else:
        routed = True
    if not routed or topic.study != message.study_id or topic.federation != message.federation_id:
        raise MessageRejected(f"{type(message).__name__} arrived on a topic meant for another")
