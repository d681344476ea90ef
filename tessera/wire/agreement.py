"""Messages of the agreement and summing steps: ReceivedSet, ReceiptSet, ParticipantSet,
PartialSum.

Import them from `tessera.wire.messages`, which re-exports every message class. The conventions
(validation on construction, CodecError for every fault) are those of `tessera.wire.messages`.
Node id sets are held sorted and unique, so that one set has exactly one encoding and
`participant_set_hash` (SHA-256 of `ParticipantSet.to_bytes()`) names it unambiguously.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import ClassVar

from tessera.errors import CodecError
from tessera.limits import MAX_PARTIAL_SUM_BYTES
from tessera.wire.codec import (
    MAX_LIST_COUNT,
    Bytes,
    MessageType,
    Writer,
    begin,
    check_context,
    check_hash,
    read_context,
    read_sorted_ids,
    sorted_ids,
    write_context,
)
from tessera.wire.ids import check_id


@dataclass(frozen=True)
class ReceivedSet:
    """The nodes whose shares one aggregator holds, each with the commitment of the sealed
    statement it sent here (`tessera.wire.statement.NodeStatement.commitment`): the leader
    leaves out a node whose commitments differ between aggregators. Ids are kept sorted and
    unique, each hash beside its id (`statement_hashes[i]` is `node_ids[i]`'s)."""

    federation_id: str
    study_id: str
    round: int
    aggregator_id: str
    node_ids: tuple[str, ...]
    statement_hashes: tuple[bytes, ...]
    TYPE: ClassVar[MessageType] = MessageType.RECEIVED_SET

    def __post_init__(self) -> None:
        check_context(self.federation_id, self.study_id, self.round)
        check_id("aggregator_id", self.aggregator_id)
        nodes, hashes = tuple(self.node_ids), tuple(self.statement_hashes)
        if len(nodes) != len(hashes):
            raise CodecError(
                f"a ReceivedSet carries one statement hash per node id: {len(nodes)} ids, "
                f"{len(hashes)} hashes"
            )
        for digest in hashes:
            check_hash("statement_hashes", digest)
        by_node = dict(zip(nodes, hashes, strict=True))
        object.__setattr__(self, "node_ids", sorted_ids("node_ids", nodes))
        object.__setattr__(self, "statement_hashes", tuple(by_node[n] for n in self.node_ids))

    def statements(self) -> dict[str, bytes]:
        """Node id -> the commitment of the statement this aggregator holds from it."""
        return dict(zip(self.node_ids, self.statement_hashes, strict=True))

    @property
    def sender_id(self) -> str | None:
        return self.aggregator_id

    def to_bytes(self) -> bytes:
        """Encode for the wire."""
        w = Writer(self.TYPE)
        write_context(w, self.federation_id, self.study_id, self.round)
        w.id(self.aggregator_id)
        w.ids(self.node_ids)
        for digest in self.statement_hashes:  # as many as node_ids: no count of their own
            w.hash(digest)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: Bytes) -> ReceivedSet:
        """Decode strictly; ids must arrive sorted and unique (one encoding per set), each
        followed, after the list, by its 32-byte statement hash."""
        r = begin(data, cls.__name__, cls.TYPE)
        context = read_context(r)
        aggregator = r.id("aggregator_id")
        nodes = read_sorted_ids(r, "node_ids")
        hashes = tuple(r.hash("statement_hashes") for _ in nodes)
        r.done()
        return cls(*context, aggregator, nodes, hashes)


@dataclass(frozen=True)
class ReceiptSet:
    """What one aggregator tells the sites when it closes collection: the commitments of
    the statements it holds (`tessera.wire.statement.NodeStatement.commitment`), with no node
    ids. A site that sent a share finds its own commitment here, or learns that this
    aggregator closed the round without its share (issue 19, point 8); the commitments are
    salted hashes, so a site learns only how many shares the aggregator holds, never whose.
    Kept sorted and unique (a repeat is listed once): one set, one encoding."""

    federation_id: str
    study_id: str
    round: int
    aggregator_id: str
    commitments: tuple[bytes, ...]
    TYPE: ClassVar[MessageType] = MessageType.RECEIPT_SET

    def __post_init__(self) -> None:
        check_context(self.federation_id, self.study_id, self.round)
        check_id("aggregator_id", self.aggregator_id)
        held = tuple(self.commitments)
        if len(held) > MAX_LIST_COUNT:
            raise CodecError(f"commitments has {len(held)} entries, more than {MAX_LIST_COUNT}")
        for digest in held:
            check_hash("commitments", digest)
        # Two members could state the same bytes (colluding, the salt copied): listed once.
        object.__setattr__(self, "commitments", tuple(sorted(set(held))))

    @property
    def sender_id(self) -> str | None:
        return self.aggregator_id

    def holds(self, commitment: bytes) -> bool:
        """Whether this aggregator holds the statement with `commitment` (and so its share)."""
        return commitment in self.commitments

    def to_bytes(self) -> bytes:
        """Encode for the wire."""
        w = Writer(self.TYPE)
        write_context(w, self.federation_id, self.study_id, self.round)
        w.id(self.aggregator_id)
        w.u32(len(self.commitments))
        for digest in self.commitments:
            w.hash(digest)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: Bytes) -> ReceiptSet:
        """Decode strictly; the commitments must arrive sorted and unique."""
        r = begin(data, cls.__name__, cls.TYPE)
        context = read_context(r)
        aggregator = r.id("aggregator_id")
        count = r.u32("count")
        if count > MAX_LIST_COUNT:
            raise CodecError(f"ReceiptSet: {count} commitments, more than {MAX_LIST_COUNT}")
        held = tuple(r.hash("commitments") for _ in range(count))
        r.done()
        if any(a >= b for a, b in itertools.pairwise(held)):
            raise CodecError("ReceiptSet: commitments must be strictly sorted on the wire")
        return cls(*context, aggregator, held)


@dataclass(frozen=True)
class ParticipantSet:
    """The leader's agreed participants: the intersection of the received sets."""

    federation_id: str
    study_id: str
    round: int
    leader_id: str
    node_ids: tuple[str, ...]
    TYPE: ClassVar[MessageType] = MessageType.PARTICIPANT_SET

    def __post_init__(self) -> None:
        check_context(self.federation_id, self.study_id, self.round)
        check_id("leader_id", self.leader_id)
        object.__setattr__(self, "node_ids", sorted_ids("node_ids", self.node_ids))

    @property
    def sender_id(self) -> str | None:
        return self.leader_id

    def digest(self) -> bytes:
        """SHA-256 of the encoding: the `participant_set_hash` that partial sums carry."""
        return hashlib.sha256(self.to_bytes()).digest()

    def to_bytes(self) -> bytes:
        """Encode for the wire; `digest()` is SHA-256 of these bytes."""
        w = Writer(self.TYPE)
        write_context(w, self.federation_id, self.study_id, self.round)
        w.id(self.leader_id)
        w.ids(self.node_ids)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: Bytes) -> ParticipantSet:
        """Decode strictly; ids must arrive sorted and unique (one encoding per set)."""
        r = begin(data, cls.__name__, cls.TYPE)
        context = read_context(r)
        leader = r.id("leader_id")
        nodes = read_sorted_ids(r, "node_ids")
        r.done()
        return cls(*context, leader, nodes)


@dataclass(frozen=True)
class PartialSum:
    """One aggregator's sum over the agreed set, sealed to another aggregator."""

    federation_id: str
    study_id: str
    round: int
    from_aggregator: str
    to_aggregator: str
    participant_set_hash: bytes
    sealed: bytes
    TYPE: ClassVar[MessageType] = MessageType.PARTIAL_SUM

    def __post_init__(self) -> None:
        check_context(self.federation_id, self.study_id, self.round)
        check_id("from_aggregator", self.from_aggregator)
        check_id("to_aggregator", self.to_aggregator)
        check_hash("participant_set_hash", self.participant_set_hash)
        if not isinstance(self.sealed, bytes):
            raise CodecError("sealed partial sum must be bytes")

    @property
    def sender_id(self) -> str | None:
        return self.from_aggregator

    def to_bytes(self) -> bytes:
        """Encode for the wire."""
        w = Writer(self.TYPE)
        write_context(w, self.federation_id, self.study_id, self.round)
        w.id(self.from_aggregator)
        w.id(self.to_aggregator)
        w.hash(self.participant_set_hash)
        w.blob64(self.sealed)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: Bytes, max_payload: int = MAX_PARTIAL_SUM_BYTES) -> PartialSum:
        """Decode strictly; a sealed sum over `max_payload` bytes is refused."""
        r = begin(data, cls.__name__, cls.TYPE)
        message = cls(
            *read_context(r), r.id("from_aggregator"),
            r.id("to_aggregator"), r.hash("participant_set_hash"),
            r.blob64("sealed", max_payload),
        )  # fmt: skip
        r.done()
        return message
