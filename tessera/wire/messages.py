"""The protocol's messages (docs/architecture.md, section 3), each with `to_bytes` and `from_bytes`.

Every class is a frozen dataclass that validates itself on construction, so an invalid
message can neither be built nor parsed; both raise `CodecError` (a ValueError). The wire
layout of each is the field order below, written with the primitives of `tessera.wire.codec`.
Hashes are 32 raw bytes; ids follow `codec.check_id`; rounds and versions are u64.

`sender_id` names the field that must equal the envelope's signer: `open_envelope` refuses
a message signed by anyone else. ModelRelease has none; its authority is the aggregators'
joint signatures (`tessera.wire.release`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

from tessera.crypto.encoding import RingParams
from tessera.crypto.update_layout import DEFAULT_LOSS_CAP, DEFAULT_WEIGHT_CAP
from tessera.errors import CodecError
from tessera.wire.agreement import PartialSum, ParticipantSet, ReceiptSet, ReceivedSet
from tessera.wire.codec import (
    Bytes,
    MessageType,
    Writer,
    begin,
    check_context,
    check_float,
    check_hash,
    check_ids,
    check_ring,
    check_uint,
    read_context,
    read_ring,
    write_context,
    write_ring,
)
from tessera.wire.ids import check_id
from tessera.wire.release import ModelRelease

__all__ = [
    "ALGORITHMS",
    "ModelRelease",
    "PartialSum",
    "ParticipantSet",
    "ReceiptSet",
    "ReceivedSet",
    "ReleaseRequest",
    "RoundAbort",
    "RoundOpen",
    "ShareEnvelope",
]

# The training algorithms a round can run (RoundOpen.algorithm): the node trains with one,
# the aggregator applies its strategy for it. One definition for both sides.
ALGORITHMS = ("fedavg", "fedsgd")
MAX_AGGREGATORS = 16
MAX_VECTOR_LENGTH = 2**31
# Plaintext framing of one Share (its header, seed) plus HPKE's enc and tag, with room to spare.
SHARE_OVERHEAD_LIMIT = 256
# A sealed NodeStatement is under 100 bytes (tessera.wire.statement); room to grow.
SEALED_STATEMENT_LIMIT = 256
MAX_REASON_LENGTH = 1024


@dataclass(frozen=True)
class RoundOpen:
    """The leader's announcement of a round: who, what to train, and how to encode."""

    federation_id: str
    study_id: str
    round: int
    base_model_hash: bytes
    model_version: int
    deadline_ms: int  # Unix time in milliseconds
    algorithm: str  # "fedavg" or "fedsgd"
    local_epochs: int
    local_steps: int
    learning_rate: float
    prox_mu: float
    clip_norm: float
    ring: RingParams
    min_participants: int
    vector_length: int
    aggregator_ids: tuple[str, ...]  # order matters: it is the aggregator index
    expected_nodes: tuple[str, ...]
    leader_id: str
    # What every node scales by: its weight is min(samples, weight_cap) / weight_cap, its
    # reported validation loss is clipped to loss_cap (tessera.crypto.update_layout); the ring is
    # sized from clip_norm and loss_cap, so a node must use these, not its own.
    weight_cap: int = DEFAULT_WEIGHT_CAP
    loss_cap: float = DEFAULT_LOSS_CAP
    # The leader's clock when it signed this (Unix ms): a node compares it with its own on
    # receipt to estimate how far its clock is off (node.round.clock). 0: not stated.
    opened_ms: int = 0
    TYPE: ClassVar[MessageType] = MessageType.ROUND_OPEN

    def __post_init__(self) -> None:
        check_context(self.federation_id, self.study_id, self.round)
        check_hash("base_model_hash", self.base_model_hash)
        check_uint("model_version", self.model_version, 64)
        check_uint("deadline_ms", self.deadline_ms, 64)
        if self.algorithm not in ALGORITHMS:
            raise CodecError(f"algorithm {self.algorithm!r} is not one of {ALGORITHMS}")
        check_uint("local_epochs", self.local_epochs, 32)
        check_uint("local_steps", self.local_steps, 32)
        check_float("learning_rate", self.learning_rate)
        check_float("prox_mu", self.prox_mu)
        check_float("clip_norm", self.clip_norm)
        check_ring(self.ring)
        check_uint("min_participants", self.min_participants, 32)
        if self.min_participants < 1:
            raise CodecError("min_participants must be at least 1")
        check_uint("vector_length", self.vector_length, 64)
        if not 1 <= self.vector_length <= MAX_VECTOR_LENGTH:
            raise CodecError(
                f"vector_length {self.vector_length} is outside 1..{MAX_VECTOR_LENGTH}"
            )
        check_ids("aggregator_ids", self.aggregator_ids)
        if not 2 <= len(self.aggregator_ids) <= MAX_AGGREGATORS:
            raise CodecError(
                f"a round needs 2 to {MAX_AGGREGATORS} aggregators, got {len(self.aggregator_ids)}"
            )
        check_ids("expected_nodes", self.expected_nodes)
        check_id("leader_id", self.leader_id)
        if self.leader_id not in self.aggregator_ids:
            raise CodecError(f"leader {self.leader_id!r} is not among the aggregators")
        check_uint("weight_cap", self.weight_cap, 32)
        if self.weight_cap < 1:
            raise CodecError("weight_cap must be at least 1")
        if check_float("loss_cap", self.loss_cap) <= 0:
            raise CodecError("loss_cap must be above 0")
        check_uint("opened_ms", self.opened_ms, 64)
        if self.opened_ms > self.deadline_ms:
            raise CodecError(
                f"opened_ms {self.opened_ms} is after the deadline {self.deadline_ms}"
            )

    @property
    def sender_id(self) -> str | None:
        return self.leader_id

    def digest(self) -> bytes:
        """SHA-256 of `to_bytes()`: names this exact announcement. Every share's seal is
        bound to it (`tessera.wire.envelopes.share_binding`), so a share made for one
        RoundOpen opens under no other, whatever the two have in common."""
        return hashlib.sha256(self.to_bytes()).digest()

    def to_bytes(self) -> bytes:
        """Encode for the wire (canonical: `from_bytes` then `to_bytes` gives the same bytes)."""
        w = Writer(self.TYPE)
        write_context(w, self.federation_id, self.study_id, self.round)
        w.hash(self.base_model_hash)
        w.u64(self.model_version)
        w.u64(self.deadline_ms)
        w.id(self.algorithm)
        w.u32(self.local_epochs)
        w.u32(self.local_steps)
        w.f64(self.learning_rate)
        w.f64(self.prox_mu)
        w.f64(self.clip_norm)
        write_ring(w, self.ring)
        w.u32(self.min_participants)
        w.u64(self.vector_length)
        w.ids(self.aggregator_ids)
        w.ids(self.expected_nodes)
        w.id(self.leader_id)
        w.u32(self.weight_cap)
        w.f64(self.loss_cap)
        w.u64(self.opened_ms)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: Bytes) -> RoundOpen:
        """Decode strictly; CodecError on anything malformed."""
        r = begin(data, cls.__name__, cls.TYPE)
        message = cls(
            *read_context(r), r.hash("base_model_hash"),
            r.u64("model_version"), r.u64("deadline_ms"), r.id("algorithm"),
            r.u32("local_epochs"), r.u32("local_steps"), r.f64("learning_rate"),
            r.f64("prox_mu"), r.f64("clip_norm"), read_ring(r), r.u32("min_participants"),
            r.u64("vector_length"), r.ids("aggregator_ids", MAX_AGGREGATORS),
            r.ids("expected_nodes"), r.id("leader_id"), r.u32("weight_cap"), r.f64("loss_cap"),
            r.u64("opened_ms"),
        )  # fmt: skip
        r.done()
        return message


@dataclass(frozen=True)
class ShareEnvelope:
    """One node's sealed share for one aggregator."""

    federation_id: str
    study_id: str
    round: int
    base_model_hash: bytes
    node_id: str
    aggregator_id: str
    ring: RingParams
    vector_length: int
    sealed: bytes
    # The node's statement to this aggregator (its composed epsilon and a salt), sealed like
    # the share: the broker never reads it (tessera.wire.statement).
    sealed_statement: bytes
    TYPE: ClassVar[MessageType] = MessageType.SHARE_ENVELOPE

    def __post_init__(self) -> None:
        check_context(self.federation_id, self.study_id, self.round)
        check_hash("base_model_hash", self.base_model_hash)
        check_id("node_id", self.node_id)
        check_id("aggregator_id", self.aggregator_id)
        check_ring(self.ring)
        check_uint("vector_length", self.vector_length, 64)
        if not 1 <= self.vector_length <= MAX_VECTOR_LENGTH:
            raise CodecError(
                f"vector_length {self.vector_length} is outside 1..{MAX_VECTOR_LENGTH}"
            )
        limit = self.sealed_limit(self.ring, self.vector_length)
        if not isinstance(self.sealed, bytes) or len(self.sealed) > limit:
            raise CodecError(f"sealed share must be bytes of at most {limit} bytes")
        if (
            not isinstance(self.sealed_statement, bytes)
            or len(self.sealed_statement) > SEALED_STATEMENT_LIMIT
        ):
            raise CodecError(
                f"sealed statement must be bytes of at most {SEALED_STATEMENT_LIMIT} bytes"
            )

    @staticmethod
    def sealed_limit(ring: RingParams, vector_length: int) -> int:
        """The largest sealed share a vector of this length and ring can produce."""
        return vector_length * (ring.bits // 8) + SHARE_OVERHEAD_LIMIT

    @property
    def sender_id(self) -> str | None:
        return self.node_id

    def to_bytes(self) -> bytes:
        """Encode for the wire."""
        w = Writer(self.TYPE)
        write_context(w, self.federation_id, self.study_id, self.round)
        w.hash(self.base_model_hash)
        w.id(self.node_id)
        w.id(self.aggregator_id)
        write_ring(w, self.ring)
        w.u64(self.vector_length)
        w.blob64(self.sealed)
        w.blob64(self.sealed_statement)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: Bytes) -> ShareEnvelope:
        """Decode strictly; the sealed length is bounded by the declared vector length."""
        r = begin(data, cls.__name__, cls.TYPE)
        head = (
            *read_context(r), r.hash("base_model_hash"),
            r.id("node_id"), r.id("aggregator_id"),
        )  # fmt: skip
        ring = read_ring(r)
        length = r.u64("vector_length")
        if not 1 <= length <= MAX_VECTOR_LENGTH:
            raise CodecError(f"ShareEnvelope: vector_length {length} is out of range")
        sealed = r.blob64("sealed", cls.sealed_limit(ring, length))
        sealed_statement = r.blob64("sealed_statement", SEALED_STATEMENT_LIMIT)
        r.done()
        return cls(*head, ring, length, sealed, sealed_statement)


@dataclass(frozen=True)
class RoundAbort:
    """An aggregator's notice that a round ends with nothing released, and why."""

    federation_id: str
    study_id: str
    round: int
    aggregator_id: str
    reason: str  # for operators; never a patient or site detail below k
    TYPE: ClassVar[MessageType] = MessageType.ROUND_ABORT

    def __post_init__(self) -> None:
        check_context(self.federation_id, self.study_id, self.round)
        check_id("aggregator_id", self.aggregator_id)
        try:
            encoded = self.reason.encode("utf-8")
        except (AttributeError, UnicodeEncodeError):
            raise CodecError("reason must be text that UTF-8 can encode") from None
        if len(encoded) > MAX_REASON_LENGTH:
            raise CodecError(f"reason must be at most {MAX_REASON_LENGTH} UTF-8 bytes")

    @property
    def sender_id(self) -> str | None:
        return self.aggregator_id

    def to_bytes(self) -> bytes:
        """Encode for the wire."""
        w = Writer(self.TYPE)
        write_context(w, self.federation_id, self.study_id, self.round)
        w.id(self.aggregator_id)
        w.text(self.reason)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: Bytes) -> RoundAbort:
        """Decode strictly; CodecError on anything malformed."""
        r = begin(data, cls.__name__, cls.TYPE)
        message = cls(*read_context(r), r.id("aggregator_id"), r.text("reason", MAX_REASON_LENGTH))
        r.done()
        return message


@dataclass(frozen=True)
class ReleaseRequest:
    """A node's request for a release it accepted before and holds damaged on disk: any
    aggregator that registered `version` sends it again, to that node alone. The answer's
    authority is the release's joint signatures, so the request needs none of its own
    beyond the node's envelope, which the aggregators check against the roster."""

    federation_id: str
    study_id: str
    round: int  # the round that released `version`
    node_id: str
    version: int
    TYPE: ClassVar[MessageType] = MessageType.RELEASE_REQUEST

    def __post_init__(self) -> None:
        check_context(self.federation_id, self.study_id, self.round)
        check_id("node_id", self.node_id)
        check_uint("version", self.version, 64)

    @property
    def sender_id(self) -> str | None:
        return self.node_id

    def to_bytes(self) -> bytes:
        """Encode for the wire."""
        w = Writer(self.TYPE)
        write_context(w, self.federation_id, self.study_id, self.round)
        w.id(self.node_id)
        w.u64(self.version)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: Bytes) -> ReleaseRequest:
        """Decode strictly; CodecError on anything malformed."""
        r = begin(data, cls.__name__, cls.TYPE)
        message = cls(*read_context(r), r.id("node_id"), r.u64("version"))
        r.done()
        return message
