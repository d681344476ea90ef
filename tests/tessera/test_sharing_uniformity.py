"""Any S-1 shares look uniformly random, whatever the input, and the check can fail.

Chi-square goodness of fit on share contents, at a fixed significance ALPHA. Each check is
on fresh os.urandom seeds, so a correct implementation fails one check with probability
ALPHA; this file makes 68 checks, so a false alarm has probability below 1e-4. A
broken PRG (zeros, a counter, a reused seed, a slight bias) gives p-values far below ALPHA,
as the negative controls at the bottom show through the real `split`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from scipy import stats

import tessera.crypto.sharing
from tessera.crypto.encoding import derive_ring_params, encode
from tessera.crypto.sharing import ShareContext, expand, split

ALPHA = 1e-6
LENGTH = 1 << 19  # uint32 elements: 2 MiB of share bytes, 16 expected per 16-bit bin
PARAMS = derive_ring_params(bound=1.0, max_participants=100)
CONTEXT = ShareContext("fed", "study", 11, "node-u")

INPUTS = {
    "all zero": np.zeros(LENGTH, dtype=np.float32),
    "constant": np.full(LENGTH, 0.5, dtype=np.float32),
    "ramp": np.linspace(-1, 1, LENGTH, dtype=np.float32),
}


def uniformity_p_values(vector: np.ndarray) -> dict[str, float]:
    """Chi-square p-values of the byte histogram and the 16-bit-half histogram."""
    raw = vector.view(np.uint8)
    halves = vector.view(np.uint16)
    return {
        "bytes": float(stats.chisquare(np.bincount(raw, minlength=256)).pvalue),
        "16-bit": float(stats.chisquare(np.bincount(halves, minlength=1 << 16)).pvalue),
    }


def assert_uniform(vector: np.ndarray, what: str) -> None:
    for test, p_value in uniformity_p_values(vector).items():
        assert p_value > ALPHA, f"{what}: {test} chi-square p = {p_value:.3g} <= {ALPHA}"


def coalition_views(expanded: list[np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """What coalitions of S-1 aggregators see, reduced to vectors that must be uniform.

    Every single share, and for S >= 3 the ring sum and difference of every pair (a pair
    always fits inside some S-1 coalition). A joint uniform distribution makes all of these
    uniform; a reused seed or a share that leaks the input makes some of them constant.
    """
    for index, vector in enumerate(expanded):
        yield f"share {index}", vector
    if len(expanded) >= 3:
        for (i, a), (j, b) in itertools.combinations(enumerate(expanded), 2):
            yield f"share {i} + share {j}", a + b
            yield f"share {i} - share {j}", a - b


def expanded_shares(values: np.ndarray, n_aggregators: int) -> list[np.ndarray]:
    ring = encode(values, PARAMS)
    return [expand(s, CONTEXT, LENGTH, PARAMS) for s in split(ring, n_aggregators, CONTEXT, PARAMS)]


@pytest.mark.parametrize("input_name", sorted(INPUTS))
@pytest.mark.parametrize("n_aggregators", [2, 3])
def test_any_s_minus_1_shares_are_uniform(input_name: str, n_aggregators: int) -> None:
    expanded = expanded_shares(INPUTS[input_name], n_aggregators)
    for what, vector in coalition_views(expanded):
        assert_uniform(vector, f"{input_name} input, S={n_aggregators}, {what}")


def test_the_full_share_alone_is_uniform_for_an_all_zero_input() -> None:
    # S = 2: the one aggregator holding the full share sees x - mask; for x = 0 that is the
    # negated mask, and it must still be uniform.
    shares = split(encode(INPUTS["all zero"], PARAMS), 2, CONTEXT, PARAMS)
    (full,) = [s.vector for s in shares if s.vector is not None]
    assert_uniform(full, "full share of an all-zero input")


# Negative controls: the same checks, fed with what broken implementations would produce.


def broken_keystream(kind: str) -> Callable[[bytes, ShareContext, int, int], Iterator[bytes]]:
    """A stand-in for the AES-CTR keystream, cut into the same chunks as the real one."""

    def keystream(seed: bytes, ctx: ShareContext, index: int, nbytes: int) -> Iterator[bytes]:
        if kind == "zeros":
            stream = bytes(nbytes)
        elif kind == "counter":
            stream = np.arange(nbytes // 4, dtype="<u4").tobytes()
        else:  # "seed ignored": every aggregator's mask is the same, as with a reused seed
            stream = np.random.default_rng(7).bytes(nbytes)
        step = tessera.crypto.sharing._CHUNK_BYTES
        for start in range(0, nbytes, step):
            yield stream[start : start + step]

    return keystream


@pytest.mark.parametrize("kind", ["zeros", "counter"])
def test_the_check_catches_a_prg_replaced_by_zeros_or_a_counter(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tessera.crypto.sharing, "_keystream_chunks", broken_keystream(kind))
    expanded = expanded_shares(INPUTS["all zero"], 2)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_uniform(expanded[0], kind)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_uniform(expanded[1], kind)


def test_the_check_catches_two_aggregators_with_the_same_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        tessera.crypto.sharing, "_keystream_chunks", broken_keystream("seed ignored")
    )
    expanded = expanded_shares(INPUTS["constant"], 3)
    for _, vector in coalition_views(expanded[:1]):
        assert_uniform(vector, "each mask alone still looks uniform")
    failures = 0
    for what, vector in coalition_views(expanded):
        try:
            assert_uniform(vector, what)
        except AssertionError:
            failures += 1
    assert failures >= 1, "the pairwise difference of equal masks is zero and must be caught"


def test_the_check_catches_a_slight_bias() -> None:
    # Uniform bytes, except that one byte in 64 is forced to zero: a 1.6% bias.
    biased = np.frombuffer(bytearray(np.random.default_rng(3).bytes(4 * LENGTH)), np.uint8)
    biased = biased.copy()
    biased[::64] = 0
    with pytest.raises(AssertionError, match="chi-square"):
        assert_uniform(biased.view(np.uint32), "biased bytes")
