"""Admitting shares: envelope checks against the round, HPKE opening, the close trigger."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aggregator.admission import (
    aggregator_index,
    check_share_envelope,
    collection_close_reason,
    open_share,
)
from aggregator.errors import ShareRejected
from aggregator.rounds import Stage
from tessera.crypto.encoding import derive_ring_params, encode
from tessera.crypto.sealing import generate_hpke_key, seal
from tessera.crypto.sharing import ShareContext, expand, split
from tessera.errors import AuthenticationError
from tessera.wire.envelopes import share_binding
from tessera.wire.messages import RoundOpen, ShareEnvelope
from tessera.wire.statement import NodeStatement, seal_statement

RING = derive_ring_params(bound=8.0, max_participants=16)
ANNOUNCEMENT = RoundOpen(
    federation_id="fed-1",
    study_id="study-1",
    round=3,
    base_model_hash=b"\x01" * 32,
    model_version=2,
    deadline_ms=10_000,
    algorithm="fedavg",
    local_epochs=1,
    local_steps=0,
    learning_rate=0.01,
    prox_mu=0.0,
    clip_norm=1.0,
    ring=RING,
    min_participants=2,
    vector_length=16,
    aggregator_ids=("agg-1", "agg-2"),
    expected_nodes=("site-a", "site-b"),
    leader_id="agg-1",
)
KEYS = {"agg-1": generate_hpke_key(), "agg-2": generate_hpke_key()}


def envelopes_from(node: str, vector: np.ndarray, announcement: RoundOpen = ANNOUNCEMENT):
    ctx = ShareContext("fed-1", "study-1", announcement.round, node)
    shares = split(encode(vector, RING), 2, ctx, RING)
    out = {}
    for agg, share in zip(announcement.aggregator_ids, shares, strict=True):
        sealed = seal(
            share.to_bytes(), KEYS[agg].public_key(), share_binding(announcement, node, agg)
        )
        out[agg] = (
            ShareEnvelope(
                "fed-1",
                "study-1",
                announcement.round,
                announcement.base_model_hash,
                node,
                agg,
                RING,
                16,
                sealed,
                seal_statement(
                    NodeStatement.fresh(1.5), announcement, node, agg, KEYS[agg].public_key()
                ),
            ),
            share,
        )
    return out


def test_a_good_share_is_admitted_and_opens_to_what_was_sent() -> None:
    vector = np.linspace(-1, 1, 16)
    for agg, (envelope, sent) in envelopes_from("site-a", vector).items():
        check_share_envelope(envelope, ANNOUNCEMENT, agg, Stage.COLLECTING)
        share = open_share(envelope, ANNOUNCEMENT, agg, KEYS[agg])
        assert share.aggregator_index == aggregator_index(ANNOUNCEMENT, agg)
        ctx = ShareContext("fed-1", "study-1", 3, "site-a")
        np.testing.assert_array_equal(expand(share, ctx, 16, RING), expand(sent, ctx, 16, RING))


@pytest.mark.parametrize(
    ("change", "stage", "message"),
    [
        ({"study_id": "study-2"}, Stage.COLLECTING, "study-2"),
        ({"round": 4}, Stage.COLLECTING, "round 4"),
        ({}, Stage.AGREEING, "AGREEING"),
        ({"aggregator_id": "agg-2"}, Stage.COLLECTING, "reached 'agg-1'"),
        ({"node_id": "site-z"}, Stage.COLLECTING, "roster"),
        ({"base_model_hash": b"\x02" * 32}, Stage.COLLECTING, "another base model"),
        ({"vector_length": 17}, Stage.COLLECTING, "length 17"),
    ],
)
def test_envelopes_for_another_context_are_rejected(change, stage, message) -> None:
    envelope, _ = envelopes_from("site-a", np.zeros(16))["agg-1"]
    with pytest.raises(ShareRejected, match=message):
        check_share_envelope(dataclasses.replace(envelope, **change), ANNOUNCEMENT, "agg-1", stage)


def test_a_share_sealed_for_another_round_or_aggregator_does_not_open() -> None:
    other_round = dataclasses.replace(ANNOUNCEMENT, round=2)
    envelope, _ = envelopes_from("site-a", np.zeros(16), other_round)["agg-1"]
    replayed = dataclasses.replace(envelope, round=3)  # relabelled to pass the header checks
    check_share_envelope(replayed, ANNOUNCEMENT, "agg-1", Stage.COLLECTING)
    with pytest.raises(AuthenticationError):
        open_share(replayed, ANNOUNCEMENT, "agg-1", KEYS["agg-1"])
    envelope, _ = envelopes_from("site-a", np.zeros(16))["agg-1"]
    with pytest.raises(AuthenticationError):
        open_share(envelope, ANNOUNCEMENT, "agg-1", KEYS["agg-2"])
    with pytest.raises(ShareRejected, match="takes no part"):
        aggregator_index(ANNOUNCEMENT, "agg-9")


def test_collection_closes_when_all_reported_or_at_the_deadline() -> None:
    expected = ("site-a", "site-b")
    assert collection_close_reason(5_000, 10_000, ["site-a"], expected) is None
    assert collection_close_reason(10_000, 10_000, ["site-a"], expected) == "deadline"
    assert collection_close_reason(5_000, 10_000, expected, expected) == "all-reported"
    assert collection_close_reason(11_000, 10_000, expected, expected) == "all-reported"
    assert collection_close_reason(None, 10_000, ["site-a"], expected) is None  # on a share
    assert collection_close_reason(None, 10_000, expected, expected) == "all-reported"
