"""DP-SGD: the privacy ledger (refusal before training, composition, atomic persistence)
and the private training itself (clipping is real, noise is not reproducible by default)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from node.errors import NodeError
from node.privacy.ledger import (
    BudgetExceeded,
    PrivacyLedger,
    compose_epsilon,
    ledger_path,
    merge_history,
    recorded_epsilon,
)
from node.training.trainer import DPSettings, TrainConfig, run_local_round
from tessera.models import ModelSpec, build_model
from tessera.models.transfer import trainable_parameters
from tests.support.models import small_model

torch.set_num_threads(1)
DP = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=1)
# 40 training images at batch 10: q = 0.25 per step, 4 steps an epoch.
CFG = TrainConfig(local_epochs=1, batch_size=10, learning_rate=0.1, dp=DP)


def _data(n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 1, 16, 16)).astype(np.float32)
    x[y == 1, :, 4:12, 4:12] += 1.5
    return x, y


def _ledger(tmp_path: Path, budget: float, accountant: str = "rdp") -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "privacy" / "study-1.json", "study-1", budget, 1e-5,
                         accountant)  # fmt: skip


def test_over_budget_round_is_refused_before_training_and_recorded(tmp_path: Path) -> None:
    x, y = _data()
    ledger = _ledger(tmp_path, budget=1.0)
    model, _ = small_model()
    before = trainable_parameters(model)
    with pytest.raises(BudgetExceeded, match=r"budget-exhausted.*over the budget 1"):
        run_local_round(model, x, y, CFG, ledger, round_number=1)
    assert ledger.rounds == [] and ledger.spent == 0.0  # refused before anything was charged
    after = trainable_parameters(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # not one step was taken
    on_disk = json.loads(ledger.path.read_text())
    assert on_disk["rounds"] == []
    refusal = on_disk["refusals"][0]
    assert refusal["round"] == 1 and refusal["reason"] == "budget-exhausted"
    assert refusal["prospective_total"] > 1.0
    assert ledger.state().epsilon_spent == 0.0


def test_rounds_compose_and_the_budget_stops_the_third(tmp_path: Path) -> None:
    x, y = _data()
    one_round = compose_epsilon([(1.0, 0.25, 4)], 1e-5, "rdp")
    two, three = (compose_epsilon([(1.0, 0.25, 4 * k)], 1e-5, "rdp") for k in (2, 3))
    budget = (two + three) / 2  # room for two composed rounds, not three
    ledger = _ledger(tmp_path, budget=budget)
    model, _ = small_model()
    first = run_local_round(model, x, y, CFG, ledger, round_number=1).dp_charge
    second = run_local_round(model, x, y, CFG, ledger, round_number=2).dp_charge
    assert first is not None and second is not None
    assert first.epsilon_round == pytest.approx(one_round) == first.epsilon_total
    # RDP composition is tighter than adding the rounds' epsilons.
    assert second.epsilon_total == pytest.approx(two)
    assert one_round < two < 2 * one_round
    with pytest.raises(BudgetExceeded):
        run_local_round(model, x, y, CFG, ledger, round_number=3)
    reopened = _ledger(tmp_path, budget=budget)
    # What node.round.policy is given: spent + increment is exactly the composed total.
    increment = reopened.projected_increment(1.0, 0.25, 4)
    assert reopened.state().epsilon_spent + increment == pytest.approx(three)
    assert increment < one_round
    assert reopened.spent == pytest.approx(second.epsilon_total)
    assert [r["round"] for r in reopened.rounds] == [1, 2]
    assert [r["round"] for r in reopened.refusals] == [3]
    assert reopened.state().rounds_joined == 2
    with pytest.raises(NodeError, match="already charged"):  # a replayed announcement
        reopened.charge_round(2, 1.0, 0.25, 4)


def test_ledger_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = _ledger(tmp_path, budget=100.0)
    ledger.charge_round(1, 1.0, 0.25, 4)
    good = ledger.path.read_bytes()

    def crash(*_args: object) -> None:
        raise OSError("simulated power cut before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        ledger.charge_round(2, 1.0, 0.25, 4)
    monkeypatch.undo()
    assert ledger.path.read_bytes() == good  # the old ledger, whole
    left = sorted(p.name for p in ledger.path.parent.iterdir())
    assert left == [ledger.path.name, ledger.path.name + ".lock"]  # no temp file left
    assert _ledger(tmp_path, budget=100.0).rounds[0]["round"] == 1
    assert oct(ledger.path.stat().st_mode & 0o777) == "0o600"


def test_two_ledger_objects_never_spend_against_a_stale_total(tmp_path: Path) -> None:
    one_round = compose_epsilon([(1.0, 0.25, 4)], 1e-5, "rdp")
    two = compose_epsilon([(1.0, 0.25, 8)], 1e-5, "rdp")
    budget = (one_round + two) / 2  # room for exactly one round
    daemon, manual = _ledger(tmp_path, budget), _ledger(tmp_path, budget)  # both read "0 spent"
    daemon.charge_round(1, 1.0, 0.25, 4)
    with pytest.raises(BudgetExceeded):
        manual.charge_round(2, 1.0, 0.25, 4)  # re-reads under the lock: round 1 is counted
    assert [r["round"] for r in _ledger(tmp_path, budget).rounds] == [1]


def test_ledger_refuses_changed_accounting_and_damage(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, budget=10.0)
    ledger.charge_round(1, 1.0, 0.25, 4)
    with pytest.raises(NodeError, match="delta"):
        PrivacyLedger(ledger.path, "study-1", 10.0, 1e-6)
    with pytest.raises(NodeError, match="accountant"):
        PrivacyLedger(ledger.path, "study-1", 10.0, 1e-5, "prv")
    ledger.path.write_text("{torn")
    with pytest.raises(NodeError, match="unreadable"):
        _ledger(tmp_path, budget=10.0)


def test_prv_accountant_agrees_roughly_with_rdp(tmp_path: Path) -> None:
    rdp = compose_epsilon([(1.0, 0.25, 4)], 1e-5, "rdp")
    prv = _ledger(tmp_path, 100.0, "prv").charge_round(1, 1.0, 0.25, 4).epsilon_total
    assert 0.3 * rdp < prv <= rdp * 1.05  # PRV is the tighter accountant


def test_recorded_epsilon_reads_a_ledger_up_to_a_round(tmp_path: Path) -> None:
    path = ledger_path(tmp_path, "s")
    assert recorded_epsilon(path, "s") is None  # nothing charged yet
    ledger = PrivacyLedger(path, "s", 100.0, 1e-5)
    first = ledger.charge_round(1, 1.0, 0.25, 4).epsilon_total
    ledger.charge_round(2, 1.0, 0.25, 4)
    assert recorded_epsilon(path, "s", up_to_round=1) == (pytest.approx(first), 1e-5)
    assert recorded_epsilon(path, "s") == (pytest.approx(ledger.spent), 1e-5)
    assert recorded_epsilon(path, "s", up_to_round=0) is None
    with pytest.raises(NodeError, match="study 's'"):
        recorded_epsilon(path, "other")
    path.write_text("{torn")
    with pytest.raises(NodeError, match="unreadable"):
        recorded_epsilon(path, "s")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_repeated_rounds_compose_as_one_term_per_mechanism(accountant: str) -> None:
    """A round's term merges with earlier equal ones (a charge costs the same in round 50
    as in round 1); what is composed is unchanged, and a different mechanism stays apart."""
    rounds = [(1.0, 0.25, 4)] * 20
    whole = compose_epsilon([(1.0, 0.25, 80)], 1e-5, accountant)
    assert compose_epsilon(rounds, 1e-5, accountant) == pytest.approx(whole, rel=1e-9)
    assert merge_history([*rounds, (2.0, 0.25, 4), (1.0, 0.25, 4)]) == [
        (1.0, 0.25, 84),
        (2.0, 0.25, 4),
    ]
    from opacus.accountants import RDPAccountant

    unmerged = RDPAccountant()
    unmerged.history = [*rounds, (2.0, 0.5, 3)]
    mixed = compose_epsilon([*rounds, (2.0, 0.5, 3)], 1e-5, "rdp")
    assert mixed == pytest.approx(unmerged.get_epsilon(delta=1e-5), rel=1e-9)
    assert mixed > whole


@pytest.mark.filterwarnings("ignore:Optimal order")  # tiny noise: epsilon is huge, on purpose
def test_dp_training_clips_per_sample_gradients(tmp_path: Path) -> None:
    x, y = _data()
    norms = {}
    for name, dp in (("plain", None), ("dp", DPSettings(0.05, 1e-3, noise_seed=2))):
        model, _ = small_model()
        start = trainable_parameters(model)
        cfg = TrainConfig(local_epochs=1, batch_size=10, learning_rate=1.0, dp=dp)
        run_local_round(model, x, y, cfg, _ledger(tmp_path / name, 1e6), round_number=1)
        end = trainable_parameters(model)
        norms[name] = math.sqrt(sum(float(np.sum((end[k] - start[k]) ** 2)) for k in start))
    # Each of 4 steps moves at most lr * C * (batch / expected batch) plus a little noise.
    assert 0 < norms["dp"] < 4 * 1.0 * 1e-3 * 3
    assert norms["plain"] > 100 * norms["dp"]


def test_dp_noise_is_fresh_unless_seeded_for_tests(tmp_path: Path) -> None:
    x, y = _data()
    runs = []
    for i, noise_seed in enumerate((None, None, 7, 7)):
        model, _ = small_model()
        cfg = TrainConfig(batch_size=10, dp=DPSettings(1.0, 1.0, noise_seed=noise_seed))
        run_local_round(model, x, y, cfg, _ledger(tmp_path / str(i), 1e6), round_number=1)
        runs.append(trainable_parameters(model)["head.weight"])
    assert not np.array_equal(runs[0], runs[1])
    assert np.array_equal(runs[2], runs[3])


def test_empty_poisson_batches_still_take_a_noisy_accounted_step(tmp_path: Path) -> None:
    # 40 training images at batch 1: q = 1/40, so about a third of the 30 steps draw an
    # empty batch (all 30 non-empty has probability ~1e-6). Each must still be a DP step.
    x, y = _data()
    model, _ = small_model()
    cfg = TrainConfig(local_steps=30, batch_size=1, dp=DPSettings(1.0, 1.0, noise_seed=3))
    result = run_local_round(model, x, y, cfg, _ledger(tmp_path, 1e6), round_number=1)
    assert result.dp_charge is not None
    assert (result.dp_charge.steps, result.dp_charge.sample_rate) == (30, 1 / 40)


def test_dp_refuses_a_batch_norm_model_with_the_fix(tmp_path: Path) -> None:
    x, y = _data()
    model = build_model(ModelSpec("small-cnn", 1, 2, "batch"))
    ledger = _ledger(tmp_path, 1e6)
    with pytest.raises(NodeError, match="GroupNorm variant"):
        run_local_round(model, x, y, CFG, ledger, round_number=1)
    assert ledger.rounds == [] and ledger.spent == 0.0  # refused before anything was charged
