"""Validation metrics: loss, accuracy and ROC AUC (rank based; no scikit-learn)."""

from __future__ import annotations

import numpy as np


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (what Mann-Whitney U needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(values.size, dtype=np.float64)
    start = 0
    while start < values.size:
        end = start
        while end + 1 < values.size and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties counting one half.

    Computed from the rank sum of the positives (Mann-Whitney U). NaN when one class is
    absent, where AUC is undefined.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(_ranks(scores)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def macro_auc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Binary AUC of class 1 for two classes; the mean one-vs-rest AUC over present classes
    otherwise (classes absent from `labels` are skipped). NaN if none is defined."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.shape[1] == 2:
        return binary_auc(probabilities[:, 1], labels == 1)
    values = [binary_auc(probabilities[:, k], labels == k) for k in range(probabilities.shape[1])]
    defined = [v for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")
