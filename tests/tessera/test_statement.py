"""A node's sealed statement (tessera.wire.statement): strict bytes, a hiding commitment, and
a seal that opens only at its own aggregator, for its own round, and never as a share."""

from __future__ import annotations

import dataclasses

import pytest

from tessera.crypto.sealing import generate_hpke_key, open_sealed
from tessera.errors import AuthenticationError, CodecError
from tessera.wire.envelopes import share_binding
from tessera.wire.messages import ShareEnvelope
from tessera.wire.statement import (
    SEALED_STATEMENT_BYTES,
    STATEMENT_BYTES,
    NodeStatement,
    open_statement,
    seal_statement,
)
from tests.tessera.wire_examples import example_round_open

KEYS = {"agg-1": generate_hpke_key(), "agg-2": generate_hpke_key()}


def envelope(sealed_statement: bytes, aggregator: str = "agg-1") -> ShareEnvelope:
    a = example_round_open()
    return ShareEnvelope(
        a.federation_id, a.study_id, a.round, a.base_model_hash, "node-a", aggregator, a.ring,
        a.vector_length, b"", sealed_statement,
    )  # fmt: skip


def test_a_statement_round_trips_strictly() -> None:
    statement = NodeStatement.fresh(3.25)
    data = statement.to_bytes()
    assert len(data) == STATEMENT_BYTES and NodeStatement.from_bytes(data) == statement
    assert statement.salt not in repr(statement).encode()
    for bad in (data[:-1], data + b"\x00"):
        with pytest.raises(CodecError):
            NodeStatement.from_bytes(bad)
    with pytest.raises(CodecError):
        NodeStatement(float("nan"), bytes(32))
    with pytest.raises(CodecError, match="salt"):
        NodeStatement(1.0, bytes(31))


def test_the_commitment_hides_the_epsilon_and_binds_the_statement() -> None:
    one, two = NodeStatement.fresh(1.0), NodeStatement.fresh(1.0)
    assert one.commitment() != two.commitment()  # same epsilon, other salt: unlinkable
    assert one.commitment() == NodeStatement(1.0, one.salt).commitment()
    assert one.commitment() != NodeStatement(2.0, one.salt).commitment()


def test_a_sealed_statement_opens_only_at_its_aggregator_and_never_as_a_share() -> None:
    a = example_round_open()
    statement = NodeStatement.fresh(0.75)
    sealed = seal_statement(statement, a, "node-a", "agg-1", KEYS["agg-1"].public_key())
    assert len(sealed) == SEALED_STATEMENT_BYTES
    assert open_statement(envelope(sealed), a, KEYS["agg-1"]) == statement
    with pytest.raises(AuthenticationError):  # another aggregator's key
        open_statement(envelope(sealed), a, KEYS["agg-2"])
    with pytest.raises(AuthenticationError):  # replayed as if meant for agg-2
        open_statement(envelope(sealed, "agg-2"), a, KEYS["agg-2"])
    with pytest.raises(AuthenticationError):  # another round
        open_statement(envelope(sealed), dataclasses.replace(a, round=a.round + 1), KEYS["agg-1"])
    with pytest.raises(AuthenticationError):  # opened as a share
        open_sealed(sealed, KEYS["agg-1"], share_binding(a, "node-a", "agg-1"))
