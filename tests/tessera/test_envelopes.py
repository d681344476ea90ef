"""Signed envelopes carrying sealed shares: tampering, replay, wrong keys, fuzzing.

These run the real path a share takes: encode, seal (HPKE) to the aggregator, wrap in a
ShareEnvelope, sign as the node; then on the aggregator open the envelope, check the
context, and open the seal under a binding built from its own RoundOpen.
"""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_examples import any_message, example_round_open

from tessera.crypto.sealing import generate_hpke_key, open_sealed, seal
from tessera.crypto.signing import generate_signing_key, sign_envelope
from tessera.errors import AuthenticationError, CodecError
from tessera.wire.agreement import ReceivedSet
from tessera.wire.envelopes import (
    Message,
    open_envelope,
    open_envelope_as,
    partial_sum_binding,
    require_fields,
    seal_envelope,
    share_binding,
)
from tessera.wire.messages import RoundOpen, ShareEnvelope

SIGNING = {name: generate_signing_key() for name in ("node-a", "node-b", "agg-1", "agg-2")}
PUBLIC: dict[str, Ed25519PublicKey] = {name: k.public_key() for name, k in SIGNING.items()}
HPKE = {name: generate_hpke_key() for name in ("agg-1", "agg-2")}
MAX_SIZE = 1 << 16
PLAINTEXT = b"share: seed or vector bytes"


def _share(round_open: RoundOpen, node: str = "node-a", aggregator: str = "agg-1") -> bytes:
    """A node's signed envelope carrying a sealed share, as the node builds it."""
    sealed = seal(
        PLAINTEXT, HPKE[aggregator].public_key(), share_binding(round_open, node, aggregator)
    )
    envelope = ShareEnvelope(
        federation_id=round_open.federation_id,
        study_id=round_open.study_id,
        round=round_open.round,
        base_model_hash=round_open.base_model_hash,
        node_id=node,
        aggregator_id=aggregator,
        ring=round_open.ring,
        vector_length=round_open.vector_length,
        sealed=sealed,
        sealed_statement=b"",
    )
    return seal_envelope(envelope, node, SIGNING[node])


def _receive(data: bytes, round_open: RoundOpen, me: str = "agg-1") -> bytes:
    """The aggregator's side: verify, check the context, open under its own binding."""
    signed = open_envelope_as(data, ShareEnvelope, PUBLIC, MAX_SIZE)
    envelope = signed.message
    require_fields(
        envelope,
        federation_id=round_open.federation_id,
        study_id=round_open.study_id,
        round=round_open.round,
        base_model_hash=round_open.base_model_hash,
        aggregator_id=me,
    )
    binding = share_binding(round_open, signed.signer_id, me)
    return open_sealed(envelope.sealed, HPKE[me], binding)


def test_share_travels_end_to_end() -> None:
    round_open = example_round_open()
    assert _receive(_share(round_open), round_open) == PLAINTEXT


def test_flipping_any_single_bit_is_rejected() -> None:
    round_open = example_round_open()
    data = _share(round_open)
    assert len(data) < 400  # small enough to try every bit
    for bit in range(len(data) * 8):
        tampered = bytearray(data)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises((CodecError, AuthenticationError)):
            _receive(bytes(tampered), round_open)


@pytest.mark.parametrize(
    "change",
    [{"round": 8}, {"study_id": "study-2"}, {"federation_id": "fed-2"}],
)
def test_replay_into_another_round_or_study_is_rejected(change: dict[str, object]) -> None:
    original = example_round_open()
    data = _share(original)
    later = dataclasses.replace(original, **change)  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError, match="not for this context"):
        _receive(data, later)
    # Even an aggregator that skipped the field check could not open it: the seal is bound.
    envelope = open_envelope_as(data, ShareEnvelope, PUBLIC, MAX_SIZE).message
    with pytest.raises(AuthenticationError):
        open_sealed(envelope.sealed, HPKE["agg-1"], share_binding(later, "node-a", "agg-1"))


def test_replay_to_another_aggregator_is_rejected() -> None:
    round_open = example_round_open()
    data = _share(round_open, aggregator="agg-1")
    with pytest.raises(AuthenticationError, match="aggregator_id differs"):
        _receive(data, round_open, me="agg-2")
    envelope = open_envelope_as(data, ShareEnvelope, PUBLIC, MAX_SIZE).message
    with pytest.raises(AuthenticationError):  # agg-2's key, agg-2's binding
        open_sealed(envelope.sealed, HPKE["agg-2"], share_binding(round_open, "node-a", "agg-2"))


def test_opening_with_the_wrong_key_is_rejected() -> None:
    round_open = example_round_open()
    envelope = open_envelope_as(_share(round_open), ShareEnvelope, PUBLIC, MAX_SIZE).message
    binding = share_binding(round_open, "node-a", "agg-1")
    with pytest.raises(AuthenticationError):
        open_sealed(envelope.sealed, HPKE["agg-2"], binding)
    with pytest.raises(AuthenticationError):  # the signature checked with another node's key
        open_envelope(_share(round_open), {"node-a": PUBLIC["node-b"]}, MAX_SIZE)


def test_unknown_signer_is_rejected() -> None:
    data = _share(example_round_open())
    with pytest.raises(AuthenticationError, match="not known"):
        open_envelope(data, {"node-b": PUBLIC["node-b"]}, MAX_SIZE)


def test_a_node_cannot_sign_another_nodes_share() -> None:
    honest = open_envelope(_share(example_round_open()), PUBLIC, MAX_SIZE).message
    with pytest.raises(ValueError, match="must not sign"):
        seal_envelope(honest, "node-b", SIGNING["node-b"])
    # Forge it by hand: node-b's valid signature over a message claiming to be node-a's.
    body = honest.to_bytes()
    header = b"TSRE\x01" + (6).to_bytes(2, "big") + b"node-b" + len(body).to_bytes(8, "big")
    forged = header + body + sign_envelope(SIGNING["node-b"], header, body)
    with pytest.raises(AuthenticationError, match="not the message's sender"):
        open_envelope(forged, PUBLIC, MAX_SIZE)
    # The same hand-built frame with node-a's own key is accepted: the layout above is right.
    genuine = header.replace(b"node-b", b"node-a")
    signed = genuine + body + sign_envelope(SIGNING["node-a"], genuine, body)
    assert open_envelope(signed, PUBLIC, MAX_SIZE).message == honest


def test_size_limit_is_enforced_before_parsing() -> None:
    data = _share(example_round_open())
    open_envelope(data, PUBLIC, max_size=len(data))
    with pytest.raises(CodecError, match="over the limit"):
        open_envelope(data, PUBLIC, max_size=len(data) - 1)


def test_wrong_message_kind_is_refused() -> None:
    received = ReceivedSet("fed-1", "study-1", 7, "agg-1", ("node-a",), (bytes(32),))
    data = seal_envelope(received, "agg-1", SIGNING["agg-1"])
    with pytest.raises(CodecError, match="expected a ShareEnvelope"):
        open_envelope_as(data, ShareEnvelope, PUBLIC, MAX_SIZE)
    assert open_envelope_as(data, ReceivedSet, PUBLIC, MAX_SIZE).message == received


def test_partial_sum_binding_differs_from_share_binding() -> None:
    round_open = example_round_open()
    binding = partial_sum_binding(round_open, "agg-1", "agg-2")
    sealed = seal(b"sum", HPKE["agg-2"].public_key(), binding)
    assert open_sealed(sealed, HPKE["agg-2"], binding) == b"sum"
    with pytest.raises(AuthenticationError):
        open_sealed(sealed, HPKE["agg-2"], share_binding(round_open, "agg-1", "agg-2"))


def _signer_for(message: Message) -> str:
    return message.sender_id if message.sender_id is not None else "agg-1"


@settings(max_examples=60)
@given(any_message)
def test_every_message_type_round_trips_signed(message: Message) -> None:
    signer = _signer_for(message)
    keys = {signer: generate_signing_key()}
    data = seal_envelope(message, signer, keys[signer])
    signed = open_envelope(data, {signer: keys[signer].public_key()}, MAX_SIZE)
    assert signed.message == message
    assert signed.signer_id == signer


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_codec_or_authentication_errors(data: bytes) -> None:
    for candidate in (data, b"TSRE\x01" + data):
        with pytest.raises((CodecError, AuthenticationError)):
            open_envelope(candidate, PUBLIC, MAX_SIZE)


ENVELOPE = _share(example_round_open())


@settings(max_examples=300)
@given(
    kind=st.sampled_from(["truncate", "append", "insert", "overwrite"]),
    at=st.integers(0, len(ENVELOPE) - 1),
    extra=st.binary(min_size=1, max_size=9),
)
def test_mutated_envelopes_raise_only_codec_or_authentication_errors(
    kind: str, at: int, extra: bytes
) -> None:
    if kind == "truncate":
        data = ENVELOPE[:at]
    elif kind == "append":
        data = ENVELOPE + extra
    elif kind == "insert":
        data = ENVELOPE[:at] + extra + ENVELOPE[at:]
    else:
        data = ENVELOPE[:at] + extra + ENVELOPE[at + len(extra) :]
        if data == ENVELOPE:
            return
    with pytest.raises((CodecError, AuthenticationError)):
        _receive(data, example_round_open())


def test_require_fields_rejects_unknown_fields() -> None:
    with pytest.raises(TypeError, match="no field"):
        require_fields(example_round_open(), colour="blue")
