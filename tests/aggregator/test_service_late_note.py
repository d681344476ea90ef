"""Regressions found end to end (tests/e2e) or in review: what happens at the end of a round.

A follower's signature note that reaches the leader after the round aborted
(at the agreement timeout) must not register the model at the leader.

The leader used to register version 1 of an aborted round, the
follower never did, and every later RoundOpen named a base model the follower did not hold,
so the federation could not release again. Since issue #18 a round that aborts after its
partial sums may only be retried on a set the retry rule allows (agreement.check_retry_rule):
the leader opens the retry only with every node of the earlier sum expected.

Shares (seed rows and full-share files) used to stay on disk after their round ended, until
the next restart; they are now deleted as soon as the round is released or aborted."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from aggregator.errors import BaseModelSpent
from aggregator.registry import Registry
from aggregator.rounds import Stage
from aggregator.service import AggregatorService
from broker import topics
from tessera.observability.events import Event
from tests.aggregator.test_service import (
    GENESIS,
    LEADER,
    NODES,
    STUDY,
    Federation,
    Outgoing,
    events,
    fake_onnx,
    kind_of,
    run_round,
)


def test_a_note_after_the_abort_registers_nothing_and_the_retry_keeps_the_summed_set(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path)

    def note(out: Outgoing) -> bool:
        return kind_of(out) is topics.Kind.RELEASE

    run_round(fed, skip=set(), drop=note)  # everyone reports; the note is held back
    (held,) = fed.lost
    assert fed.stage(LEADER) is Stage.COMBINING
    timeout = fed.services[LEADER].config.round.agreement_timeout_s
    fed.past_deadline(extra_s=timeout + 1)
    assert fed.stage(LEADER) is Stage.ABORTED and fed.stage("agg-2") is Stage.ABORTED

    fed.deliver([held])  # the late note
    assert fed.stage(LEADER) is Stage.ABORTED
    for service in fed.services.values():
        assert service.registry.latest(STUDY) is None

    # Both published a partial sum on the genesis model over every node; a retry that left
    # one out would let a leader difference two aggregates (issue #18, attack 2), so the
    # leader opens none without it, and opens one that expects every node of the sum.
    with pytest.raises(BaseModelSpent, match="site-d must return"):
        fed.services[LEADER].open_round(NODES[:3])
    assert fed.stage(LEADER) is Stage.ABORTED and fed.announcement().round == 1
    fed.deliver(fed.services[LEADER].open_round(NODES))
    assert fed.announcement().round == 2 and fed.stage("agg-2") is Stage.COLLECTING


def shares_left(fed: Federation) -> dict[str, tuple[int, int]]:
    """Per aggregator: (share rows, share files) still in its store, any round."""
    left = {}
    for agg, service in fed.services.items():
        rows = service.store._db.execute("SELECT COUNT(*) FROM shares").fetchone()[0]
        files = len(list(service.store.shares_dir.rglob("*.share")))
        left[agg] = (rows, files)
    return left


def test_shares_are_deleted_when_a_round_is_released_or_aborted(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    run_round(fed, skip=set())
    assert all(fed.stage(a) is Stage.RELEASED for a in fed.services)
    assert shares_left(fed) == {a: (0, 0) for a in fed.services}

    run_round(fed, skip={("site-a", "agg-2"), ("site-b", "agg-2")})  # 2 < k = 3 in common
    assert shares_left(fed)[LEADER][0] == len(NODES)
    fed.past_deadline()
    assert all(fed.stage(a) is Stage.ABORTED for a in fed.services)
    assert shares_left(fed) == {a: (0, 0) for a in fed.services}


def restart(fed: Federation, agg: str, optimizer: str = "none") -> AggregatorService:
    """What `tessera aggregator run` does after a kill: recover the store, start afresh."""
    old = fed.services[agg]
    old.store.recover()
    config = dataclasses.replace(
        old.config, strategy=dataclasses.replace(old.config.strategy, optimizer=optimizer)
    )
    new = AggregatorService(
        config, old.keys, old.roster, old.store, Registry(old.store, config.registry_dir),
        fed.clock, genesis=GENESIS, export_onnx=fake_onnx, terms=old.terms,
    )  # fmt: skip
    fed.services[agg] = new
    return new


def final_release(out: Outgoing) -> bool:
    return kind_of(out) is topics.Kind.RELEASE and out.retain  # not the follower's note


def test_a_follower_restarted_before_the_release_arrived_takes_it_over(tmp_path: Path) -> None:
    """Found in review: a follower killed after sending its signature note, before the
    leader's release reached it, restarted without the model. Every later RoundOpen named a
    base model it did not hold, so no round could ever complete again."""
    fed = Federation(tmp_path)
    run_round(fed, skip=set(), drop=final_release)
    (held,) = fed.lost  # the release, retained by the broker
    assert fed.stage(LEADER) is Stage.RELEASED and fed.stage("agg-2") is Stage.COMBINING
    follower = restart(fed, "agg-2")
    assert follower.registry.latest(STUDY) is None

    fed.deliver([held])  # the retained release, on reconnect
    leader_model = fed.services[LEADER].registry.latest(STUDY)
    caught_up = follower.registry.latest(STUDY)
    assert leader_model is not None and caught_up is not None
    assert caught_up.record.model_hash == leader_model.record.model_hash
    fed.deliver([held])  # seen again: ignored
    assert len(follower.registry.list(STUDY)) == 1

    fed.deliver(fed.services[LEADER].open_round(NODES))
    assert fed.stage("agg-2") is Stage.COLLECTING  # the same base model at both again


def test_a_missed_release_is_not_taken_over_when_the_optimiser_keeps_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = Federation(tmp_path)
    run_round(fed, skip=set(), drop=final_release)
    (held,) = fed.lost
    follower = restart(fed, "agg-2", optimizer="fedavgm")
    caplog.set_level(logging.WARNING)
    fed.deliver([held])
    assert follower.registry.latest(STUDY) is None
    (rejected,) = events(caplog, Event.MESSAGE_REJECTED)
    assert "restore this aggregator's state" in rejected.__dict__["fields"]["reason"]
