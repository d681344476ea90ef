"""Issue 19, point 9: a round whose aggregate cannot make a model aborts at once, with the
reason, instead of waiting out the agreement timeout.

Three nodes' updates reach two real AggregatorService objects (real keys, real crypto: the
in-process federation of tests/aggregator/test_service.py). Before, both cases below raised
inside the combine step; the service logged the partial sum as a rejected message and the
round sat in COMBINING until its agreement timeout (4.5 minutes in the issue):

- the nodes' weighted deltas rounded to zero while their squared norms did not (a weight cap
  far above the sites' sizes): the card refused the infinite dispersion;
- the release could not be built for any other reason (here the ONNX export fails).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from aggregator.rounds import Stage
from tessera.wire.messages import ModelRelease, RoundAbort
from tests.aggregator.test_service import AGGREGATORS, LEADER, N_PARAMS, STUDY, Federation
from tests.support.shares import node_envelopes

NODES = ("site-a", "site-b", "site-c")  # k = 3 in the test federation


def rounded_away(weight: float) -> np.ndarray:
    """A node's vector whose weighted delta rounded to zero: only the statistics are left."""
    vector = np.zeros(N_PARAMS + 3)
    vector[N_PARAMS:] = (weight, weight * 0.7, weight * 0.9)  # w, w * loss, w * |d|^2
    return vector


def run_round(fed: Federation, vectors: Mapping[str, np.ndarray]) -> None:
    fed.deliver(fed.services[LEADER].open_round(NODES))
    a = fed.announcement()
    for node, vector in vectors.items():
        envelopes = node_envelopes(a, node, vector, fed.hpke_public, 0.5)
        fed.deliver([fed.signed_share(env, node) for env in envelopes.values()])


def abort_reasons(fed: Federation) -> list[str]:
    """Each aggregator's recorded abort reason (what its audit log's `round-aborted` says)."""
    reasons = []
    for agg in AGGREGATORS:
        service = fed.services[agg]
        assert service.current is not None
        record = service.store.load_round(STUDY, service.current.state.round)
        assert record is not None
        assert fed.stage(agg) is Stage.ABORTED, f"{agg} is still {fed.stage(agg).name}"
        reasons.append(record.state.abort_reason or "")
    return reasons


def test_updates_that_rounded_away_abort_the_round_at_once_naming_the_fix(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path)
    run_round(fed, {node: rounded_away(0.002) for node in NODES})
    for reason in abort_reasons(fed):
        assert reason.startswith("aggregate refused (precision)"), reason
        assert "round.weight_cap" in reason and "round.frac_bits" in reason
    assert fed.published(RoundAbort) and not fed.published(ModelRelease)


def test_a_release_that_cannot_be_built_aborts_the_round_at_once(tmp_path: Path) -> None:
    fed = Federation(tmp_path)

    def broken_export(params: Mapping[str, np.ndarray], version: int) -> bytes:
        raise ValueError("the exporter cannot trace this model")

    for service in fed.services.values():
        service.export_onnx = broken_export
    rng = np.random.default_rng(3)
    vectors = {}
    for node in NODES:
        delta = rng.standard_normal(N_PARAMS)
        delta *= 0.5 / np.linalg.norm(delta)
        vectors[node] = np.array([*delta * 0.5, 0.5, 0.35, 0.5 * 0.25])
    run_round(fed, vectors)
    for reason in abort_reasons(fed):
        assert reason == "release not built: the exporter cannot trace this model", reason
    assert not fed.published(ModelRelease)
