"""Signed envelopes: every message on the wire travels inside one.

Layout: `"TSRE" | version (u8) | signer id (u16 length + ASCII) | message length (u64) |
message | signature (64 bytes)`. The signature is `signing.sign_envelope` with the header
(everything before the message) and the message as payload, so it covers the domain tag,
the header and SHA-256 of the message.

`open_envelope` checks, in this order, and before it parses the message at all: the size
limit, the framing, that the signer is known, and the signature. Only then does it parse the
message, and it refuses a message whose own sender field names someone other than the
signer. So an unauthenticated sender never reaches the message parser.

Guarantees and duties: `open_envelope` proves who sent the message and that nobody changed
it. It does not prove the message is fresh or meant for you: a caller must check the
message's federation, study, round and recipient against its own state (`require_fields`),
and must open a sealed share only under a binding built from its own context
(`share_binding`), never from the envelope's fields alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tessera.crypto.sealing import SealBinding
from tessera.crypto.signing import SIGNATURE_LENGTH, sign_envelope, verify_envelope
from tessera.errors import AuthenticationError, CodecError
from tessera.wire.codec import VERSION, Bytes, MessageType, Reader, read_frame
from tessera.wire.ids import check_id
from tessera.wire.messages import (
    ModelRelease,
    PartialSum,
    ParticipantSet,
    ReceiptSet,
    ReceivedSet,
    ReleaseRequest,
    RoundAbort,
    RoundOpen,
    ShareEnvelope,
)

ENVELOPE_MAGIC = b"TSRE"

Message = (
    RoundOpen
    | ShareEnvelope
    | ReceivedSet
    | ReceiptSet
    | ParticipantSet
    | PartialSum
    | ModelRelease
    | RoundAbort
    | ReleaseRequest
)
M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Signed(Generic[M]):
    """A message whose signature verified, and the id of the key that signed it."""

    message: M
    signer_id: str


def decode_message(data: Bytes, max_payload: int) -> Message:
    """Decode any message by its type byte; CodecError for unknown types or bad bytes.

    `max_payload` bounds the large blobs (partial sums, release payloads).
    """
    message_type, _ = read_frame(data, "message")
    if message_type == MessageType.ROUND_OPEN:
        return RoundOpen.from_bytes(data)
    if message_type == MessageType.SHARE_ENVELOPE:
        return ShareEnvelope.from_bytes(data)
    if message_type == MessageType.RECEIVED_SET:
        return ReceivedSet.from_bytes(data)
    if message_type == MessageType.PARTICIPANT_SET:
        return ParticipantSet.from_bytes(data)
    if message_type == MessageType.PARTIAL_SUM:
        return PartialSum.from_bytes(data, max_payload)
    if message_type == MessageType.MODEL_RELEASE:
        return ModelRelease.from_bytes(data, max_payload)
    if message_type == MessageType.ROUND_ABORT:
        return RoundAbort.from_bytes(data)
    if message_type == MessageType.RELEASE_REQUEST:
        return ReleaseRequest.from_bytes(data)
    if message_type == MessageType.RECEIPT_SET:
        return ReceiptSet.from_bytes(data)
    raise CodecError(f"message type {message_type} is unknown to wire version {VERSION}")


def _header(signer_id: str, message_length: int) -> bytes:
    raw_id = signer_id.encode("ascii")
    return (
        ENVELOPE_MAGIC
        + bytes((VERSION,))
        + len(raw_id).to_bytes(2, "big")
        + raw_id
        + message_length.to_bytes(8, "big")
    )


def seal_envelope(message: Message, signer_id: str, key: Ed25519PrivateKey) -> bytes:
    """Encode `message` and sign it as `signer_id` with `key`.

    The signer must be the message's own sender (a node signs its own shares; an
    aggregator its own sets and sums); ValueError otherwise.
    """
    check_id("signer_id", signer_id)
    if message.sender_id not in (None, signer_id):
        raise ValueError(
            f"{type(message).__name__} names {message.sender_id!r} as its sender, so "
            f"{signer_id!r} must not sign it"
        )
    body = message.to_bytes()
    header = _header(signer_id, len(body))
    # One join, not two concatenations: a share envelope can be tens of megabytes.
    return b"".join((header, body, sign_envelope(key, header, body)))


def open_envelope(
    data: Bytes, public_keys: Mapping[str, Ed25519PublicKey], max_size: int
) -> Signed[Message]:
    """Verify and decode an envelope.

    CodecError for anything malformed or over `max_size` bytes; AuthenticationError (vague)
    for an unknown signer, a bad signature, or a message whose sender is not the signer.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"envelope: expected bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_size:
        raise CodecError(
            f"envelope is {size} bytes, over the limit of {max_size}; refuse it, or raise "
            "the limit if such messages are expected"
        )
    reader = Reader(data, "envelope")
    magic = reader.fixed(len(ENVELOPE_MAGIC), "magic")
    if magic != ENVELOPE_MAGIC:
        raise CodecError(f"envelope: bad magic {magic!r}, expected {ENVELOPE_MAGIC!r}")
    version = reader.u8("version")
    if version != VERSION:
        raise CodecError(
            f"envelope: wire version {version} is not supported (this build speaks {VERSION}); "
            "upgrade the older side"
        )
    signer_id = reader.id("signer")
    # A view, not a copy: the body is hashed and parsed in place.
    body = reader.blob64_view("message", max(reader.remaining - 8 - SIGNATURE_LENGTH, 0))
    signature = reader.fixed(SIGNATURE_LENGTH, "signature")
    reader.done()

    public_key = public_keys.get(signer_id)
    if public_key is None:
        raise AuthenticationError("envelope signer is not known")
    verify_envelope(public_key, _header(signer_id, len(body)), body, signature)
    message = decode_message(body, max_payload=max_size)
    if message.sender_id not in (None, signer_id):
        raise AuthenticationError("envelope signer is not the message's sender")
    return Signed(message, signer_id)


def open_envelope_as(
    data: Bytes, kind: type[M], public_keys: Mapping[str, Ed25519PublicKey], max_size: int
) -> Signed[M]:
    """`open_envelope`, then CodecError unless the message is a `kind`."""
    signed = open_envelope(data, public_keys, max_size)
    message = signed.message
    if not isinstance(message, kind):
        raise CodecError(
            f"expected a {kind.__name__}, got a {type(message).__name__}; "
            "check the topic this arrived on"
        )
    return Signed(message, signed.signer_id)


def require_fields(message: Message, **expected: object) -> None:
    """Raise AuthenticationError unless each named field equals the expected value.

    For example `require_fields(msg, federation_id=f, study_id=s, round=r,
    aggregator_id=me)` refuses a valid envelope replayed into another round, study or
    aggregator. The error names the field, not the values.
    """
    for field, value in expected.items():
        if not hasattr(message, field):
            raise TypeError(f"{type(message).__name__} has no field {field!r}")
        if getattr(message, field) != value:
            raise AuthenticationError(f"message is not for this context ({field} differs)")


def share_binding(round_open: RoundOpen, node_id: str, aggregator_id: str) -> SealBinding:
    """The seal binding for `node_id`'s share to `aggregator_id` in the round `round_open`
    announced. Both the node (to seal) and the aggregator (to open) build it from their own
    copy of the RoundOpen, and it covers that copy's hash (`RoundOpen.digest`): a share opens
    only at an aggregator that holds the very announcement the node answered."""
    return SealBinding(
        purpose="share",
        federation_id=round_open.federation_id,
        study_id=round_open.study_id,
        round=round_open.round,
        announcement_hash=round_open.digest(),
        base_model_hash=round_open.base_model_hash,
        sender_id=node_id,
        recipient_id=aggregator_id,
        encoding=round_open.ring.to_bytes(),
    )


def partial_sum_binding(
    round_open: RoundOpen, from_aggregator: str, to_aggregator: str
) -> SealBinding:
    """The seal binding for a partial sum from one aggregator to another in this round (and
    under this very RoundOpen, as for shares)."""
    return SealBinding(
        purpose="partial-sum",
        federation_id=round_open.federation_id,
        study_id=round_open.study_id,
        round=round_open.round,
        announcement_hash=round_open.digest(),
        base_model_hash=round_open.base_model_hash,
        sender_id=from_aggregator,
        recipient_id=to_aggregator,
        encoding=round_open.ring.to_bytes(),
    )


__all__ = [
    "Message",
    "Signed",
    "decode_message",
    "open_envelope",
    "open_envelope_as",
    "partial_sum_binding",
    "require_fields",
    "seal_envelope",
    "share_binding",
]
