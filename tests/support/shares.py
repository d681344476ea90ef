"""Simulated nodes for aggregator tests: a clipped update and its real sealed shares."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from tessera.crypto.encoding import encode
from tessera.crypto.sealing import seal
from tessera.crypto.sharing import ShareContext, split
from tessera.crypto.update_layout import sample_weight
from tessera.wire.envelopes import share_binding
from tessera.wire.messages import RoundOpen, ShareEnvelope
from tessera.wire.statement import NodeStatement, seal_statement


def node_update(seed: int, length: int) -> tuple[np.ndarray, float, float]:
    """A node's clipped delta (norm <= 1), its sample weight and validation loss."""
    rng = np.random.default_rng(seed)  # test inputs only, never masks
    delta = rng.standard_normal(length) * 0.01
    delta /= max(1.0, float(np.linalg.norm(delta)))
    return delta, sample_weight(int(rng.integers(20, 2000)), 1000), float(rng.uniform(0.2, 1.0))


def node_envelopes(
    announcement: RoundOpen,
    node: str,
    vector: np.ndarray,
    hpke_public: Mapping[str, X25519PublicKey],
    epsilon_total: float | Mapping[str, float] = 0.0,
) -> dict[str, ShareEnvelope]:
    """The node's ShareEnvelope to each aggregator of the round: split, sealed, unsigned;
    each states the node's composed epsilon `epsilon_total` (a hostile node may state a
    different one per aggregator: pass a mapping from aggregator id to epsilon)."""
    a = announcement
    ctx = ShareContext(a.federation_id, a.study_id, a.round, node)
    shares = split(encode(vector, a.ring), len(a.aggregator_ids), ctx, a.ring)
    same = NodeStatement.fresh(0.0 if isinstance(epsilon_total, Mapping) else epsilon_total)
    stated = {
        agg: NodeStatement.fresh(epsilon_total[agg]) if isinstance(epsilon_total, Mapping) else same
        for agg in a.aggregator_ids
    }
    return {
        agg: ShareEnvelope(
            a.federation_id,
            a.study_id,
            a.round,
            a.base_model_hash,
            node,
            agg,
            a.ring,
            a.vector_length,
            seal(share.to_bytes(), hpke_public[agg], share_binding(a, node, agg)),
            seal_statement(stated[agg], a, node, agg, hpke_public[agg]),
        )
        for agg, share in zip(a.aggregator_ids, shares, strict=True)
    }
