"""The layout of one node's update vector, shared by the node (build) and aggregators (split).

Pure numpy; no torch. One node's vector, of length n + 3 where n is the number of trainable
parameters (canonical `tessera.crypto.flatten` order), is

    [ w * d_1, ..., w * d_n,  w,  w * loss,  w * |d|^2 ]

- d is the node's trainable delta (trained minus base), clipped to L2 norm <= clip_norm;
- w = min(samples, weight_cap) / weight_cap, in (0, 1]: the node's sample count, capped so
  that a site claiming a huge count cannot dominate the mean, and scaled so that every
  coordinate stays within the encoding bound. The aggregate's sum of w is the divisor of
  the weighted mean, so the scale cancels;
- loss is the validation loss, clipped to [0, loss_cap] (a diverged site cannot overflow);
- |d|^2 is the clipped delta's squared norm, <= clip_norm**2.

Hence every coordinate lies in [-B, B] with B = `required_bound(clip_norm, loss_cap)`
= max(clip_norm, clip_norm**2, loss_cap, 1). The leader derives the ring parameters from B,
and `tessera.crypto.encoding.encode` refuses a vector outside it. Summed over nodes, the last three
coordinates give sum w, sum w*loss and sum w*|d|^2, which is exactly what
`aggregator.strategies.Aggregate` expects (weighted mean loss and dispersion).

What the fixed point can represent (`check_representable`): the ring keeps 2**-frac_bits;
rounding moves each coordinate of one node's vector by at most half of that, so its weighted
delta by at most sqrt(n) * 2**-(frac_bits+1) in norm. A delta of the clip norm weighted by w
has norm w * clip_norm; below that rounding it can come out as all zeros (an evenly spread
delta does; the aggregators then see the squared norm but no delta, and refuse the round),
so every party refuses terms under which it could: the weight of the smallest node,
1/weight_cap, must keep two bits (weight_cap <= 2**(frac_bits-2)), a node at the cap must
pass, and each node checks its own weight, min(samples, weight_cap) / weight_cap, before it
trains. A ResNet-18 (11.2M parameters) at the defaults (weight_cap 10,000, 16 bits) needs 255
training samples per site; the fix is a weight_cap near the sites' sizes or more fraction
bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

STATS = ("weight", "weighted_loss", "weighted_sq_norm")
STATS_LENGTH = len(STATS)
# Protocol constants until the study manifest carries them: every node must use the same
# cap, or the weighting of the mean is skewed (the bound is safe with any cap, w <= 1).
DEFAULT_LOSS_CAP = 10.0
DEFAULT_WEIGHT_CAP = 10_000
# The largest loss cap a round may announce (the study's cap, until the manifest carries one):
# the ring bound grows with it, so a larger one would loosen every bound on the aggregate.
MAX_LOSS_CAP = DEFAULT_LOSS_CAP


def required_bound(clip_norm: float, loss_cap: float = DEFAULT_LOSS_CAP) -> float:
    """The largest |coordinate| a vector of this layout can have (see the module docstring)."""
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be finite and positive, got {clip_norm}")
    if not (math.isfinite(loss_cap) and loss_cap > 0):
        raise ValueError(f"loss_cap must be finite and positive, got {loss_cap}")
    return max(clip_norm, clip_norm * clip_norm, loss_cap, 1.0)


# The smallest weight, 1/weight_cap, keeps at least this many bits at the ring's scale.
WEIGHT_PRECISION_BITS = 2


def rounding_norm(n_params: int, frac_bits: int) -> float:
    """sqrt(n_params) * 2**-(frac_bits+1): the most that fixed-point rounding can move one
    node's weighted delta of `n_params` values, in L2 norm."""
    return math.sqrt(n_params) * math.ldexp(1.0, -(frac_bits + 1))


def check_representable(
    *,
    weight_cap: int,
    frac_bits: int,
    clip_norm: float,
    n_params: int,
    samples: int | None = None,
) -> None:
    """Return only if the ring's fixed point can represent the update of a node with
    `samples` training samples (None: a node at the cap, weight 1), as the module docstring
    says; ValueError naming the figures and the fix otherwise."""
    most = 2 ** (frac_bits - WEIGHT_PRECISION_BITS) if frac_bits >= WEIGHT_PRECISION_BITS else 0
    if weight_cap > most:
        bits = math.ceil(math.log2(weight_cap)) + WEIGHT_PRECISION_BITS
        raise ValueError(
            f"weight_cap {weight_cap} is above 2^{frac_bits - WEIGHT_PRECISION_BITS} = {most}: "
            f"the smallest weight a node can have, 1/{weight_cap}, keeps fewer than "
            f"{WEIGHT_PRECISION_BITS} bits at {frac_bits} fraction bits; lower round.weight_cap "
            f"to at most {most} or raise round.frac_bits to at least {bits}"
        )
    weight = 1.0 if samples is None else sample_weight(samples, weight_cap)
    noise = rounding_norm(n_params, frac_bits)
    if weight * clip_norm >= noise:
        return
    plural = "" if samples == 1 else "s"
    who = f"a node with {samples} training sample{plural}" if samples else "a node at the cap"
    bits = math.ceil(math.log2(math.sqrt(n_params) / (weight * clip_norm))) - 1
    fixes = [f"raise round.frac_bits to at least {bits}"]
    if samples is not None and clip_norm >= noise:  # a smaller cap weighs this node more
        cap = math.floor(samples * clip_norm / noise)
        fixes.insert(0, f"lower round.weight_cap to at most {cap} (near the sites' sizes)")
    raise ValueError(
        f"{who} weighs {weight:.3g} (weight_cap {weight_cap}), so its update of clip norm "
        f"{clip_norm:g} has norm {weight * clip_norm:.3g}, below {noise:.3g}, the most that "
        f"rounding {n_params} parameters to {frac_bits} fraction bits changes it by: it could "
        f"round to all zeros; {' or '.join(fixes)}"
    )


def sample_weight(samples: int, weight_cap: int) -> float:
    """w = min(samples, weight_cap) / weight_cap; ValueError for samples < 1 or cap < 1."""
    if weight_cap < 1:
        raise ValueError(f"weight_cap must be >= 1, got {weight_cap}")
    if samples < 1:
        raise ValueError(f"a node with {samples} samples has nothing to contribute")
    return min(samples, weight_cap) / weight_cap


@dataclass(frozen=True)
class UpdateParts:
    """The pieces of an update vector (or of a sum of them)."""

    weighted_delta: np.ndarray  # float64, length n
    weight: float
    weighted_loss: float
    weighted_sq_norm: float


def pack_update(
    clipped_delta: np.ndarray, weight: float, loss: float, loss_cap: float = DEFAULT_LOSS_CAP
) -> np.ndarray:
    """The float64 vector [w*d, w, w*clip(loss), w*|d|^2] for an already clipped delta d."""
    delta = np.asarray(clipped_delta, dtype=np.float64)
    if delta.ndim != 1 or delta.size == 0 or not np.all(np.isfinite(delta)):
        raise ValueError("the delta must be a finite, non-empty 1-D vector")
    if not 0.0 < weight <= 1.0:
        raise ValueError(f"weight must be in (0, 1] (see sample_weight), got {weight}")
    clipped_loss = min(max(float(loss), 0.0), loss_cap) if math.isfinite(loss) else loss_cap
    sq_norm = float(np.dot(delta, delta))
    out = np.empty(delta.size + STATS_LENGTH, dtype=np.float64)
    np.multiply(delta, weight, out=out[: delta.size])
    out[delta.size :] = (weight, weight * clipped_loss, weight * sq_norm)
    return out


def split_update_vector(vector: np.ndarray) -> UpdateParts:
    """Inverse of `pack_update` (also valid for a decoded sum of packed vectors)."""
    values = np.asarray(vector, dtype=np.float64)
    if values.ndim != 1 or values.size <= STATS_LENGTH:
        raise ValueError(
            f"update vector has shape {values.shape}; expected a delta followed by "
            f"{STATS_LENGTH} statistics"
        )
    n = values.size - STATS_LENGTH
    weight, loss, sq_norm = (float(x) for x in values[n:])
    return UpdateParts(values[:n].copy(), weight, loss, sq_norm)


def vector_length(n_params: int) -> int:
    """Length of the update vector for n trainable parameters (RoundOpen.vector_length)."""
    if n_params < 1:
        raise ValueError(f"a model update needs at least one parameter, got {n_params}")
    return n_params + STATS_LENGTH
