"""Ring encoding: parameter derivation, the no-wrap guarantee, refusals, rounding error."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.crypto.encoding import RingParams, decode, derive_ring_params, encode
from tessera.errors import CodecError

bounds = st.floats(min_value=1e-3, max_value=1e9, allow_nan=False, allow_infinity=False)
participants = st.integers(min_value=1, max_value=10_000)
frac_bits = st.integers(min_value=0, max_value=40)


def test_derive_picks_32_bits_for_a_typical_federation() -> None:
    params = derive_ring_params(bound=1.0, max_participants=1000, frac_bits=16)
    assert params.bits == 32
    assert params.dtype == np.uint32


def test_derive_falls_back_to_64_bits_when_32_would_wrap() -> None:
    # 2**16 * 2**16 = 2**32 > 2**31 - 1: a 32-bit ring could wrap.
    params = derive_ring_params(bound=2.0**16, max_participants=1, frac_bits=16)
    assert params.bits == 64
    assert params.dtype == np.uint64


def test_derive_refuses_what_even_64_bits_cannot_hold() -> None:
    with pytest.raises(ValueError, match="more than 64"):
        derive_ring_params(bound=1e12, max_participants=10**6, frac_bits=40)


@given(bounds, participants, frac_bits)
def test_derived_params_satisfy_the_overflow_inequality(
    bound: float, max_participants: int, frac: int
) -> None:
    try:
        params = derive_ring_params(bound, max_participants, frac)
    except ValueError:
        assert max_participants * math.ceil(bound * 2**frac) > 2**63 - 1
        return
    worst = max_participants * params.max_abs_encoded
    assert worst <= 2 ** (params.bits - 1) - 1
    if params.bits == 64:
        assert worst > 2**31 - 1, "a 32-bit ring would have been enough"


def test_ring_params_refuse_parameters_that_could_wrap() -> None:
    with pytest.raises(ValueError, match="wraps a 32-bit ring"):
        RingParams(bits=32, frac_bits=16, bound=1.0, max_participants=2**15)


@given(bounds, participants, frac_bits)
def test_ring_params_round_trip_through_bytes(bound: float, n: int, frac: int) -> None:
    try:
        params = derive_ring_params(bound, n, frac)
    except ValueError:
        return
    data = params.to_bytes()
    assert len(data) == 15
    assert RingParams.from_bytes(data) == params


def test_ring_params_known_bytes() -> None:
    # Recorded layout: version 1, bits, frac_bits, IEEE double bound, u32 participants.
    params = RingParams(bits=32, frac_bits=16, bound=1.0, max_participants=100)
    assert params.to_bytes().hex() == "0120103ff000000000000000000064"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(14),
        bytes(16),
        bytes.fromhex("0220103ff000000000000000000064"),  # unknown version
        bytes.fromhex("0121103ff000000000000000000064"),  # 33-bit ring
        bytes.fromhex("012010fff000000000000000000064"),  # bound = -inf
        bytes.fromhex("0120107ff800000000000000000064"),  # bound = NaN
        bytes.fromhex("0120103ff000000000000000000000"),  # zero participants
        bytes.fromhex("0120103ff000000000000000ffffff"),  # would wrap
    ],
)
def test_ring_params_from_bad_bytes_raise_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        RingParams.from_bytes(data)


@given(
    bound=st.sampled_from([2.0**-7, 1.0, 7.5, 3e4]),
    frac=st.integers(min_value=0, max_value=30),
    data=st.data(),
)
def test_encode_decode_round_trip_within_half_a_step(
    bound: float, frac: int, data: st.DataObject
) -> None:
    params = derive_ring_params(bound, 1, frac)
    values = data.draw(
        st.lists(st.floats(-bound, bound, width=32), min_size=0, max_size=40).map(
            lambda v: np.array(v, dtype=np.float32)
        )
    )
    ring = encode(values, params)
    assert ring.dtype == params.dtype
    assert ring.shape == values.shape
    error = np.abs(decode(ring, params, 1) - values.astype(np.float64))
    assert np.all(error <= 2.0 ** -(frac + 1))


def test_encode_keeps_the_shape_of_its_input() -> None:
    params = derive_ring_params(1.0, 4)
    values = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    ring = encode(values, params)
    assert ring.shape == (3, 4)
    np.testing.assert_allclose(decode(ring, params, 1), values, atol=2.0**-17)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int16])
def test_encode_accepts_other_real_dtypes(dtype: type) -> None:
    params = derive_ring_params(8.0, 4)
    values: np.ndarray = np.array([-8, -1, 0, 3, 8], dtype=dtype)
    np.testing.assert_allclose(decode(encode(values, params), params, 1), values, atol=2.0**-17)


@given(
    bits=st.sampled_from([32, 64]),
    scale=st.floats(1.0000001, 1e30),
    sign=st.sampled_from([-1.0, 1.0]),
    where=st.integers(0, 9),
)
def test_encode_refuses_values_beyond_the_bound(
    bits: int, scale: float, sign: float, where: int
) -> None:
    bound = 1.0 if bits == 32 else 2.0**20
    params = derive_ring_params(bound, 2**10, 16)
    assert params.bits == bits
    values = np.zeros(10, dtype=np.float64)
    values[where] = sign * bound * scale
    if values[where] == sign * bound:  # scale rounded away: still in bound, not a test case
        return
    with pytest.raises(ValueError, match="outside the ring bound") as caught:
        encode(values, params)
    assert f"flat index {where}" in str(caught.value)
    assert "clip" in str(caught.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encode_refuses_non_finite_values(bad: float, dtype: type) -> None:
    params = derive_ring_params(1.0, 4)
    values: np.ndarray = np.array([0.0, 0.5, bad, -0.5], dtype=dtype)
    with pytest.raises(ValueError, match="not finite"):
        encode(values, params)


def test_encode_refuses_non_real_input() -> None:
    params = derive_ring_params(1.0, 4)
    with pytest.raises(TypeError, match="real numbers"):
        encode(np.array([1 + 2j]), params)


@given(
    max_participants=st.integers(1, 64),
    frac=st.integers(0, 20),
    sign=st.sampled_from([-1.0, 1.0]),
)
def test_the_largest_possible_sum_decodes_without_wrapping(
    max_participants: int, frac: int, sign: float
) -> None:
    # Choose the bound so that the 32-bit ring is filled to the last representable value:
    # the tightest case the overflow argument allows.
    bound = math.floor((2**31 - 1) / max_participants) / 2**frac
    params = derive_ring_params(bound, max_participants, frac)
    assert params.bits == 32
    one = encode(np.full(3, sign * bound), params)
    total = np.zeros(3, dtype=params.dtype)
    for _ in range(max_participants):
        total += one  # unsigned wraparound, as aggregators sum
    decoded = decode(total, params, max_participants)
    np.testing.assert_array_equal(decoded, np.full(3, sign * bound * max_participants))


def test_decode_refuses_more_summands_than_the_params_allow() -> None:
    params = derive_ring_params(1.0, 10)
    total = np.zeros(4, dtype=params.dtype)
    with pytest.raises(ValueError, match=r"allow 1\.\.10 without wrapping"):
        decode(total, params, 11)
    with pytest.raises(ValueError):
        decode(total, params, 0)


@given(n=st.integers(1, 20), extra=st.integers(1, 20))
def test_decode_refuses_a_sum_larger_than_its_summand_count_allows(n: int, extra: int) -> None:
    params = derive_ring_params(1.0, 40)
    one = encode(np.ones(5, dtype=np.float32), params)
    total = np.zeros(5, dtype=params.dtype)
    for _ in range(n + extra):
        total += one
    # n + extra summands passed off as n: the count is wrong, and decoding says so.
    with pytest.raises(ValueError, match="not a complete sum"):
        decode(total, params, n)
    np.testing.assert_array_equal(decode(total, params, n + extra), np.full(5, n + extra))


def test_decode_refuses_the_wrong_ring_width() -> None:
    params = derive_ring_params(1.0, 10)
    with pytest.raises(ValueError, match="dtype uint64"):
        decode(np.zeros(3, dtype=np.uint64), params, 1)


@settings(max_examples=50)
@given(st.lists(st.floats(-1, 1, width=32), max_size=30))
def test_a_random_ring_total_is_usually_not_mistaken_for_a_sum(values: list[float]) -> None:
    # A missing share leaves a uniformly random total; with bound 1 and few summands the
    # valid range is a tiny fraction of the 32-bit ring, so decoding refuses it.
    params = derive_ring_params(1.0, 4)
    ring = encode(np.array(values, dtype=np.float32), params)
    ring[...] = ring + np.uint32(2**30)  # as if a share with a large coordinate were missing
    if ring.size:
        with pytest.raises(ValueError, match="not a complete sum"):
            decode(ring, params, 1)
