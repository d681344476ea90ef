"""aggregator.aggregate_check: crafted aggregates refused part by part, with the figure; honest
aggregates (real pack_update, real encoding, ring sum, decode) always pass (Hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.aggregate_check import (
    FLOAT_SLACK,
    AggregateTerms,
    check_aggregate,
    rounding_tolerance,
)
from aggregator.errors import AggregateRefused
from aggregator.partials import combine_round
from tessera.crypto.encoding import decode, derive_ring_params, encode
from tessera.crypto.update_layout import pack_update, required_bound
from tests.aggregator.test_round_core import OPEN, RING

TERMS = AggregateTerms(clip_norm=1.0, weight_cap=100, loss_cap=10.0, frac_bits=16)
N, P = 3, 8
TOL = rounding_tolerance(N, TERMS.frac_bits)


def aggregate(delta: list[float] | np.ndarray, weight: float, loss: float, sq: float) -> np.ndarray:
    return np.array([*delta, weight, loss, sq], dtype=np.float64)


def refused(vector: np.ndarray, n: int = N, terms: AggregateTerms = TERMS) -> AggregateRefused:
    with pytest.raises(AggregateRefused) as caught:
        check_aggregate(vector, n, terms)
    return caught.value


def test_the_tolerance_is_n_half_quanta() -> None:
    assert rounding_tolerance(3, 16) == 3 * 2.0**-17
    assert rounding_tolerance(1, 0) == 0.5


def test_an_aggregate_at_every_bound_passes() -> None:
    """Three nodes of weight 1 with the same delta of norm clip along one axis: the weighted
    delta, its coordinate, the squared norm (both Cauchy-Schwarz ends) and the loss at the
    top of their ranges."""
    delta = np.zeros(P)
    delta[0] = 3.0
    check_aggregate(aggregate(delta, 3.0, 30.0, 3.0), N, TERMS)
    check_aggregate(aggregate(np.zeros(P), N / TERMS.weight_cap, 0.0, 0.0), N, TERMS)


@pytest.mark.parametrize(
    ("weight", "shown"),
    [
        (-1.0 + 2.0**-16, "-0.999985"),  # the hostile weight
        (2.0**-16, "1.52588e-05"),  # a positive sum, far below 3 nodes at 1/100 each
        (0.0, "0"),
        (3.0 + 1e-3, "3.001"),  # more than n nodes of weight 1
        (float("nan"), "nan"),
    ],
)
def test_a_sum_of_weights_outside_n_over_cap_to_n_is_refused(weight: float, shown: str) -> None:
    error = refused(aggregate(np.zeros(P), weight, 0.0, 0.0))
    assert error.part == "weight"
    assert f"sum of weights is {shown}," in error.reason
    assert "outside [0.0299771, 3.00002] (3 nodes, each weight in [1/100, 1])" in error.reason


def test_a_delta_that_rounded_to_zero_while_its_squared_norm_did_not_is_refused() -> None:
    # Issue 19, point 9: the card would refuse its infinite dispersion; say why instead.
    error = refused(aggregate(np.zeros(P), 0.03, 0.0, 1e-3))
    assert error.part == "precision" and "zero in every coordinate at 16 fraction" in error.reason
    check_aggregate(aggregate(np.zeros(P), 0.03, 0.0, 0.0), N, TERMS)  # no update at all


def test_one_coordinate_beyond_clip_times_the_weight_is_refused() -> None:
    delta = np.zeros(P)
    delta[5] = -1.5 - 10 * TOL  # weight 1.5, clip 1
    error = refused(aggregate(delta, 1.5, 0.0, 1.5))
    assert error.part == "delta" and error.figure == pytest.approx(1.5 + 10 * TOL)
    assert "coordinate" in error.reason


def test_a_norm_beyond_clip_times_the_weight_is_refused_coordinates_in_bound() -> None:
    delta = np.full(P, 0.9)  # every coordinate under clip * W = 1, the norm 2.55
    error = refused(aggregate(delta, 1.0, 0.0, 1.0))
    assert error.part == "delta" and error.figure == pytest.approx(0.9 * math.sqrt(P))
    assert "its mean would be 2.54" in error.reason


def test_the_norm_tolerance_is_rounding_only() -> None:
    """Past clip * (W + tol) by more than tol * sqrt(P) (the rounding of P coordinates), an
    aggregate is refused; just within it, it passes."""
    unit = np.full(P, 1 / math.sqrt(P))
    allowed = (1.0 + TOL) * (1 + FLOAT_SLACK) + TOL * math.sqrt(P)
    check_aggregate(aggregate(unit * allowed * (1 - 1e-12), 1.0, 0.0, 1.0), N, TERMS)
    assert refused(aggregate(unit * allowed * (1 + 1e-9), 1.0, 0.0, 1.0)).part == "delta"


@pytest.mark.parametrize("loss", [-1e-3, 20.0 + 1e-3])
def test_a_weighted_loss_outside_zero_to_cap_times_weight_is_refused(loss: float) -> None:
    error = refused(aggregate(np.zeros(P), 2.0, loss, 0.0))
    assert error.part == "loss" and error.figure == loss


@pytest.mark.parametrize("sq", [-1e-3, 2.0 + 1e-3])
def test_a_squared_norm_outside_zero_to_clip_squared_times_weight_is_refused(sq: float) -> None:
    error = refused(aggregate(np.zeros(P), 2.0, 0.0, sq))
    assert error.part == "squared-norm" and "clip^2" in error.reason


def test_a_squared_norm_below_cauchy_schwarz_is_refused() -> None:
    """sum w*d of norm 1 over W = 2 needs sum w*|d|^2 >= 1/2: a node that reports 0 to look
    unanimous (steering the adaptive policy's dispersion) is caught."""
    delta = np.zeros(P)
    delta[0] = 1.0
    check_aggregate(aggregate(delta, 2.0, 0.0, 0.5), N, TERMS)
    error = refused(aggregate(delta, 2.0, 0.0, 0.5 - 1e-3))
    assert error.part == "squared-norm" and "Cauchy-Schwarz" in error.reason


def test_a_vector_without_the_layout_is_refused() -> None:
    assert refused(np.zeros(3)).part == "layout"
    assert refused(np.zeros(P + 3, dtype=np.float32)).part == "layout"
    bad = aggregate(np.zeros(P), 1.0, 0.0, 0.0)
    bad[2] = np.nan
    assert refused(bad).part == "delta"


def test_combine_round_turns_an_out_of_range_ring_sum_into_a_refusal() -> None:
    """A share of ring values near 2**(b-1): decode used to raise, which stalled the round."""
    top = np.full(OPEN.vector_length, 2 ** (RING.bits - 1) - 1, dtype=RING.dtype)
    zero = np.zeros(OPEN.vector_length, dtype=RING.dtype)
    with pytest.raises(AggregateRefused, match=r"\(range\).*outside the range 3 encodings"):
        combine_round({"agg-1": top, "agg-2": zero}, OPEN, 3)


def test_combine_round_checks_what_it_decodes() -> None:
    hostile = np.zeros(OPEN.vector_length)
    hostile[: OPEN.vector_length - 3] = RING.bound
    hostile[-3] = -1.0 + 2.0**-16
    honest = pack_update(np.full(OPEN.vector_length - 3, 0.01), 1.0, 0.5)
    partial = (encode(hostile, RING) + encode(honest, RING)).astype(RING.dtype)
    zero = np.zeros(OPEN.vector_length, dtype=RING.dtype)
    with pytest.raises(AggregateRefused, match=r"\(weight\): the sum of weights is 1.52588e-05"):
        combine_round({"agg-1": partial, "agg-2": zero}, OPEN, 2)


@st.composite
def honest_rounds(draw: st.DrawFn) -> tuple[list[np.ndarray], AggregateTerms, int, int]:
    """Node vectors as `pack_update` builds them: each delta clipped to the clip norm (often
    right at it, often all alike, which puts Cauchy-Schwarz at equality), weights in
    [1/weight_cap, 1], any loss."""
    frac_bits = draw(st.integers(min_value=8, max_value=32))
    # 1/weight_cap must be representable: the config keeps weight_cap well under 2**frac_bits
    weight_cap = draw(st.integers(min_value=1, max_value=2 ** (frac_bits - 2)))
    clip = draw(st.sampled_from([1e-3, 0.1, 1.0, 3.0, 50.0]))
    terms = AggregateTerms(clip, weight_cap, 10.0, frac_bits)
    n = draw(st.integers(min_value=1, max_value=12))
    length = draw(st.integers(min_value=1, max_value=40))
    alike = draw(st.booleans())
    shape = draw(st.sampled_from(["random", "axis", "tiny"]))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    rng = np.random.default_rng(seed)
    first = None
    vectors = []
    for _ in range(n):
        if shape == "axis":
            delta = np.zeros(length)
            delta[0] = rng.choice([-1.0, 1.0])
        else:
            delta = rng.standard_normal(length) * (1e-9 if shape == "tiny" else 1.0)
        if shape != "tiny" and (draw(st.booleans()) or float(np.linalg.norm(delta)) > clip):
            # at the clip norm, as node.training.update clips (a margin of 1e-9, so that
            # float rounding never puts w * |d|^2 above the ring's bound)
            delta *= clip / float(np.linalg.norm(delta)) * (1 - 1e-9)
        first = delta if first is None else first
        samples = draw(st.integers(min_value=1, max_value=weight_cap))
        loss = draw(st.floats(min_value=-1.0, max_value=100.0))
        vectors.append(pack_update(first if alike else delta, samples / weight_cap, loss))
    return vectors, terms, n, frac_bits


@settings(max_examples=300, deadline=None)
@given(honest_rounds())
def test_honest_aggregates_always_pass(
    case: tuple[list[np.ndarray], AggregateTerms, int, int],
) -> None:
    vectors, terms, n, frac_bits = case
    ring = derive_ring_params(required_bound(terms.clip_norm, terms.loss_cap), n, frac_bits)
    total = np.zeros(vectors[0].size, dtype=ring.dtype)
    for vector in vectors:
        total += encode(vector, ring)  # ring addition: unsigned wraparound
    decoded = decode(total, ring, n)
    if not np.any(decoded[:-3]) and decoded[-1] > 0:
        # Deltas that cancel exactly, or round away: no model to release (issue 19, point 9).
        with pytest.raises(AggregateRefused, match=r"\(precision\)"):
            check_aggregate(decoded, n, terms)
        return
    check_aggregate(decoded, n, terms)


@settings(max_examples=200, deadline=None)
@given(
    scale=st.floats(min_value=1e-6, max_value=1e9),
    weight=st.floats(min_value=-5.0, max_value=5.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_whatever_passes_moves_the_model_by_at_most_clip_plus_rounding(
    scale: float, weight: float, seed: int
) -> None:
    """The damage bound: an aggregate that passes has a mean delta of norm at most the clip,
    plus the rounding tolerance over the weight, whatever a hostile node put into it."""
    delta = np.random.default_rng(seed).standard_normal(P) * scale
    sq = float(delta @ delta) / max(weight, 1e-9)  # Cauchy-Schwarz at equality
    try:
        check_aggregate(aggregate(delta, weight, 0.0, sq), N, TERMS)
    except AggregateRefused:
        return
    assert N / TERMS.weight_cap - TOL <= weight <= N + TOL
    mean = float(np.linalg.norm(delta)) / weight
    assert mean <= TERMS.clip_norm * (1 + TOL / weight) * (1 + 1e-9) + TOL * math.sqrt(P) / weight
