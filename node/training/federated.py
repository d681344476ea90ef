"""Step 2 of a round at the node: from a checked RoundOpen to the encoded update vector.

`train_for_round` is called after `node.round.policy.check_round` accepted the announcement. It
checks that the local model *is* the announced base model (hash of its weights) and has the
announced update length, trains with the round's client plan and this site's settings
(DP charged to the ledger first), builds the clipped, weighted update with its statistics,
and encodes it into the round's ring. Sharing, sealing and sending are the caller's.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import numpy as np

from node.errors import NodeError
from node.privacy.ledger import PrivacyLedger
from node.training.trainer import DPSettings, TrainConfig, TrainResult, run_local_round
from node.training.update import UpdateVector, build_update, encode_update
from tessera.crypto.update_layout import vector_length
from tessera.models.nets import TesseraNet
from tessera.models.transfer import trainable_parameters
from tessera.models.weights import model_hash, state_arrays
from tessera.wire.messages import RoundOpen


@dataclass(frozen=True)
class SiteTraining:
    """What the site decides, not the round: batch, device, seed, DP noise."""

    batch_size: int = 32
    device: str = "auto"
    seed: int = 0
    validation_fraction: float = 0.2
    dp: DPSettings | None = None


@dataclass(frozen=True)
class RoundUpdate:
    """The encoded vector to share, and what the audit log and metrics report."""

    encoded: np.ndarray
    update: UpdateVector
    result: TrainResult


def round_train_config(announcement: RoundOpen, site: SiteTraining) -> TrainConfig:
    """The round's client plan combined with the site's settings."""
    # A different, reproducible data order every round: the site seed mixed with the round.
    seed = (site.seed * 1_000_003 + announcement.round) % 2**63
    return TrainConfig(
        algorithm=announcement.algorithm, local_epochs=max(1, announcement.local_epochs),
        local_steps=announcement.local_steps, batch_size=site.batch_size,
        learning_rate=announcement.learning_rate, prox_mu=announcement.prox_mu, seed=seed,
        device=site.device, validation_fraction=site.validation_fraction, dp=site.dp,
    )  # fmt: skip


def train_for_round(
    announcement: RoundOpen,
    model: TesseraNet,
    images: np.ndarray,
    labels: np.ndarray,
    site: SiteTraining,
    ledger: PrivacyLedger | None,
) -> RoundUpdate:
    """Train `model` (in place) for this round and return the encoded update."""
    if not hmac.compare_digest(model_hash(state_arrays(model)), announcement.base_model_hash):
        raise NodeError(
            f"the local model is not the round's base model "
            f"({announcement.base_model_hash.hex()[:16]}...); install the release first"
        )
    base = trainable_parameters(model)
    expected = vector_length(sum(v.size for v in base.values()))
    if announcement.vector_length != expected:
        raise NodeError(
            f"the round expects an update of {announcement.vector_length} values, this model's "
            f"trainable parameters give {expected}; the transfer mode or architecture differs"
        )
    if site.dp is None and ledger is not None:
        raise NodeError("a privacy ledger was given but DP is off; refusing an ambiguous setup")
    result = run_local_round(model, images, labels, round_train_config(announcement, site),
                             ledger, announcement.round)  # fmt: skip
    update = build_update(base, trainable_parameters(model), result.train_samples,
                          result.validation.loss, announcement.clip_norm,
                          announcement.weight_cap, announcement.loss_cap)  # fmt: skip
    return RoundUpdate(encode_update(update, announcement.ring), update, result)
