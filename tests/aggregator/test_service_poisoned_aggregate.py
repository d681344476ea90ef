"""Issue 18, attack 4: one hospital sets the global model to anything.

A hostile node builds its own update vector instead of `pack_update`'s, and shares, seals and
signs it with the node's real code (`node.round.participation.seal_shares`: split, HPKE seal,
signed envelope). Two honest nodes take part as usual; two real AggregatorService objects
(real keys, real crypto) run the round in process (tests/aggregator/test_service.py).

- Negative weight: w = -1 + 2**-16 and every weighted delta coordinate at the ring bound.
  Every coordinate lies within the per-node bound, so `encode` itself accepts it, and the sum
  of weights (2**-16) is positive: decode used to accept the aggregate and the leader
  released a model moved by a mean delta of norm ~4e6 with the clip at 1.
- Ring-wrapping coordinates: raw ring elements near 2**(b-1), so that the sum leaves the range
  decode accepts. Decode raised inside the combine step, the service logged the message as
  rejected and the round stalled until the agreement timeout, with no reason given.

Both must abort at once, at both aggregators, with a reason naming the check and the figure
(what each aggregator's audit log records as `round-aborted`), and publish no release."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from aggregator.rounds import Stage
from node.round.participation import seal_shares
from tessera.crypto.encoding import encode
from tessera.crypto.update_layout import pack_update, sample_weight
from tessera.wire.messages import ModelRelease, RoundAbort
from tests.aggregator.test_service import (
    AGGREGATORS,
    LEADER,
    N_PARAMS,
    STUDY,
    Federation,
    Outgoing,
)
from tests.support.shares import node_envelopes, node_update

HONEST = ("site-a", "site-b")
HOSTILE = "site-c"
ROUND_NODES = (*HONEST, HOSTILE)  # k = 3 in the test federation


def hostile_shares(fed: Federation, ring_vector: np.ndarray) -> list[Outgoing]:
    """The hostile node's signed shares of `ring_vector`, made by the node's own code."""
    context: Any = SimpleNamespace(
        site_id=HOSTILE,
        signing_key=fed.node_keys[HOSTILE],
        aggregator_hpke_keys=fed.hpke_public,
    )
    sent = seal_shares(fed.announcement(), ring_vector, cast(Any, context), 0.5)
    return [Outgoing(out.topic, out.payload) for out in sent]


def honest_shares(fed: Federation) -> list[Outgoing]:
    """Two honest nodes, each half the weight cap's samples (w = 0.5), clipped deltas."""
    a = fed.announcement()
    out = []
    for seed, node in enumerate(HONEST):
        delta, _, loss = node_update(seed, N_PARAMS)
        vector = pack_update(delta, sample_weight(a.weight_cap // 2, a.weight_cap), loss)
        envelopes = node_envelopes(a, node, vector, fed.hpke_public, 1.0)
        out += [fed.signed_share(env, node) for env in envelopes.values()]
    return out


def negative_weight(fed: Federation) -> np.ndarray:
    a = fed.announcement()
    vector = np.zeros(a.vector_length)
    vector[:N_PARAMS] = a.ring.bound  # w * d_j at the per-node bound
    vector[N_PARAMS] = -1.0 + 2.0**-16  # honest weights sum to 1: the total is 2**-16
    return encode(vector, a.ring)  # in bound coordinate by coordinate: encode accepts it


def ring_wrapping(fed: Federation) -> np.ndarray:
    a = fed.announcement()
    return np.full(a.vector_length, 2 ** (a.ring.bits - 1) - 1, dtype=a.ring.dtype)


def run_attack(fed: Federation, build: Any) -> None:
    """Open a round over the three nodes and deliver every share; all reported, so the round
    goes on to agreement, partial sums and combine without waiting for the deadline."""
    fed.deliver(fed.services[LEADER].open_round(ROUND_NODES))
    fed.deliver(honest_shares(fed))
    fed.deliver(hostile_shares(fed, build(fed)))


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (negative_weight, "sum of weights"),
        (ring_wrapping, "outside the range"),
    ],
)
def test_a_hostile_update_vector_aborts_the_round_at_both_aggregators(
    tmp_path: Path, build: Any, reason: str
) -> None:
    fed = Federation(tmp_path)
    run_attack(fed, build)

    released = [fed.services[agg].registry.latest(STUDY) for agg in AGGREGATORS]
    assert released == [None, None], "a poisoned model was registered"
    assert not fed.published(ModelRelease), "a poisoned model was published"
    for agg in AGGREGATORS:
        service = fed.services[agg]
        assert fed.stage(agg) is Stage.ABORTED  # at once: no waiting for the timeout
        current = service.current
        assert current is not None
        record = service.store.load_round(STUDY, current.state.round)
        assert record is not None and record.state.abort_reason is not None
        # what the daemon writes to the audit log as `round-aborted`
        assert "aggregate refused" in record.state.abort_reason
        assert reason in record.state.abort_reason
        assert "site-" not in record.state.abort_reason  # figures, never who
    aborts = [m for _, m in fed.published(RoundAbort)]
    assert aborts and all(isinstance(m, RoundAbort) for m in aborts)
