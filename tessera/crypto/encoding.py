"""Fixed-point encoding of real vectors into the ring Z_2^b, b = 32 or 64.

A node's update vector x (floats, every |x_i| <= bound) becomes integers modulo 2**b:

    q_i = round(x_i * 2**frac_bits)          (round half to even)
    r_i = q_i mod 2**b                       (two's complement, numpy unsigned wraparound)

Ring elements add with numpy's unsigned wraparound arithmetic, which is exactly addition
modulo 2**b. That is what lets additive secret shares (tessera.crypto.sharing) be summed without
ever being decoded. `decode` reads a ring element back as the signed integer in
[-2**(b-1), 2**(b-1)) and divides by 2**frac_bits.

Overflow argument (why a sum can never wrap)
--------------------------------------------
Let Q = ceil(bound * 2**frac_bits). Rounding to nearest is monotone, so |x_i| <= bound gives
|q_i| <= Q. The sum of n <= max_participants encodings is the true integer sum
s = q_1 + ... + q_n taken modulo 2**b, and |s| <= max_participants * Q. `RingParams` only
exists when max_participants * Q <= 2**(b-1) - 1, so s lies in the signed range and reading
the ring element as signed returns s itself: the sum never wraps. `derive_ring_params` picks
b = 32 when that inequality holds for b = 32 (half the upload of b = 64) and b = 64
otherwise, and refuses when even b = 64 cannot hold it. `encode` refuses any |x_i| > bound
and any NaN or infinity, and `decode` refuses more summands than max_participants, so the
premises of the argument are checked, not assumed. The caller supplies the bound: after
clipping an update to L2 norm C and weighting it by at most w, every coordinate satisfies
|x_i| <= C * w (a coordinate is never larger than the norm), so bound = C * w is safe.

Rounding error
--------------
Scaling by a power of two is exact in binary floating point, so the only encoding error is
the rounding to an integer: |q_i / 2**frac_bits - x_i| <= 2**-(frac_bits + 1) per coordinate
and per summand. The sum adds exactly in the ring, so a decoded sum of n encodings differs
from the exact real sum by at most n * 2**-(frac_bits + 1), plus the float64 rounding of the
result itself (none for b = 32, where |s| < 2**31 converts exactly; at most half an ulp of
the result for b = 64).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from tessera.errors import CodecError

RING_BITS = (32, 64)
MAX_FRAC_BITS = 52  # beyond float64's mantissa, more fraction bits only add wasted range
MAX_PARTICIPANTS_LIMIT = 2**32 - 1  # what the 4-byte field of to_bytes can carry

_FORMAT_VERSION = 1
# version, bits, frac_bits, bound (IEEE double), max_participants; big-endian, no padding.
_LAYOUT = struct.Struct(">BBBdI")
_CHUNK = 1 << 16  # elements per encoding step


def _max_abs_encoded(bound: float, frac_bits: int) -> int:
    """Q = ceil(bound * 2**frac_bits): the largest |q| that encoding a value in the bound gives."""
    # math.ldexp is exact (power-of-two scaling), and math.ceil of a float is exact.
    return math.ceil(math.ldexp(bound, frac_bits))


@dataclass(frozen=True)
class RingParams:
    """The encoding a round uses; construction checks that no sum can wrap.

    bits: ring width b (32 or 64); frac_bits: fixed-point scale 2**frac_bits; bound: the
    largest |x_i| of one node's vector, after clipping and weighting; max_participants: the
    most summands a decode will accept.
    """

    bits: int
    frac_bits: int
    bound: float
    max_participants: int

    def __post_init__(self) -> None:
        if self.bits not in RING_BITS:
            raise ValueError(f"ring bits must be 32 or 64, got {self.bits!r}")
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= MAX_FRAC_BITS:
            raise ValueError(
                f"frac_bits must be an integer in 0..{MAX_FRAC_BITS}, got {self.frac_bits!r}"
            )
        if not isinstance(self.bound, float) or not math.isfinite(self.bound) or self.bound <= 0:
            raise ValueError(f"bound must be a finite float > 0, got {self.bound!r}")
        if (
            not isinstance(self.max_participants, int)
            or not 1 <= self.max_participants <= MAX_PARTICIPANTS_LIMIT
        ):
            raise ValueError(
                f"max_participants must be an integer in 1..{MAX_PARTICIPANTS_LIMIT}, "
                f"got {self.max_participants!r}"
            )
        worst = self.max_participants * self.max_abs_encoded
        if worst > 2 ** (self.bits - 1) - 1:
            raise ValueError(
                f"a sum of {self.max_participants} values of magnitude {self.bound} at "
                f"2**{self.frac_bits} scale reaches {worst}, which wraps a {self.bits}-bit ring "
                f"(limit {2 ** (self.bits - 1) - 1}); use derive_ring_params, or lower the "
                "bound, frac_bits or max_participants"
            )

    @property
    def dtype(self) -> np.dtype[Any]:
        """The numpy dtype of ring elements: uint32 or uint64, little-endian on the wire."""
        return np.dtype(np.uint32) if self.bits == 32 else np.dtype(np.uint64)

    @property
    def max_abs_encoded(self) -> int:
        """Q: the largest |integer| that encoding one in-bound value can produce."""
        return _max_abs_encoded(self.bound, self.frac_bits)

    def to_bytes(self) -> bytes:
        """Fixed 15-byte layout (version, bits, frac_bits, bound, max_participants), big-endian."""
        return _LAYOUT.pack(
            _FORMAT_VERSION, self.bits, self.frac_bits, self.bound, self.max_participants
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RingParams:
        """Parse `to_bytes` output; CodecError for a wrong length, version or any invalid field."""
        if len(data) != _LAYOUT.size:
            raise CodecError(
                f"ring parameters must be exactly {_LAYOUT.size} bytes, got {len(data)}"
            )
        version, bits, frac_bits, bound, max_participants = _LAYOUT.unpack(data)
        if version != _FORMAT_VERSION:
            raise CodecError(
                f"ring parameters version {version} is not supported (this build reads "
                f"version {_FORMAT_VERSION}); upgrade the side that sent them"
            )
        try:
            return cls(bits, frac_bits, bound, max_participants)
        except ValueError as error:
            raise CodecError(f"invalid ring parameters: {error}") from None


def derive_ring_params(bound: float, max_participants: int, frac_bits: int = 16) -> RingParams:
    """The narrowest ring (32, else 64 bits) in which max_participants summands never wrap.

    Raises ValueError when even 64 bits cannot hold the sum, naming the values and the fix.
    """
    bound = float(bound)
    if not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"bound must be a finite number > 0, got {bound!r}")
    if not isinstance(frac_bits, int) or not 0 <= frac_bits <= MAX_FRAC_BITS:
        raise ValueError(f"frac_bits must be an integer in 0..{MAX_FRAC_BITS}, got {frac_bits!r}")
    if not isinstance(max_participants, int) or max_participants < 1:
        raise ValueError(f"max_participants must be an integer >= 1, got {max_participants!r}")
    worst = max_participants * _max_abs_encoded(bound, frac_bits)
    for bits in RING_BITS:
        if worst <= 2 ** (bits - 1) - 1:
            return RingParams(bits, frac_bits, bound, max_participants)
    raise ValueError(
        f"a sum of {max_participants} values of magnitude {bound} at 2**{frac_bits} scale "
        f"needs {worst.bit_length() + 1} bits, more than 64; lower frac_bits, the clip bound "
        "or the participant cap"
    )


def encode(x: np.ndarray, params: RingParams) -> np.ndarray:
    """Encode real values into the ring; same shape, dtype `params.dtype`.

    Guarantees: every output decodes to within 2**-(frac_bits+1) of its input, and any
    max_participants outputs sum without wrapping. Refuses (ValueError) NaN, infinities and
    any |x_i| > params.bound, rather than clipping silently: clipping is the caller's
    policy, and a silent clip would hide a bug in it.
    """
    values = np.asarray(x)
    if values.dtype.kind not in "fiu":
        raise TypeError(f"encode needs real numbers, got an array of dtype {values.dtype}")
    if values.size:
        _check_in_bound(values, params.bound)
    # float32 holds every scaled value exactly when the ring is 32 bits (|x * 2**f| < 2**31
    # and scaling by a power of two is exact), so the float32 path is exact and moves half
    # the bytes; otherwise work in float64, which is exact for float32 input at any scale.
    work = np.float32 if (values.dtype == np.float32 and params.bits == 32) else np.float64
    scale = work(2.0**params.frac_bits)
    flat = values.reshape(-1)
    signed = np.empty(values.size, dtype=np.int32 if params.bits == 32 else np.int64)
    # Chunks small enough to stay in the CPU cache: scale, round and convert in one sweep
    # over memory instead of three.
    buffer = np.empty(min(values.size, _CHUNK), dtype=work)
    for start in range(0, values.size, _CHUNK):
        stop = min(start + _CHUNK, values.size)
        part = buffer[: stop - start]
        np.multiply(flat[start:stop], scale, out=part)
        np.rint(part, out=part)
        # |part| <= Q < 2**(b-1) and part is integral, so the cast is exact.
        np.copyto(signed[start:stop], part, casting="unsafe")
    # The unsigned view of a signed integer is its two's complement: q mod 2**b.
    ring: np.ndarray = signed.reshape(values.shape).view(params.dtype)
    return ring


def _check_in_bound(values: np.ndarray, bound: float) -> None:
    """Raise ValueError naming the worst offender if any value is non-finite or out of bound."""
    # max/min propagate NaN, and every comparison with NaN is False, so NaN is refused too.
    high, low = float(values.max()), float(values.min())
    if low >= -bound and high <= bound:
        return
    magnitudes = np.abs(values.astype(np.float64).ravel())
    bad = ~(magnitudes <= bound)
    index = int(np.flatnonzero(bad)[0])
    raise ValueError(
        f"cannot encode: {int(bad.sum())} of {values.size} values are outside the ring bound "
        f"+-{bound} or not finite (first at flat index {index}: {values.ravel()[index]!r}); "
        "clip and weight the update to the bound before encoding, or derive RingParams "
        "with a larger bound"
    )


def decode(total: np.ndarray, params: RingParams, n_summands: int) -> np.ndarray:
    """Decode a ring sum of n_summands encodings into float64 values.

    Refuses (ValueError) n_summands outside 1..max_participants, because beyond it the sum
    may have wrapped. Also refuses a total with a coordinate larger than n_summands can
    produce: it is not a sum of n_summands valid encodings (a missing share, a wrong count,
    corruption). That check catches many such totals but cannot catch all, so it is a
    consistency check, not an integrity guarantee.
    """
    if not isinstance(n_summands, int) or not 1 <= n_summands <= params.max_participants:
        raise ValueError(
            f"cannot decode a sum of {n_summands!r} summands: the ring parameters allow "
            f"1..{params.max_participants} without wrapping; derive RingParams with a "
            "larger max_participants for bigger rounds"
        )
    ring = np.asarray(total)
    if ring.dtype != params.dtype:
        raise ValueError(
            f"ring sum has dtype {ring.dtype}, but these parameters use {params.dtype}; "
            "decode with the RingParams the vectors were encoded with"
        )
    signed = ring.view(np.int32 if params.bits == 32 else np.int64)
    limit = n_summands * params.max_abs_encoded
    if signed.size and (int(signed.max()) > limit or int(signed.min()) < -limit):
        raise ValueError(
            f"ring sum holds a value beyond {limit}, the most {n_summands} encodings can "
            "add up to: it is not a complete sum of that many shares (a share missing, a "
            "wrong summand count, or corrupted data); recompute it from the shares"
        )
    return signed.astype(np.float64) / 2.0**params.frac_bits
