"""The update vector: clipping, weighting, statistics, ring encoding, and the aggregator's view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.strategies import aggregate_from_vector
from node.errors import NodeError
from node.privacy.ledger import PrivacyLedger
from node.training.federated import SiteTraining, train_for_round
from node.training.trainer import DPSettings
from node.training.update import build_update, encode_update
from tessera.crypto.encoding import decode, derive_ring_params
from tessera.crypto.sharing import add_into
from tessera.crypto.update_layout import required_bound, split_update_vector, vector_length
from tessera.models import TesseraNet
from tessera.models.transfer import apply_transfer_mode, trainable_parameters
from tessera.models.weights import model_hash, state_arrays
from tessera.wire.messages import RoundOpen
from tests.support.models import ingested_site, small_model


def _params(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {"head.bias": (rng.standard_normal(2) * scale).astype(np.float32),
            "head.weight": (rng.standard_normal((2, 8)) * scale).astype(np.float32)}  # fmt: skip


def _moved(base: dict[str, np.ndarray], step: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: (v + step * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()
    }


def test_long_delta_is_clipped_short_one_is_not_scaled_up() -> None:
    base = _params(np.random.default_rng(0))
    long = build_update(base, _moved(base, 5.0, 1), 200, 0.7, clip_norm=1.0, weight_cap=100)
    assert long.clipped and long.norm_before_clip > 1.0
    parts = split_update_vector(long.values)
    assert parts.weight == 1.0  # 200 samples, capped at 100
    assert np.linalg.norm(parts.weighted_delta) == pytest.approx(1.0, rel=1e-6)
    assert np.linalg.norm(parts.weighted_delta) <= 1.0
    assert parts.weighted_sq_norm == pytest.approx(1.0, rel=1e-6)
    short = build_update(base, _moved(base, 1e-3, 1), 25, 0.7, clip_norm=1.0, weight_cap=100)
    assert not short.clipped
    parts = split_update_vector(short.values)
    assert parts.weight == 0.25 and parts.weighted_loss == pytest.approx(0.25 * 0.7)
    raw = np.concatenate([(_moved(base, 1e-3, 1)[k] - base[k]).ravel() for k in sorted(base)])
    np.testing.assert_allclose(parts.weighted_delta, 0.25 * raw, rtol=1e-5, atol=1e-9)


def test_encoded_updates_sum_to_what_the_aggregator_reads() -> None:
    base = _params(np.random.default_rng(0))
    clip, cap = 2.0, 50
    ring = derive_ring_params(required_bound(clip), max_participants=10)
    updates = [build_update(base, _moved(base, 0.5 * (i + 1), i), samples, loss, clip, cap)
               for i, (samples, loss) in enumerate([(10, 0.5), (80, 1.5), (30, 40.0)])]  # fmt: skip
    total = np.zeros(updates[0].values.size, dtype=ring.dtype)
    for update in updates:
        add_into(total, encode_update(update, ring))
    decoded = decode(total, ring, n_summands=3)
    exact = sum(u.values for u in updates)
    assert np.max(np.abs(decoded - exact)) <= 3 * 2.0 ** -(ring.frac_bits + 1) + 1e-12
    aggregate = aggregate_from_vector(decoded, 3)  # the aggregator's reading of the layout
    parts = split_update_vector(decoded)
    assert aggregate.sum_weight == pytest.approx(parts.weight)
    assert parts.weight == pytest.approx(0.2 + 1.0 + 0.6, abs=1e-4)  # fixed-point rounding
    # The third site's loss 40 is clipped to the cap 10 before weighting.
    assert aggregate.sum_weighted_loss == pytest.approx(
        0.2 * 0.5 + 1.0 * 1.5 + 0.6 * 10.0, abs=1e-4
    )
    assert aggregate.sum_sq_norm == pytest.approx(parts.weighted_sq_norm)
    np.testing.assert_allclose(aggregate.sum_weighted_delta, parts.weighted_delta)


def test_a_ring_too_small_for_the_layout_is_refused_with_the_fix() -> None:
    base = _params(np.random.default_rng(0))
    update = build_update(base, _moved(base, 3.0, 2), 10, 0.5, clip_norm=3.0, weight_cap=10)
    small = derive_ring_params(3.0, max_participants=4)  # forgot clip**2 = 9 and the loss cap
    with pytest.raises(NodeError, match="required_bound"):
        encode_update(update, small)


def test_bad_inputs_are_refused() -> None:
    base = _params(np.random.default_rng(0))
    with pytest.raises(NodeError, match="names"):
        build_update(base, {"head.bias": base["head.bias"]}, 10, 0.1, 1.0, 10)
    diverged = {k: np.full_like(v, np.nan) for k, v in base.items()}
    with pytest.raises(NodeError, match="diverged"):
        build_update(base, diverged, 10, 0.1, 1.0, 10)
    with pytest.raises(ValueError):
        build_update(base, base, 0, 0.1, 1.0, 10)


def _announcement(model: TesseraNet, algorithm: str = "fedavg", **changes: object) -> RoundOpen:
    n = sum(v.size for v in trainable_parameters(model).values())
    fields: dict[str, object] = dict(
        federation_id="fed-1", study_id="study-1", round=3,
        base_model_hash=model_hash(state_arrays(model)), model_version=2,
        deadline_ms=2**40, algorithm=algorithm, local_epochs=1, local_steps=0,
        learning_rate=0.05, prox_mu=0.0, clip_norm=1.0,
        ring=derive_ring_params(required_bound(1.0), max_participants=16),
        min_participants=2, vector_length=vector_length(n), aggregator_ids=("agg-a", "agg-b"),
        expected_nodes=("site-1", "site-2"), leader_id="agg-a",
    )  # fmt: skip
    fields.update(changes)
    return RoundOpen(**fields)  # type: ignore[arg-type]


def test_train_for_round_on_real_dicom_gives_the_encoded_update(tmp_path: Path) -> None:
    site = ingested_site(tmp_path, images_per_site=16)
    model, _ = small_model()
    apply_transfer_mode(model, "head")  # only the head's 130 values travel
    announcement = _announcement(model, weight_cap=100)  # the round's cap, not the site's
    ledger = PrivacyLedger(tmp_path / "ledger.json", "study-1", 50.0, 1e-5)
    settings = SiteTraining(batch_size=4, dp=DPSettings(1.0, 1.0))
    out = train_for_round(announcement, model, site.images, site.labels, settings, ledger)
    assert out.encoded.size == announcement.vector_length == 64 * 2 + 2 + 3
    assert out.encoded.dtype == announcement.ring.dtype
    decoded = decode(out.encoded, announcement.ring, n_summands=1)
    assert np.max(np.abs(decoded - out.update.values)) <= 2.0 ** -(announcement.ring.frac_bits + 1)
    parts = split_update_vector(decoded)
    assert parts.weight == pytest.approx(out.result.train_samples / 100, abs=1e-4)
    assert np.linalg.norm(parts.weighted_delta) <= parts.weight * 1.0 + 1e-4
    assert [r["round"] for r in ledger.rounds] == [3]  # charged under the round's number
    # The model has moved, so the same announcement no longer names it.
    with pytest.raises(NodeError, match="not the round's base model"):
        train_for_round(announcement, model, site.images, site.labels, settings, ledger)


def test_train_for_round_refuses_a_layout_mismatch() -> None:
    model, _ = small_model()
    x = np.random.default_rng(0).standard_normal((10, 1, 16, 16)).astype(np.float32)
    y = np.array([0, 1] * 5)
    full = _announcement(model)  # announced for full training
    apply_transfer_mode(model, "head")
    with pytest.raises(NodeError, match="transfer mode or architecture"):
        train_for_round(full, model, x, y, SiteTraining(batch_size=4), None)
    sgd = _announcement(model, "fedsgd")
    out = train_for_round(sgd, model, x, y, SiteTraining(batch_size=4), None)
    assert out.result.steps == 1 and out.result.dp_charge is None
