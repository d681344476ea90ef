"""A node's sealed statement: what it tells the aggregators about itself, hidden from the
broker, and committed to so that it cannot tell two aggregators two different things.

What it states: the site's composed DP epsilon for the study, this round included, which the
model card reports per site. It is a deterministic function of the site's training-set size,
so it must never cross the broker in clear: it travels inside the ShareEnvelope, sealed with
HPKE to the envelope's aggregator under `statement_binding` (the share's own binding with the
purpose "statement"), and the envelope's signature covers the sealed bytes.

Layout of the plaintext: the message header with type NODE_STATEMENT (0x48), then
`epsilon_total` (f64) and a 32-byte `salt` the node draws afresh each round.

Why the salt: each aggregator publishes, in its ReceivedSet, the `commitment` of every
statement it holds (SHA-256 over a domain tag and the statement's bytes). The leader leaves a
node whose commitments differ between aggregators out of the round, like a dropout, so one
member cannot make the aggregators' model cards differ and stall the round. The salt makes the
commitment hiding: without it, anyone reading a ReceivedSet could try every likely epsilon.
A node sends the same statement (same salt) to every aggregator of a round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from tessera.crypto.sealing import SEAL_OVERHEAD, SealBinding, open_sealed, seal
from tessera.errors import CodecError
from tessera.wire.codec import Bytes, MessageType, Writer, begin, check_float
from tessera.wire.envelopes import share_binding
from tessera.wire.messages import RoundOpen, ShareEnvelope

SALT_BYTES = 32
STATEMENT_BYTES = 6 + 8 + SALT_BYTES  # header, epsilon_total, salt
SEALED_STATEMENT_BYTES = STATEMENT_BYTES + SEAL_OVERHEAD
_COMMITMENT_DOMAIN = b"tessera/statement-commitment/v1\x00"


@dataclass(frozen=True)
class NodeStatement:
    """What a node states to the aggregators of one round, sealed (see the module doc)."""

    epsilon_total: float
    salt: bytes = dataclasses.field(repr=False)
    TYPE: ClassVar[MessageType] = MessageType.NODE_STATEMENT

    def __post_init__(self) -> None:
        check_float("epsilon_total", self.epsilon_total)
        if not isinstance(self.salt, bytes) or len(self.salt) != SALT_BYTES:
            raise CodecError(f"a statement's salt must be {SALT_BYTES} random bytes")

    @classmethod
    def fresh(cls, epsilon_total: float) -> NodeStatement:
        """A statement of `epsilon_total` with a new salt from the OS's CSPRNG: one per round,
        the same for every aggregator of that round."""
        return cls(float(epsilon_total), os.urandom(SALT_BYTES))

    def to_bytes(self) -> bytes:
        """The plaintext to seal."""
        w = Writer(self.TYPE)
        w.f64(self.epsilon_total)
        w.raw(self.salt)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: Bytes) -> NodeStatement:
        """Decode strictly; CodecError on anything malformed."""
        r = begin(data, cls.__name__, cls.TYPE)
        statement = cls(r.f64("epsilon_total"), r.fixed(SALT_BYTES, "salt"))
        r.done()
        return statement

    def commitment(self) -> bytes:
        """SHA-256 over a domain tag and the statement's bytes: hiding (the salt) and binding.
        What an aggregator's ReceivedSet carries for each node it holds."""
        return hashlib.sha256(_COMMITMENT_DOMAIN + self.to_bytes()).digest()


def statement_binding(round_open: RoundOpen, node_id: str, aggregator_id: str) -> SealBinding:
    """The seal binding of `node_id`'s statement to `aggregator_id`: the share's binding with
    the purpose "statement", so a statement never opens as a share, nor the reverse."""
    return dataclasses.replace(
        share_binding(round_open, node_id, aggregator_id), purpose="statement"
    )


def seal_statement(
    statement: NodeStatement,
    round_open: RoundOpen,
    node_id: str,
    aggregator_id: str,
    recipient: X25519PublicKey,
) -> bytes:
    """The statement sealed to one aggregator of the round (the ShareEnvelope's
    `sealed_statement`)."""
    binding = statement_binding(round_open, node_id, aggregator_id)
    return seal(statement.to_bytes(), recipient, binding)


def open_statement(
    envelope: ShareEnvelope, round_open: RoundOpen, private_key: X25519PrivateKey
) -> NodeStatement:
    """Open an envelope's sealed statement under the binding built from the caller's own
    RoundOpen. AuthenticationError (vague) if it does not open; CodecError if the plaintext
    is not a statement."""
    binding = statement_binding(round_open, envelope.node_id, envelope.aggregator_id)
    return NodeStatement.from_bytes(open_sealed(envelope.sealed_statement, private_key, binding))
