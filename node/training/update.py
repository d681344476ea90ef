"""The node's update vector: clipped, weighted trainable delta plus statistics, ring-encoded.

Layout and bound: `tessera.crypto.update_layout` (shared with the aggregators, who split the decoded
sum with `split_update_vector`). This module does the node's side:

1. d = trained - base over the trainable parameters only, flattened in the canonical
   `tessera.crypto.flatten` order (the manifest digest names the layout);
2. d is scaled down to L2 norm <= clip_norm when it is longer (never scaled up);
3. w = min(samples, weight_cap) / weight_cap; the vector is [w*d, w, w*loss, w*|d|^2];
4. `encode_update` checks that the round's ring bound covers `required_bound` before
   encoding, so a round announced with a too-small bound fails here with the fix named,
   rather than as an opaque range error, and a sum can never wrap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from node.errors import NodeError
from tessera.crypto.encoding import RingParams, encode
from tessera.crypto.flatten import FlatManifest, flatten
from tessera.crypto.update_layout import (
    DEFAULT_LOSS_CAP,
    pack_update,
    required_bound,
    sample_weight,
)


@dataclass(frozen=True)
class UpdateVector:
    """A node's update before encoding, with what the audit log and the card may want."""

    values: np.ndarray  # float64, [w*d, w, w*loss, w*|d|^2]
    manifest: FlatManifest  # layout of the delta part
    weight: float
    norm_before_clip: float
    clipped: bool
    clip_norm: float
    loss_cap: float


def trainable_delta(
    base: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, FlatManifest]:
    """trained - base, flattened (float64) in canonical order; the names must match exactly."""
    if set(base) != set(trained):
        extra = sorted(set(base) ^ set(trained))[:3]
        raise NodeError(f"base and trained parameters differ in names (e.g. {extra})")
    base_vector, manifest = flatten(base)
    trained_vector, trained_manifest = flatten(trained)
    if trained_manifest != manifest:
        raise NodeError("base and trained parameters differ in shape or dtype")
    delta = trained_vector.astype(np.float64) - base_vector.astype(np.float64)
    return delta, manifest


def build_update(
    base: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    samples: int,
    validation_loss: float,
    clip_norm: float,
    weight_cap: int,
    loss_cap: float = DEFAULT_LOSS_CAP,
) -> UpdateVector:
    """The update vector of one round (steps 1-3 of the module docstring).

    `base` and `trained` hold the trainable parameters only (`trainable_parameters`).
    """
    required_bound(clip_norm, loss_cap)  # validates both
    delta, manifest = trainable_delta(base, trained)
    if not np.all(np.isfinite(delta)):
        raise NodeError("the trained model has non-finite weights; training diverged")
    norm = float(np.linalg.norm(delta))
    clipped = norm > clip_norm
    if clipped:
        # Scale with a small margin so float rounding can never leave |d| above the bound.
        delta *= clip_norm / norm * (1.0 - 1e-9)
    weight = sample_weight(samples, weight_cap)
    values = pack_update(delta, weight, validation_loss, loss_cap)
    return UpdateVector(values, manifest, weight, norm, clipped, clip_norm, loss_cap)


def encode_update(update: UpdateVector, ring: RingParams) -> np.ndarray:
    """Ring-encode the vector; NodeError when the round's bound is too small for it."""
    needed = required_bound(update.clip_norm, update.loss_cap)
    if ring.bound < needed or not math.isfinite(ring.bound):
        raise NodeError(
            f"the round's encoding bound {ring.bound:g} is below {needed:g}, the largest "
            f"coordinate of an update with clip norm {update.clip_norm:g} and loss cap "
            f"{update.loss_cap:g}; the leader must derive the ring from "
            "tessera.crypto.update_layout.required_bound"
        )
    return encode(update.values, ring)
