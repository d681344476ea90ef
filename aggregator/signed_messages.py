"""The aggregator service's edge: its own keys, the roster's keys, the Publisher that signs
what it sends (`Outgoing`), and `open_routed`, which opens what it receives and checks that
it arrived on its own topic."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from aggregator.errors import AggregatorConfigError, MessageRejected
from broker import topics
from tessera.limits import MAX_AGGREGATOR_MESSAGE_BYTES
from tessera.wire.envelopes import Message, Signed, open_envelope, seal_envelope
from tessera.wire.messages import PartialSum, ReceivedSet, ReleaseRequest, ShareEnvelope


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

    def signers(self) -> dict[str, Ed25519PublicKey]:
        """Every member's signing key by id, aggregators and nodes alike; an id that names
        both would let one stand in for the other, so it is refused."""
        shared = set(self.aggregator_signing) & set(self.node_signing)
        if shared:
            raise AggregatorConfigError(
                f"ids {sorted(shared)} name both an aggregator and a node; every member of "
                "the federation needs its own id (fix the manifest)"
            )
        return {**self.aggregator_signing, **self.node_signing}


@dataclass(frozen=True)
class Publisher:
    """Signs every message this aggregator publishes, as `sender`."""

    sender: str
    key: Ed25519PrivateKey

    def seal(self, message: Message) -> bytes:
        """The signed envelope of `message`."""
        return seal_envelope(message, self.sender, self.key)

    def send(self, topic: str, message: Message, retain: bool = False) -> Outgoing:
        """`message`, signed, to publish on `topic`."""
        return Outgoing(topic, self.seal(message), retain)


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
    elif isinstance(message, ReleaseRequest):
        routed = topic.kind is topics.Kind.FETCH and topic.node == message.node_id
    else:
        routed = True
    if not routed or topic.study != message.study_id or topic.federation != message.federation_id:
        raise MessageRejected(f"{type(message).__name__} arrived on a topic meant for another")


def open_routed(
    topic: str, payload: bytes, signers: Mapping[str, Ed25519PublicKey], me: str
) -> Signed[Message] | None:
    """Open a signed envelope received on `topic` (AuthenticationError, vague, if no signer
    in `signers` signed it) and refuse it if the topic tells another story than the message
    (`check_topic`). None for our own publication, which the broker echoes back."""
    signed = open_envelope(payload, signers, MAX_AGGREGATOR_MESSAGE_BYTES)
    if signed.signer_id == me:
        return None
    check_topic(topics.parse(topic), signed.message)
    return signed
