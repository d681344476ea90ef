"""Statistics of a membership-inference attack: ROC figures, bootstrap intervals, and the
empirical epsilon lower bound. Pure numpy, no torch.

Convention: a score is higher for "member". A test at threshold t says "member" when the
score is strictly above t. `members` are the scores of examples that were trained on,
`non_members` the scores of held-out examples.

- `auc`: the Mann-Whitney probability that a member outscores a non-member (ties count 1/2).
- `tpr_at_fpr(.., target)`: the largest true-positive rate of any threshold whose empirical
  false-positive rate is at most `target`. With fewer than 1/target non-members no false
  positive is allowed at all, so the figure is the TPR at zero false positives.
- `balanced_accuracy`: the best (TPR + TNR) / 2 over thresholds (the attack's advantage, as
  reported in the literature; optimistic by construction, being chosen on the same data).
- `bootstrap_interval`: percentile interval, members and non-members resampled separately.
- `empirical_epsilon`: see its docstring; it is a one-sided lower confidence bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]
_MAX_THRESHOLDS = 256  # thresholds tried when choosing the epsilon test


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided bootstrap confidence interval."""

    value: float
    low: float
    high: float


def _check(members: np.ndarray, non_members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inside = np.asarray(members, dtype=np.float64).ravel()
    outside = np.asarray(non_members, dtype=np.float64).ravel()
    if len(inside) == 0 or len(outside) == 0:
        raise ValueError("an attack needs at least one member and one non-member score")
    if not (np.all(np.isfinite(inside)) and np.all(np.isfinite(outside))):
        raise ValueError("attack scores must be finite; check the model's outputs")
    return inside, outside


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(member score > non-member score) + P(equal) / 2, by average ranks."""
    inside, outside = _check(members, non_members)
    both = np.concatenate([inside, outside])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    # Average rank (1-based) of each distinct value, given the ties.
    upper = np.cumsum(counts)
    average = upper - (counts - 1) / 2.0
    rank_sum = float(np.sum(average[inverse[: len(inside)]]))
    n_in, n_out = len(inside), len(outside)
    return (rank_sum - n_in * (n_in + 1) / 2.0) / (n_in * n_out)


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, target: float) -> float:
    """The best TPR of a threshold with empirical FPR <= `target` (see the module doc)."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target FPR must be in [0, 1), got {target}")
    inside, outside = _check(members, non_members)
    allowed = math.floor(target * len(outside) + 1e-9)  # false positives allowed
    # Threshold at the (allowed+1)-th largest non-member score: only scores above it count.
    threshold = np.sort(outside)[::-1][allowed]
    return float(np.mean(inside > threshold))


def balanced_accuracy(members: np.ndarray, non_members: np.ndarray) -> float:
    """max over thresholds of (TPR + TNR) / 2, thresholds between every distinct score."""
    inside, outside = _check(members, non_members)
    thresholds = np.concatenate([[-np.inf], np.unique(np.concatenate([inside, outside]))])
    tpr = 1.0 - np.searchsorted(np.sort(inside), thresholds, side="right") / len(inside)
    fpr = 1.0 - np.searchsorted(np.sort(outside), thresholds, side="right") / len(outside)
    return float(np.max((1.0 + tpr - fpr) / 2.0))


def bootstrap_interval(
    metric: Metric,
    members: np.ndarray,
    non_members: np.ndarray,
    rng: np.random.Generator,
    resamples: int = 200,
    confidence: float = 0.95,
) -> Interval:
    """`metric` on the data, with a percentile bootstrap interval (stratified resampling)."""
    inside, outside = _check(members, non_members)
    if resamples < 10 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need resamples >= 10 and confidence in (0, 1), got {resamples}, "
                         f"{confidence}")  # fmt: skip
    values = np.empty(resamples)
    for i in range(resamples):
        a = inside[rng.integers(0, len(inside), len(inside))]
        b = outside[rng.integers(0, len(outside), len(outside))]
        values[i] = metric(a, b)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Interval(metric(inside, outside), float(low), float(high))


def _log_binomial_pmf(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, log C(n, i)) for i = 0..n, by a running sum of log((n - j + 1) / j)."""
    i = np.arange(n + 1, dtype=np.float64)
    return i, np.concatenate([[0.0], np.cumsum(np.log((n - i[1:] + 1) / i[1:]))])


def _binomial_cdf(k: np.ndarray, n: int, p: np.ndarray) -> np.ndarray:
    """P(X <= k) for X ~ Binomial(n, p), elementwise over k and p, in log space."""
    i, log_comb = _log_binomial_pmf(n)
    p = np.clip(p, 1e-300, 1.0 - 1e-16)[:, None]
    terms = log_comb + i * np.log(p) + (n - i) * np.log1p(-p)
    terms = np.where(i <= k[:, None], terms, -np.inf)
    top = np.max(terms, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)  # k < 0: every term is -inf, the sum is 0
    cdf: np.ndarray = np.minimum(1.0, np.exp(top[:, 0]) * np.sum(np.exp(terms - top), axis=1))
    return cdf


def _bisect(decreasing: Callable[[np.ndarray], np.ndarray], goal: float, size: int) -> np.ndarray:
    """The p in [0, 1] where `decreasing(p)` crosses `goal`, elementwise (60 halvings)."""
    low, high = np.zeros(size), np.ones(size)
    for _ in range(60):
        mid = (low + high) / 2.0
        above = decreasing(mid) > goal
        low, high = np.where(above, mid, low), np.where(above, high, mid)
    return (low + high) / 2.0


def _counts(successes: object, trials: int) -> np.ndarray:
    k = np.atleast_1d(np.asarray(successes, dtype=np.int64))
    if trials < 1 or np.any(k < 0) or np.any(k > trials):
        raise ValueError(f"need 0 <= successes <= trials >= 1, got {successes}/{trials}")
    return k


def clopper_pearson_lower_many(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided exact lower bounds, elementwise: P(true rate < bound) <= alpha."""
    k = _counts(successes, trials)
    # The p at which P(X >= k) = alpha, i.e. P(X <= k - 1) = 1 - alpha (falls as p grows).
    bound = _bisect(lambda p: _binomial_cdf(k - 1, trials, p), 1.0 - alpha, len(k))
    return np.where(k == 0, 0.0, bound)


def clopper_pearson_upper_many(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided exact upper bounds, elementwise: P(true rate > bound) <= alpha."""
    k = _counts(successes, trials)
    bound = _bisect(lambda p: _binomial_cdf(k, trials, p), alpha, len(k))
    return np.where(k == trials, 1.0, bound)


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided exact lower bound: P(true rate < bound) <= alpha."""
    return float(clopper_pearson_lower_many(np.array([successes]), trials, alpha)[0])


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided exact upper bound: P(true rate > bound) <= alpha."""
    return float(clopper_pearson_upper_many(np.array([successes]), trials, alpha)[0])


def epsilon_from_counts(
    true_pos: np.ndarray,
    members: int,
    false_pos: np.ndarray,
    non_members: int,
    delta: float,
    alpha: float,
) -> np.ndarray:
    """ln((TPR_low - delta) / FPR_high) with one-sided Clopper-Pearson bounds at `alpha`
    each, elementwise over the counts; 0 where the lower TPR does not exceed delta."""
    tpr_low = clopper_pearson_lower_many(true_pos, members, alpha)
    fpr_high = clopper_pearson_upper_many(false_pos, non_members, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.log(np.maximum(tpr_low - delta, 0.0) / fpr_high)
    epsilons: np.ndarray = np.maximum(np.nan_to_num(bound, nan=0.0, neginf=0.0), 0.0)
    return epsilons


def empirical_epsilon(
    members: np.ndarray,
    non_members: np.ndarray,
    delta: float,
    rng: np.random.Generator,
    confidence: float = 0.95,
) -> float:
    """A lower bound on epsilon that holds with probability >= `confidence`.

    A DP mechanism bounds every test by TPR <= e^eps * FPR + delta, so
    eps >= ln((TPR - delta) / FPR). To make that a real lower bound rather than a lucky
    estimate: (1) each side is split in half at random; the threshold is chosen on the first
    halves only (the one maximising the same bound there); (2) on the second halves, TPR
    takes its one-sided Clopper-Pearson lower bound and FPR its upper bound, each at
    (1 - confidence) / 2, so both hold together with probability >= `confidence`.
    Assumes membership was assigned at random (the site's train/test split is).
    """
    inside, outside = _check(members, non_members)
    if len(inside) < 4 or len(outside) < 4:
        return 0.0
    alpha = (1.0 - confidence) / 2.0
    inside, outside = rng.permutation(inside), rng.permutation(outside)
    pick_in, test_in = inside[: len(inside) // 2], inside[len(inside) // 2 :]
    pick_out, test_out = outside[: len(outside) // 2], outside[len(outside) // 2 :]
    candidates = np.unique(np.concatenate([pick_in, pick_out]))
    if len(candidates) > _MAX_THRESHOLDS:  # bound the search; quantiles keep its shape
        candidates = np.unique(np.quantile(candidates, np.linspace(0, 1, _MAX_THRESHOLDS)))
    tp = len(pick_in) - np.searchsorted(np.sort(pick_in), candidates, side="right")
    fp = len(pick_out) - np.searchsorted(np.sort(pick_out), candidates, side="right")
    chosen = epsilon_from_counts(tp, len(pick_in), fp, len(pick_out), delta, alpha)
    threshold = candidates[int(np.argmax(chosen))]
    true_pos = np.array([np.sum(test_in > threshold)])
    false_pos = np.array([np.sum(test_out > threshold)])
    bound = epsilon_from_counts(true_pos, len(test_in), false_pos, len(test_out), delta, alpha)
    return float(bound[0])
