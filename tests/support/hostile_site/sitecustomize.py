"""A hostile site for tests/e2e/test_e2e_poisoned_aggregate.py (issue 18, attack 4).

Python imports `sitecustomize` at start-up from the path; a `tessera node run` process
started with this folder first on PYTHONPATH and TESSERA_TEST_HOSTILE=1 is the real node in
everything (TLS session, RoundOpen checks, training, ledger, split, HPKE seal, signed
envelopes) except one step: instead of its clipped, weighted update it encodes a vector of
its own, every weighted delta coordinate at the ring's bound with weight 1. Each coordinate
is within the per-node bound, so `encode` accepts it; the sum is far beyond what the clip
norm allows. Without TESSERA_TEST_HOSTILE this module does nothing."""

from __future__ import annotations

import os

if os.environ.get("TESSERA_TEST_HOSTILE") == "1":
    import numpy as np

    import node.training.federated as federated
    from node.training.update import UpdateVector
    from tessera.crypto.encoding import RingParams, encode

    def _hostile(update: UpdateVector, ring: RingParams) -> np.ndarray:
        vector = np.zeros(update.values.size)
        vector[:-3] = ring.bound  # w * d_j at the bound, for every parameter
        vector[-3] = 1.0  # a legitimate weight
        return encode(vector, ring)

    federated.encode_update = _hostile  # type: ignore[assignment]
