"""The leader's round plan and the step from aggregate to next model."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, BrokerSettings, RoundSettings, StrategySettings
from aggregator.errors import AggregatorConfigError, MessageRejected, StrategyError
from aggregator.leader import (
    StudyTerms,
    check_round_open,
    plan_round,
    ring_bound,
    round_record,
)
from aggregator.rounds import Stage
from aggregator.strategies import Aggregate, ServerState
from aggregator.update import apply_round
from tessera.crypto.encoding import decode, derive_ring_params, encode
from tessera.crypto.sharing import combine
from tessera.errors import AuthenticationError
from tessera.wire.messages import RoundOpen

CONFIG = AggregatorConfig(
    aggregator_id="agg-1",
    federation_id="fed-1",
    study_id="study-1",
    leader_id="agg-1",
    manifest="m.json",
    signing_key="s.pem",
    hpke_key="h.pem",  # type: ignore[arg-type]
    broker=BrokerSettings(tls=False),
    round=RoundSettings(
        min_participants=2, local_epochs=3, clip_norm=5.0, loss_cap=10.0, weight_cap=500
    ),
)
NODES = ("site-c", "site-a", "site-b")


def plan(config: AggregatorConfig = CONFIG, algorithm: str = "fedavg", nodes=NODES) -> RoundOpen:
    return plan_round(
        config,
        round_number=4,
        base_model_hash=b"\x05" * 32,
        model_version=3,
        algorithm=algorithm,
        aggregator_ids=("agg-1", "agg-2"),
        expected_nodes=nodes,
        vector_length=1000,
        now_ms=1_000_000,
    )


def test_plans_ask_for_epochs_or_one_step_and_survive_the_wire() -> None:
    fedavg, fedsgd = plan(), plan(algorithm="fedsgd")
    assert (fedavg.local_epochs, fedavg.local_steps) == (3, 0)
    assert (fedsgd.local_epochs, fedsgd.local_steps) == (0, 1)
    assert fedavg.expected_nodes == ("site-a", "site-b", "site-c")
    assert fedavg.deadline_ms == 1_000_000 + 600_000
    assert (fedavg.weight_cap, fedavg.loss_cap) == (500, 10.0)  # the nodes scale by these
    assert RoundOpen.from_bytes(fedavg.to_bytes()) == fedavg
    record = round_record(fedavg)
    assert record.state.stage is Stage.OPEN and record.state.round == 4
    assert record.ring_params == fedavg.ring.to_bytes()


def test_the_ring_holds_every_node_at_the_bound_without_wrapping() -> None:
    announcement = plan()
    bound = ring_bound(CONFIG.round)
    assert bound == 25.0  # clip_norm**2 dominates loss_cap = 10
    worst = [encode(np.full(8, bound), announcement.ring)] * 3
    np.testing.assert_allclose(decode(combine(worst), announcement.ring, 3), 3 * bound)
    with pytest.raises(ValueError):
        encode(np.full(8, bound * 1.01), announcement.ring)


def test_only_the_leader_plans_and_only_for_at_least_k_nodes() -> None:
    with pytest.raises(AggregatorConfigError, match="not the leader"):
        plan(dataclasses.replace(CONFIG, aggregator_id="agg-2"))
    with pytest.raises(AggregatorConfigError, match="fewer than"):
        plan(nodes=("site-a",))


TERMS = StudyTerms(min_participants=2, clip_norm=5.0, leader_id="agg-1", sites=NODES)


def check(announcement: RoundOpen, signer: str = "agg-1", config: AggregatorConfig | None = None,
          held_round: int | None = None, **terms: object) -> None:  # fmt: skip
    check_round_open(
        announcement, signer, config or dataclasses.replace(CONFIG, aggregator_id="agg-2"),
        terms=dataclasses.replace(TERMS, **terms), aggregator_ids=("agg-1", "agg-2"),
        base=b"\x05" * 32, held_round=held_round, now_ms=1_000_000,
    )  # fmt: skip


def test_a_follower_accepts_only_a_new_round_opened_by_its_leader() -> None:
    announcement = plan()  # round 4, led by agg-1
    check(announcement)
    check(announcement, held_round=3)
    with pytest.raises(MessageRejected, match="the leader is 'agg-1'"):
        check(announcement, signer="agg-2")
    with pytest.raises(MessageRejected, match="the leader is 'agg-2'"):
        check(announcement, leader_id="agg-2")  # the roster's leader, not the config's
    with pytest.raises(MessageRejected, match="not new"):
        check(announcement, held_round=4)
    other_study = dataclasses.replace(CONFIG, aggregator_id="agg-2", study_id="study-2")
    with pytest.raises(AuthenticationError):
        check(announcement, config=other_study)


LIES: list[tuple[dict[str, Any], str]] = [
    ({"min_participants": 1}, "requires k >= 2"),
    ({"expected_nodes": ("site-a",)}, "expected-below-k"),
    ({"expected_nodes": ("site-a", "mallory")}, "expected-not-in-manifest"),
    ({"aggregator_ids": ("agg-2", "agg-1")}, "in that order"),
    ({"aggregator_ids": ("agg-1", "agg-3")}, "the roster has"),
    ({"clip_norm": 6.0}, "clip-norm-above-study"),
    ({"loss_cap": 11.0}, "ring-outside-caps"),
    ({"ring": derive_ring_params(5.0, 3)}, "require exactly 25"),
    ({"ring": derive_ring_params(25.0, 2)}, "holds sums of 2"),
    ({"ring": derive_ring_params(25.0, 3, 4)}, "fraction bits"),
    ({"base_model_hash": b"\x06" * 32}, "does not hold"),
    ({"deadline_ms": 1_000_000}, "has passed"),
]


@pytest.mark.parametrize(("lie", "reason"), LIES, ids=[next(iter(lie)) for lie, _ in LIES])
def test_every_term_a_leader_could_lie_about_is_checked(lie: dict[str, Any], reason: str) -> None:
    """Issue #18: k, the expected set, the aggregators, the clip norm, the caps, the ring, the
    base model and the deadline are held to this aggregator's own terms."""
    with pytest.raises(MessageRejected, match=reason):
        check(dataclasses.replace(plan(), **lie))


def test_k_eff_is_the_larger_of_the_aggregators_and_the_studys() -> None:
    config = dataclasses.replace(CONFIG, aggregator_id="agg-2")
    assert TERMS.k_for(config) == 2
    assert dataclasses.replace(TERMS, min_participants=3).k_for(config) == 3
    with pytest.raises(MessageRejected, match="requires k >= 3"):
        check(plan(), min_participants=3)
    with pytest.raises(AggregatorConfigError, match="roster's leader"):
        dataclasses.replace(TERMS, leader_id="agg-2").k_for(config)


def params() -> dict[str, np.ndarray]:
    return {"b": np.array([1.0, 2.0], np.float32), "a": np.array([[0.5], [-0.5]], np.float32)}


def test_apply_round_updates_the_named_parameters_and_runs_the_policy() -> None:
    # flat canonical order is a (2 values) then b (2 values)
    deltas = [np.array([0.1, 0.1, 0.0, 1.0]), np.array([-0.1, 0.3, 2.0, -1.0])]
    weights = [1.0, 3.0]
    aggregate = Aggregate(
        sum(w * d for w, d in zip(weights, deltas, strict=True)),
        4.0,
        4.0 * 0.5,
        sum(w * float(d @ d) for w, d in zip(weights, deltas, strict=True)),
        2,
    )
    settings = StrategySettings(adaptive=True, lower=0.1, upper=0.5)
    outcome = apply_round(params(), aggregate, ServerState(), settings, "fedavg", 7)
    mean = (deltas[0] + 3 * deltas[1]) / 4
    np.testing.assert_array_equal(
        outcome.params["a"], (np.array([0.5, -0.5]) + mean[:2]).astype(np.float32).reshape(2, 1)
    )
    np.testing.assert_array_equal(
        outcome.params["b"], (np.array([1, 2]) + mean[2:]).astype(np.float32)
    )
    assert outcome.mean_loss == 0.5 and outcome.participants == 2
    assert outcome.dispersion > 0.5 and outcome.next_algorithm == "fedsgd"
    assert outcome.switch is not None and outcome.switch.round == 7
    still = apply_round(
        params(), aggregate, ServerState(), StrategySettings(adaptive=False), "fedavg", 7
    )
    assert still.next_algorithm == "fedavg" and still.switch is None
    with pytest.raises(StrategyError, match="another model"):
        apply_round({"a": np.zeros(3, np.float32)}, aggregate, ServerState(), settings, "fedavg", 7)
