"""Issue #18, attack 2's retry rule, with two real AggregatorService objects: a round that
aborts after its partial sums no longer spends its base model for good. The leader opens a
retry on the same base model that expects every node of the earlier sum, and the retry is
summed and released when its set passes the rule (the same set, or one adding at least k
nodes); a node of the earlier sum that cannot return keeps the leader from opening."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.errors import BaseModelSpent
from aggregator.rounds import Stage
from broker import topics
from tessera.wire.messages import ModelRelease, ParticipantSet
from tests.aggregator.test_service import (
    AGGREGATORS,
    LEADER,
    NODES,
    STUDY,
    Federation,
    Outgoing,
    kind_of,
    run_round,
)


def note(out: Outgoing) -> bool:
    return kind_of(out) is topics.Kind.RELEASE


def abort_after_the_sums(fed: Federation, skip: set[tuple[str, str]]) -> None:
    """Round 1: both aggregators publish their partial sums, the follower's signature note
    is lost, and the round aborts at the agreement timeout: nothing is released."""
    run_round(fed, skip=skip, drop=note)
    fed.past_deadline(drop=note)  # collection closes where some node did not report
    timeout = fed.services[LEADER].config.round.agreement_timeout_s
    fed.past_deadline(drop=note, extra_s=timeout + 1)
    for agg in AGGREGATORS:
        assert fed.stage(agg) is Stage.ABORTED
        assert fed.services[agg].store.published_sum(STUDY, 1) is not None  # summed
        assert fed.services[agg].registry.latest(STUDY) is None


def agreed_sets(fed: Federation) -> list[tuple[str, ...]]:
    return [m.node_ids for _, m in fed.published(ParticipantSet, on=(topics.Kind.PARTICIPANTS,))]


def test_a_round_that_aborts_after_its_sums_is_retried_on_the_same_set_and_released(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path)
    abort_after_the_sums(fed, skip=set())
    base = fed.announcement().base_model_hash

    fed.lost.clear()
    run_round(fed, skip=set())  # round 2, on the same base model, every node again
    assert fed.announcement().round == 2 and fed.announcement().base_model_hash == base
    fed.past_deadline()
    for agg in AGGREGATORS:
        assert fed.stage(agg) is Stage.RELEASED
        latest = fed.services[agg].registry.latest(STUDY)
        assert latest is not None and latest.record.round == 2
    assert agreed_sets(fed) == [NODES, NODES]
    assert len(fed.published(ModelRelease)) == 2  # round 2's note and its release


def test_a_retry_where_fewer_than_k_new_nodes_arrive_sums_the_earlier_set(
    tmp_path: Path,
) -> None:
    """Round 1 sums {a, b, c} (site-d reaches only the leader) and aborts; in round 2 all
    four arrive, but {a, b, c, d} adds one node, fewer than k=3: the leader agrees on
    {a, b, c} again (site-d is left out, like a dropout) and the round releases."""
    fed = Federation(tmp_path)
    abort_after_the_sums(fed, skip={("site-d", "agg-2")})
    assert agreed_sets(fed) == [NODES[:3]]

    fed.lost.clear()
    run_round(fed, skip=set())
    fed.past_deadline()
    assert agreed_sets(fed) == [NODES[:3], NODES[:3]]
    for agg in AGGREGATORS:
        assert fed.stage(agg) is Stage.RELEASED
        current = fed.services[agg].current
        assert current is not None and current.state.participants == NODES[:3]


def test_a_retry_where_a_node_of_the_earlier_sum_is_missing_aborts_with_the_rule(
    tmp_path: Path,
) -> None:
    """Round 1 sums {a, b, c, d}; in round 2 site-d reaches only the leader, so the
    intersection {a, b, c} drops a node of the earlier sum: no set passes the rule, and the
    round aborts with that reason before any partial sum (as fewer than k does)."""
    fed = Federation(tmp_path)
    abort_after_the_sums(fed, skip=set())
    run_round(fed, skip={("site-d", "agg-2")})
    fed.past_deadline()
    for agg in AGGREGATORS:
        current = fed.services[agg].current
        assert current is not None and current.state.stage is Stage.ABORTED
        assert "a retry must keep every node it summed" in (current.state.abort_reason or "")
        assert fed.services[agg].store.published_sum(STUDY, 2) is None


def test_the_leader_opens_no_retry_without_every_node_of_the_earlier_sum(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path)
    abort_after_the_sums(fed, skip={("site-d", "agg-2")})  # summed {a, b, c}
    leader = fed.services[LEADER]
    with pytest.raises(BaseModelSpent, match="site-c must return"):
        leader.open_round(("site-a", "site-b", "site-d"))
    with pytest.raises(BaseModelSpent, match="site-b must return"):
        leader.open_round(NODES, available={"site-a", "site-c", "site-d"})
    assert fed.announcement().round == 1  # nothing opened: no node spends epsilon
    fed.deliver(leader.open_round(NODES, available={"site-a", "site-b", "site-c"}))
    assert fed.announcement().round == 2 and fed.stage("agg-2") is Stage.COLLECTING
