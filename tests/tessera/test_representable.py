"""tessera.crypto.update_layout.check_representable: the terms under which a node's update can
round to all zeros are refused, with a fix that works (issue 19, point 9)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tessera.crypto.encoding import derive_ring_params, encode
from tessera.crypto.update_layout import (
    check_representable,
    pack_update,
    required_bound,
    rounding_norm,
    sample_weight,
)
from tessera.wire.messages import RoundOpen
from tessera.wire.round_terms import RoundTermsRefused, check_round_encoding

RESNET18 = 11_171_266  # trainable parameters of resnet18-v1 (1 channel, 2 classes)


def encoded_delta(n_params: int, samples: int, weight_cap: int, frac_bits: int) -> np.ndarray:
    """A node's encoded weighted delta for an evenly spread delta of norm 1 (the clip)."""
    delta = np.full(n_params, 1.0 / math.sqrt(n_params))
    vector = pack_update(delta, sample_weight(samples, weight_cap), 0.5)
    ring = derive_ring_params(required_bound(1.0), 4, frac_bits)
    encoded: np.ndarray = encode(vector, ring)[:n_params]
    return encoded


def test_the_issue_s_resnet18_of_15_samples_at_the_default_cap_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError) as caught:
        check_representable(
            weight_cap=10_000, frac_bits=16, clip_norm=1.0, n_params=RESNET18, samples=15
        )
    message = str(caught.value)
    assert "a node with 15 training samples weighs 0.0015" in message
    assert "lower round.weight_cap to at most 588" in message
    assert "raise round.frac_bits to at least 21" in message
    # Either fix passes, and one step short of either does not.
    check_representable(weight_cap=588, frac_bits=16, clip_norm=1.0, n_params=RESNET18, samples=15)
    check_representable(
        weight_cap=10_000, frac_bits=21, clip_norm=1.0, n_params=RESNET18, samples=15
    )
    for cap, bits in ((589, 16), (10_000, 20)):
        with pytest.raises(ValueError):
            check_representable(
                weight_cap=cap, frac_bits=bits, clip_norm=1.0, n_params=RESNET18, samples=15
            )


def test_the_condition_is_exactly_where_an_evenly_spread_update_rounds_to_zeros() -> None:
    n_params, cap, bits = 40_000, 10_000, 16
    # Refused: every coordinate of the update rounds to zero.
    refused = 10
    with pytest.raises(ValueError, match="could round to all zeros"):
        check_representable(
            weight_cap=cap, frac_bits=bits, clip_norm=1.0, n_params=n_params, samples=refused
        )
    assert not np.any(encoded_delta(n_params, refused, cap, bits))
    # Accepted: every coordinate survives.
    accepted = math.ceil(cap * rounding_norm(n_params, bits))
    check_representable(
        weight_cap=cap, frac_bits=bits, clip_norm=1.0, n_params=n_params, samples=accepted
    )
    assert np.all(encoded_delta(n_params, accepted, cap, bits) != 0)


def test_a_weight_cap_that_starves_the_smallest_weight_is_refused() -> None:
    check_representable(weight_cap=2**14, frac_bits=16, clip_norm=1.0, n_params=100)
    with pytest.raises(ValueError, match=r"lower round.weight_cap to at most 16384 or raise "
                       r"round.frac_bits to at least 17"):  # fmt: skip
        check_representable(weight_cap=2**14 + 1, frac_bits=16, clip_norm=1.0, n_params=100)


def test_a_node_at_the_cap_that_rounds_away_cannot_be_fixed_by_the_cap() -> None:
    with pytest.raises(ValueError) as caught:
        check_representable(weight_cap=8, frac_bits=8, clip_norm=1.0, n_params=RESNET18)
    assert "a node at the cap weighs 1" in str(caught.value)
    assert "weight_cap to at most" not in str(caught.value)
    assert "raise round.frac_bits to at least 11" in str(caught.value)
    check_representable(weight_cap=8, frac_bits=11, clip_norm=1.0, n_params=RESNET18)


def test_every_party_refuses_such_a_round_open_by_its_terms() -> None:
    ring = derive_ring_params(required_bound(1.0), 2, 8)
    round_open = RoundOpen(
        federation_id="fed", study_id="study", round=1, base_model_hash=bytes(32),
        model_version=0, deadline_ms=1, algorithm="fedavg", local_epochs=1, local_steps=0,
        learning_rate=0.01, prox_mu=0.0, clip_norm=1.0, ring=ring, min_participants=2,
        vector_length=RESNET18 + 3, aggregator_ids=("agg-1", "agg-2"),
        expected_nodes=("site-a", "site-b"), leader_id="agg-1", weight_cap=8,
    )  # fmt: skip
    with pytest.raises(RoundTermsRefused) as caught:
        check_round_encoding(round_open, max_clip_norm=1.0)
    assert caught.value.reason == "update-unrepresentable"
