"""Hypothesis strategies and small fixed examples for the wire-format tests."""

from __future__ import annotations

import hashlib

from hypothesis import strategies as st

from tessera.crypto.encoding import RingParams, derive_ring_params
from tessera.wire.agreement import PartialSum, ParticipantSet, ReceiptSet, ReceivedSet
from tessera.wire.messages import RoundAbort, RoundOpen, ShareEnvelope
from tessera.wire.release import ModelRelease, ReleaseBundle, build_release

ID_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"

ids = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("abcxyzAZ09"),
    st.text(ID_ALPHABET, max_size=20),
)
hashes = st.binary(min_size=32, max_size=32)
rounds = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
non_negative = st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False)
rings = st.builds(
    derive_ring_params,
    bound=st.floats(0.01, 10.0),
    max_participants=st.integers(1, 200),
)
unique_ids = st.lists(ids, unique=True, max_size=8).map(tuple)


@st.composite
def round_opens(draw: st.DrawFn) -> RoundOpen:
    aggregators = tuple(draw(st.lists(ids, min_size=2, max_size=5, unique=True)))
    deadline_ms = draw(u64)
    return RoundOpen(
        federation_id=draw(ids),
        study_id=draw(ids),
        round=draw(rounds),
        base_model_hash=draw(hashes),
        model_version=draw(u64),
        deadline_ms=deadline_ms,
        algorithm=draw(st.sampled_from(["fedavg", "fedsgd"])),
        local_epochs=draw(u32),
        local_steps=draw(u32),
        learning_rate=draw(non_negative),
        prox_mu=draw(non_negative),
        clip_norm=draw(non_negative),
        ring=draw(rings),
        min_participants=draw(st.integers(1, 2**32 - 1)),
        vector_length=draw(st.integers(1, 2**31)),
        aggregator_ids=aggregators,
        expected_nodes=draw(unique_ids),
        leader_id=draw(st.sampled_from(aggregators)),
        weight_cap=draw(st.integers(1, 2**32 - 1)),
        loss_cap=draw(st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False)),
        opened_ms=draw(st.integers(0, deadline_ms)),
    )


@st.composite
def share_envelopes(draw: st.DrawFn) -> ShareEnvelope:
    length = draw(st.integers(1, 64))
    return ShareEnvelope(
        federation_id=draw(ids),
        study_id=draw(ids),
        round=draw(rounds),
        base_model_hash=draw(hashes),
        node_id=draw(ids),
        aggregator_id=draw(ids),
        ring=draw(rings),
        vector_length=length,
        sealed=draw(st.binary(max_size=length * 4 + 64)),
        sealed_statement=draw(st.binary(max_size=256)),
    )


@st.composite
def received_sets(draw: st.DrawFn) -> ReceivedSet:
    nodes = draw(unique_ids)
    statements = tuple(draw(hashes) for _ in nodes)
    return ReceivedSet(draw(ids), draw(ids), draw(rounds), draw(ids), nodes, statements)


receipt_sets = st.builds(
    ReceiptSet, ids, ids, rounds, ids, st.lists(hashes, max_size=8).map(tuple)
)
participant_sets = st.builds(ParticipantSet, ids, ids, rounds, ids, unique_ids)
partial_sums = st.builds(PartialSum, ids, ids, rounds, ids, ids, hashes, st.binary(max_size=300))
round_aborts = st.builds(RoundAbort, ids, ids, rounds, ids, st.text(max_size=200))


@st.composite
def model_releases(draw: st.DrawFn) -> ModelRelease:
    signers = draw(st.lists(ids, unique=True, max_size=4))
    return ModelRelease(
        federation_id=draw(ids),
        study_id=draw(ids),
        round=draw(rounds),
        version=draw(u64),
        parent_hash=draw(hashes),
        model_hash=draw(hashes),
        onnx_hash=draw(hashes),
        card_hash=draw(hashes),
        payload=draw(st.binary(max_size=300)),
        signatures=tuple((signer, draw(st.binary(min_size=64, max_size=64))) for signer in signers),
    )


any_message = st.one_of(
    round_opens(),
    share_envelopes(),
    received_sets(),
    receipt_sets,
    participant_sets,
    partial_sums,
    model_releases(),
    round_aborts,
)


def small_ring() -> RingParams:
    """A fixed ring for the hand-written examples."""
    return derive_ring_params(bound=1.0, max_participants=10)


def example_round_open(round_: int = 7) -> RoundOpen:
    """A realistic RoundOpen with two aggregators and three nodes."""
    return RoundOpen(
        federation_id="fed-1",
        study_id="study-1",
        round=round_,
        base_model_hash=hashlib.sha256(b"base model").digest(),
        model_version=3,
        deadline_ms=1_800_000_000_000,
        algorithm="fedavg",
        local_epochs=1,
        local_steps=0,
        learning_rate=0.01,
        prox_mu=0.0,
        clip_norm=1.0,
        ring=small_ring(),
        min_participants=2,
        vector_length=4,
        aggregator_ids=("agg-1", "agg-2"),
        expected_nodes=("node-a", "node-b", "node-c"),
        leader_id="agg-1",
    )


def example_release() -> ModelRelease:
    """An unsigned release with a small bundle."""
    bundle = ReleaseBundle(weights=b"weights" * 10, onnx=b"onnx" * 10, card=b'{"round": 7}')
    return build_release("fed-1", "study-1", 7, 4, hashlib.sha256(b"base model").digest(), bundle)
