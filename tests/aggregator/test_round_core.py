"""One whole round through the aggregator's pure and storage core, with two aggregators and
four nodes, one of which reaches only one aggregator: shares -> ReceivedSets -> leader's
intersection -> honest-aggregator check -> partial sums -> combine -> decode -> strategy ->
identical weights at both aggregators, equal to FedAvg computed in the clear."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.accumulator import ShareAccumulator
from aggregator.agreement import check_partial_sum_request, intersect_received
from aggregator.errors import PartialSumRefused
from aggregator.records import RoundRecord
from aggregator.registry import weights_bytes
from aggregator.rounds import (
    CollectionClosed,
    PartialSumPublished,
    ParticipantsAgreed,
    RoundState,
    ShareAccepted,
    StartCollecting,
    transition,
)
from aggregator.store import Store
from aggregator.strategies import (
    ServerState,
    StrategyConfig,
    aggregate_from_vector,
    apply_update,
    build_strategy,
    dispersion,
)
from tessera.encoding import decode, derive_ring_params, encode
from tessera.messages import ParticipantSet
from tessera.sharing import Share, ShareContext, combine, split

FED, STUDY, ROUND, LENGTH = "fed-1", "study-1", 1, 200
AGGREGATORS = ("agg-1", "agg-2")
NODES = ("site-a", "site-b", "site-c", "site-d")
PARAMS = derive_ring_params(bound=1000.0, max_participants=16, frac_bits=20)


def node_update(seed: int) -> tuple[np.ndarray, float, float]:
    rng = np.random.default_rng(seed)  # test inputs only
    delta = rng.standard_normal(LENGTH) * 0.01
    delta /= max(1.0, float(np.linalg.norm(delta)))  # clipped to norm 1
    return delta, float(rng.integers(20, 200)), float(rng.uniform(0.2, 1.0))


def update_vector(delta: np.ndarray, weight: float, loss: float) -> np.ndarray:
    return np.concatenate([weight * delta, [weight, weight * loss, weight * float(delta @ delta)]])


def test_a_round_with_a_partial_dropout_gives_fedavg_over_the_agreed_set(tmp_path: Path) -> None:
    length = LENGTH + 3
    stores, accs, states = {}, {}, {}
    for index, agg in enumerate(AGGREGATORS):
        stores[agg] = Store(tmp_path / agg / "state.sqlite3", tmp_path / agg / "shares")
        states[agg] = transition(RoundState(ROUND), StartCollecting())
        stores[agg].create_round(
            RoundRecord(STUDY, bytes(32), PARAMS.to_bytes(), length, 0, "fedavg", states[agg])
        )
        accs[agg] = ShareAccumulator(
            federation_id=FED,
            study_id=STUDY,
            round_number=ROUND,
            aggregator_index=index,
            params=PARAMS,
            length=length,
            ledger=stores[agg],
        )

    updates = {node: node_update(i) for i, node in enumerate(NODES)}
    for node, (delta, weight, loss) in updates.items():
        ctx = ShareContext(FED, STUDY, ROUND, node)
        shares = split(encode(update_vector(delta, weight, loss), PARAMS), 2, ctx, PARAMS)
        for agg, share in zip(AGGREGATORS, shares, strict=True):
            if node == "site-d" and agg == "agg-2":
                continue  # this node's second share never arrives
            wire = Share.from_bytes(share.to_bytes(), share.aggregator_index, PARAMS, length)
            accs[agg].add(node, wire, envelope_digest=bytes(32))
            states[agg] = transition(states[agg], ShareAccepted(node))
    for agg in AGGREGATORS:
        states[agg] = transition(states[agg], CollectionClosed("deadline"))
        stores[agg].save_state(STUDY, states[agg])

    received = {agg: stores[agg].held_nodes(STUDY, ROUND) for agg in AGGREGATORS}
    agreed = intersect_received(received, AGGREGATORS, NODES, min_participants=3)
    assert agreed == ("site-a", "site-b", "site-c")
    participant_set = ParticipantSet(FED, STUDY, ROUND, "agg-1", agreed)

    partials = []
    for agg in AGGREGATORS:
        members = check_partial_sum_request(
            round_number=ROUND,
            requested=participant_set.node_ids,
            requested_hash=participant_set.digest(),
            held=received[agg],
            expected_nodes=NODES,
            min_participants=3,
            already_published=stores[agg].published_sum(STUDY, ROUND),
        )
        states[agg] = transition(states[agg], ParticipantsAgreed(members))
        stores[agg].decide_partial_sum(STUDY, states[agg], participant_set.digest())
        partials.append(accs[agg].finalize(members))
        states[agg] = transition(states[agg], PartialSumPublished())
        stores[agg].save_state(STUDY, states[agg])

    # A leader asking again, for a set one hospital larger, is refused by both.
    bigger = ParticipantSet(FED, STUDY, ROUND, "agg-1", NODES)
    for agg in AGGREGATORS:
        with pytest.raises(PartialSumRefused, match="different set"):
            check_partial_sum_request(
                round_number=ROUND,
                requested=bigger.node_ids,
                requested_hash=bigger.digest(),
                held=NODES,
                expected_nodes=NODES,
                min_participants=3,
                already_published=stores[agg].published_sum(STUDY, ROUND),
            )

    base = np.linspace(-1, 1, LENGTH, dtype=np.float32)
    results = []
    for index, _agg in enumerate(AGGREGATORS):  # each combines its own with the other's
        received_partials = [
            partials[index],
            np.frombuffer(partials[1 - index].tobytes(), PARAMS.dtype),  # as if off the wire
        ]
        aggregate = aggregate_from_vector(decode(combine(received_partials), PARAMS, 3), n=3)
        update, _ = build_strategy("fedavg", "none")(aggregate, ServerState(), StrategyConfig())
        results.append(weights_bytes({"w": apply_update(base, update)}))
    assert results[0] == results[1]

    weights = np.array([updates[n][1] for n in agreed])
    clear = sum(w * updates[n][0] for w, n in zip(weights, agreed, strict=True)) / weights.sum()
    aggregate = aggregate_from_vector(decode(combine(partials), PARAMS, 3), n=3)
    np.testing.assert_allclose(aggregate.sum_weight, weights.sum())
    np.testing.assert_allclose(
        aggregate.sum_weighted_delta / aggregate.sum_weight, clear, atol=1e-5
    )
    clear_loss = sum(updates[n][1] * updates[n][2] for n in agreed) / weights.sum()
    assert aggregate.mean_loss == pytest.approx(clear_loss, abs=1e-5)
    assert dispersion(aggregate) > 0
    for store in stores.values():
        store.close()
