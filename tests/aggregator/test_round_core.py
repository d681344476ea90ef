"""One whole round through the aggregator's core, with two aggregators and four nodes, one of
which reaches only one aggregator. Real sharing, HPKE and codec; no broker, no daemon:
sealed shares -> admission -> accumulators -> ReceivedSets -> leader's intersection ->
honest-aggregator check -> sealed partial sums -> combine -> strategy -> identical weights
at both aggregators, equal to FedAvg computed in the clear."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from aggregator.accumulator import ShareAccumulator
from aggregator.admission import aggregator_index, check_share_envelope, open_share
from aggregator.agreement import check_partial_sum_request, intersect_received
from aggregator.errors import PartialSumRefused, PartialSumRejected
from aggregator.partials import (
    combine_round,
    open_partial_sum,
    open_partial_sums,
    seal_partial_sums,
)
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
from tessera.crypto.encoding import derive_ring_params
from tessera.crypto.sealing import generate_hpke_key
from tessera.crypto.update_layout import pack_update, required_bound
from tessera.wire.messages import ParticipantSet, RoundOpen
from tests.support.shares import node_envelopes, node_update

FED, STUDY, ROUND, LENGTH = "fed-1", "study-1", 1, 200
AGGREGATORS = ("agg-1", "agg-2")
NODES = ("site-a", "site-b", "site-c", "site-d")
RING = derive_ring_params(required_bound(1.0), max_participants=16, frac_bits=24)
OPEN = RoundOpen(
    federation_id=FED,
    study_id=STUDY,
    round=ROUND,
    base_model_hash=b"\x07" * 32,
    model_version=1,
    deadline_ms=0,
    algorithm="fedavg",
    local_epochs=1,
    local_steps=0,
    learning_rate=0.01,
    prox_mu=0.0,
    clip_norm=1.0,
    ring=RING,
    min_participants=3,
    vector_length=LENGTH + 3,
    aggregator_ids=AGGREGATORS,
    expected_nodes=NODES,
    leader_id="agg-1",
)
HPKE = {agg: generate_hpke_key() for agg in AGGREGATORS}
PUBLIC = {agg: key.public_key() for agg, key in HPKE.items()}


def update_vector(delta: np.ndarray, weight: float, loss: float) -> np.ndarray:
    return pack_update(delta, weight, loss)  # the node's own layout code


def test_a_round_with_a_partial_dropout_gives_fedavg_over_the_agreed_set(tmp_path: Path) -> None:
    stores, accs, states = {}, {}, {}
    for agg in AGGREGATORS:
        stores[agg] = Store(tmp_path / agg / "state.sqlite3", tmp_path / agg / "shares")
        states[agg] = transition(RoundState(ROUND), StartCollecting())
        stores[agg].create_round(
            RoundRecord(
                STUDY,
                OPEN.base_model_hash,
                RING.to_bytes(),
                OPEN.vector_length,
                0,
                "fedavg",
                states[agg],
            )
        )
        accs[agg] = ShareAccumulator(
            federation_id=FED,
            study_id=STUDY,
            round_number=ROUND,
            aggregator_index=aggregator_index(OPEN, agg),
            params=RING,
            length=OPEN.vector_length,
            ledger=stores[agg],
        )

    updates = {node: node_update(i, LENGTH) for i, node in enumerate(NODES)}
    for node, (delta, weight, loss) in updates.items():
        for agg, envelope in node_envelopes(
            OPEN, node, update_vector(delta, weight, loss), PUBLIC
        ).items():
            if node == "site-d" and agg == "agg-2":
                continue  # this node's second share never arrives
            check_share_envelope(envelope, OPEN, agg, states[agg].stage)
            share = open_share(envelope, OPEN, agg, HPKE[agg])
            accs[agg].add(node, share, envelope_digest=bytes(32))
            states[agg] = transition(states[agg], ShareAccepted(node))
    for agg in AGGREGATORS:
        states[agg] = transition(states[agg], CollectionClosed("deadline"))
        stores[agg].save_state(STUDY, states[agg])

    received = {agg: stores[agg].held_nodes(STUDY, ROUND) for agg in AGGREGATORS}
    agreed = intersect_received(received, AGGREGATORS, NODES, min_participants=3)
    assert agreed == ("site-a", "site-b", "site-c")
    participant_set = ParticipantSet(FED, STUDY, ROUND, "agg-1", agreed)

    outbox = {}
    for agg in AGGREGATORS:
        members = check_partial_sum_request(
            round_number=ROUND,
            requested=participant_set.node_ids,
            requested_hash=participant_set.digest(),
            held=received[agg],
            expected_nodes=NODES,
            min_participants=3,
            already_published=stores[agg].published_on_base(STUDY, OPEN.base_model_hash),
        )
        states[agg] = transition(states[agg], ParticipantsAgreed(members))
        stores[agg].decide_partial_sum(STUDY, states[agg], participant_set.digest())
        own = accs[agg].finalize(members)
        (outbox[agg],) = seal_partial_sums(
            own,
            OPEN,
            agg,
            participant_set.digest(),
            {a: HPKE[a].public_key() for a in AGGREGATORS},
        )
        outbox[agg + "/own"] = own
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
                already_published=stores[agg].published_on_base(STUDY, OPEN.base_model_hash),
            )

    base = np.linspace(-1, 1, LENGTH, dtype=np.float32)
    results, aggregates = [], []
    for agg, other in (("agg-1", "agg-2"), ("agg-2", "agg-1")):
        theirs = open_partial_sum(outbox[other], OPEN, agg, HPKE[agg], participant_set.digest())
        with pytest.raises(PartialSumRejected, match="another participant set"):
            open_partial_sum(outbox[other], OPEN, agg, HPKE[agg], bigger.digest())
        decoded = combine_round({agg: outbox[agg + "/own"], other: theirs}, OPEN, 3)
        aggregate = aggregate_from_vector(decoded, n=3)
        update, _ = build_strategy("fedavg", "none")(aggregate, ServerState(), StrategyConfig())
        results.append(weights_bytes({"w": apply_update(base, update)}))
        aggregates.append(aggregate)
    assert results[0] == results[1]

    aggregate = aggregates[0]
    weights = np.array([updates[n][1] for n in agreed])
    clear = sum(w * updates[n][0] for w, n in zip(weights, agreed, strict=True)) / weights.sum()
    np.testing.assert_allclose(aggregate.sum_weight, weights.sum())
    mean = aggregate.sum_weighted_delta / aggregate.sum_weight
    np.testing.assert_allclose(mean, clear, atol=1e-5)
    clear_loss = sum(updates[n][1] * updates[n][2] for n in agreed) / weights.sum()
    assert aggregate.mean_loss == pytest.approx(clear_loss, abs=1e-5)
    assert dispersion(aggregate) > 0
    for store in stores.values():
        store.close()


def test_partial_sums_for_the_wrong_round_or_peer_are_rejected() -> None:
    (message,) = seal_partial_sums(
        np.zeros(OPEN.vector_length, RING.dtype),
        OPEN,
        "agg-1",
        b"h" * 32,
        {"agg-2": HPKE["agg-2"].public_key()},
    )
    with pytest.raises(PartialSumRejected, match="round 2"):
        open_partial_sum(
            dataclasses.replace(message, round=2), OPEN, "agg-2", HPKE["agg-2"], b"h" * 32
        )
    with pytest.raises(PartialSumRejected, match="not one this aggregator"):
        open_partial_sum(message, OPEN, "agg-1", HPKE["agg-1"], b"h" * 32)
    with pytest.raises(PartialSumRejected, match="no partial sum yet from agg-2"):
        combine_round({"agg-1": np.zeros(OPEN.vector_length, RING.dtype)}, OPEN, 3)
    with pytest.raises(PartialSumRejected, match=r"\[5\]"):
        seal_partial_sums(np.zeros(5, RING.dtype), OPEN, "agg-1", b"h" * 32, {})


def test_a_partial_sum_that_does_not_open_names_its_sender_for_the_abort() -> None:
    own = np.arange(OPEN.vector_length, dtype=RING.dtype)
    to_agg2 = {"agg-2": HPKE["agg-2"].public_key()}
    (message,) = seal_partial_sums(own, OPEN, "agg-1", b"h" * 32, to_agg2)
    opened = open_partial_sums(own, {"agg-1": message}, OPEN, "agg-2", HPKE["agg-2"], b"h" * 32)
    assert set(opened) == {"agg-1", "agg-2"}
    np.testing.assert_array_equal(opened["agg-1"], own)
    refused = "partial sum from agg-1 refused: PartialSumRejected"
    with pytest.raises(PartialSumRejected, match=refused):  # over another participant set
        open_partial_sums(own, {"agg-1": message}, OPEN, "agg-2", HPKE["agg-2"], b"x" * 32)
    forged = dataclasses.replace(message, sealed=bytes(len(message.sealed)))
    with pytest.raises(PartialSumRejected, match="refused: AuthenticationError"):
        open_partial_sums(own, {"agg-1": forged}, OPEN, "agg-2", HPKE["agg-2"], b"h" * 32)
