"""The decoded aggregate's checks, before anything is applied (issue 18, attack 4).

A share can hold any ring value, so one hostile node can put anything into the sum: a
negative weight that brings the sum of weights near zero (the mean delta then explodes), a
delta far beyond the clip norm, statistics that steer the adaptive policy. `check_aggregate`
reads the decoded sum of n nodes' vectors (layout: tessera.crypto.update_layout,
[sum w*d, sum w, sum w*loss, sum w*|d|^2]) and raises AggregateRefused unless every part
lies within what n honest nodes can produce under the round's terms:

    n / weight_cap <= W <= n                       weight: each w_i in [1/weight_cap, 1]
    |S_j| <= clip * W  and  ||S|| <= clip * W      delta: each |d_i| <= clip (triangle ineq.)
    0 <= L <= loss_cap * W                         loss: each loss_i in [0, loss_cap]
    ||S||^2 / W <= Q <= clip^2 * W                 squared norm: |d_i|^2 <= clip^2 above,
                                                   Cauchy-Schwarz below (sum w_i d_i)^2 <=
                                                   (sum w_i)(sum w_i |d_i|^2)

with W = sum w, S = sum w*d (length P), L = sum w*loss, Q = sum w*|d|^2. This bounds the
damage (the released mean delta S / W has norm <= clip, its loss and dispersion are
figures n honest nodes could give) and makes it visible; it cannot say which node did it
(proving each node's bound on its own share is a later issue).

One more refusal is about precision, not honesty: S all zeros while Q is not means the
nodes' updates rounded away (a weight cap far above the sites' sizes, too few fraction bits:
issue 19, point 9) or, honestly but improbably, cancelled exactly; either way the mean of
nothing is no model (its dispersion is infinite, which no card records), and the reason
names the fix for the first.

Tolerance (fixed-point rounding, derived from the ring's scale and n)
---------------------------------------------------------------------
Each node's coordinate is encoded as round(x * 2**f), within 2**-(f+1) of x; ring sums add
exactly (tessera.crypto.encoding), so each decoded coordinate lies within

    delta = n * 2**-(f+1)

of the exact real sum. Hence W, L, Q, S_j each within delta, and ||S|| within
delta * sqrt(P) (the error vector's norm). Every bound above is widened by exactly that:
a true value t <= b * W_true becomes decoded <= b * (W + delta) + delta (+ delta * sqrt(P)
for ||S||), and lower bounds move down alike. On top, a relative slack FLOAT_SLACK = 2**-36
covers float64 rounding: the node's products w*d_j, w*loss, w*|d|^2 and its norm (each a few
ulps, 2**-52), int64 -> float64 in decode for 64-bit rings (half an ulp), and this check's
own sum of squares (numpy's pairwise sum: relative error below log2(P) * 2**-53, under
2**-47 for any P below 2**40). Honest aggregates always pass (tests/aggregator/
test_aggregate_check.py, Hypothesis). What it allows a hostile node beyond the exact bound
is the encoding's own worst-case rounding: ||S|| up to delta * sqrt(P) over clip * W, that is
a mean delta off by at most delta * sqrt(P) / W, the same error an honest round may carry
(about 0.025 / W for 10 nodes at f = 16 and 11M parameters); more fraction bits shrink it.

Cost: three reductions over the delta part (max, min, dot), no copy: at 11M parameters about
half the decode before it (60 to 125 ms against 110 to 250 ms on the shared 2-core machine
under load), once per round; bench/round.py's secure comm+agg takes about 14 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aggregator.errors import AggregateRefused
from tessera.crypto.update_layout import STATS_LENGTH
from tessera.wire.messages import RoundOpen

FLOAT_SLACK = 2.0**-36  # relative; see the module docstring


@dataclass(frozen=True)
class AggregateTerms:
    """What the round promised about each node's vector (from its RoundOpen)."""

    clip_norm: float
    weight_cap: int
    loss_cap: float
    frac_bits: int

    @classmethod
    def of(cls, announcement: RoundOpen) -> AggregateTerms:
        return cls(
            announcement.clip_norm,
            announcement.weight_cap,
            announcement.loss_cap,
            announcement.ring.frac_bits,
        )


def rounding_tolerance(n: int, frac_bits: int) -> float:
    """delta = n * 2**-(frac_bits+1): how far one decoded coordinate of a sum of n honest
    encodings may lie from the exact real sum."""
    return math.ldexp(n, -(frac_bits + 1))


def check_aggregate(decoded: np.ndarray, n: int, terms: AggregateTerms) -> None:
    """Raise AggregateRefused (its reason names the part, the figure and the bound) unless
    the decoded sum of `n` update vectors fits the round's terms (module docstring)."""
    values = np.asarray(decoded)
    if values.dtype != np.float64 or values.ndim != 1 or values.size <= STATS_LENGTH:
        raise AggregateRefused(
            "layout",
            float(values.size),
            f"the aggregate is {values.dtype}{list(values.shape)}, not a float64 delta "
            f"followed by {STATS_LENGTH} statistics",
        )
    if n < 1:
        raise AggregateRefused("nodes", float(n), f"an aggregate of {n} nodes")
    size = values.size - STATS_LENGTH
    delta_sum = values[:size]
    weight, loss, sq_norm = (float(x) for x in values[size:])
    tol = rounding_tolerance(n, terms.frac_bits)
    up, down = 1.0 + FLOAT_SLACK, 1.0 - FLOAT_SLACK

    low_w, high_w = n / terms.weight_cap * down - tol, n * up + tol
    if not (weight > 0 and low_w <= weight <= high_w):
        raise AggregateRefused(
            "weight",
            weight,
            f"the sum of weights is {weight:.6g}, outside [{max(low_w, 0.0):.6g}, "
            f"{high_w:.6g}] ({n} nodes, each weight in [1/{terms.weight_cap}, 1])",
        )
    w_high = (weight + tol) * up  # the largest true sum of weights this decodes from

    coord_limit = terms.clip_norm * w_high + tol
    largest = max(float(delta_sum.max()), -float(delta_sum.min()))  # NaN propagates
    if not largest <= coord_limit:
        raise AggregateRefused(
            "delta",
            largest,
            f"a weighted delta coordinate is {largest:.6g}, beyond clip * sum of weights "
            f"= {coord_limit:.6g} (clip {terms.clip_norm:g})",
        )
    norm_tol = tol * math.sqrt(size)
    norm = math.sqrt(float(np.dot(delta_sum, delta_sum)))
    norm_limit = terms.clip_norm * w_high + norm_tol
    if not norm <= norm_limit:
        raise AggregateRefused(
            "delta",
            norm,
            f"the weighted delta has norm {norm:.6g}, beyond clip * sum of weights "
            f"= {norm_limit:.6g} (clip {terms.clip_norm:g}): its mean would be "
            f"{norm / weight:.6g}",
        )

    loss_limit = terms.loss_cap * w_high + tol
    if not -tol <= loss <= loss_limit:
        raise AggregateRefused(
            "loss",
            loss,
            f"the weighted loss is {loss:.6g}, outside [0, {loss_limit:.6g}] "
            f"(loss cap {terms.loss_cap:g} * sum of weights)",
        )

    sq_limit = terms.clip_norm**2 * w_high + tol
    if not -tol <= sq_norm <= sq_limit:
        raise AggregateRefused(
            "squared-norm",
            sq_norm,
            f"the weighted squared norm is {sq_norm:.6g}, outside [0, {sq_limit:.6g}] "
            f"(clip^2 * sum of weights)",
        )
    if largest == 0.0 and sq_norm > 0.0:  # else the dispersion is infinite: no card
        raise AggregateRefused(
            "precision",
            sq_norm,
            f"the weighted delta is zero in every coordinate at {terms.frac_bits} fraction "
            f"bits while the weighted squared norm is {sq_norm:.6g}: the updates rounded away "
            "below the ring's resolution (or cancelled exactly), so there is no model to "
            f"release; lower round.weight_cap ({terms.weight_cap}) towards the sites' "
            "training-set sizes, or raise round.frac_bits",
        )
    # Cauchy-Schwarz: ||sum w d||^2 <= (sum w)(sum w |d|^2), each side at its honest extreme.
    floor = max(0.0, norm * down - norm_tol) ** 2 / w_high
    if not sq_norm * up + tol >= floor:
        raise AggregateRefused(
            "squared-norm",
            sq_norm,
            f"the weighted squared norm is {sq_norm:.6g}, below {floor:.6g} = "
            "||sum of w*d||^2 / sum of w, the least any set of nodes can give (Cauchy-Schwarz)",
        )
