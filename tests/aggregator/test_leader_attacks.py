"""Issue #18, attacks 1 and 2, performed against the real follower and real nodes: a leader
that equivocates (two RoundOpens for one round), and a leader that re-opens a summed base
model with another set (a subset, or a superset adding fewer than k nodes) to difference the
two aggregates. A retry over a superset adding at least k nodes is accepted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.service import Outgoing
from node.round.participation import Joined, Participation, Refused
from tessera.crypto.sealing import open_sealed
from tessera.errors import AuthenticationError
from tessera.wire.envelopes import share_binding
from tessera.wire.messages import PartialSum, RoundOpen, ShareEnvelope
from tests.support.leader_attack import (
    FOLLOWER,
    NOW_MS,
    SITES,
    STUDY_K,
    LyingLeaderFederation,
    audit_reasons,
)
from tests.support.models import IngestedSite, ingested_site


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> IngestedSite:
    return ingested_site(tmp_path_factory.mktemp("site"), images_per_site=16)


def announce(fed: LyingLeaderFederation, *messages: RoundOpen) -> list[Outgoing]:
    return [Outgoing(fed.round_topic(), fed.as_leader(m)) for m in messages]


def recovery(
    fed: LyingLeaderFederation,
    announcement: RoundOpen,
    sums: list[PartialSum],
    site: str,
    victim: Participation,
) -> str:
    """What the attacker gets from the follower's partial sum (for the failure message)."""
    assert isinstance(victim, Joined)
    mine = fed.leader_share(announcement, victim.messages[0], site)
    recovered = fed.recover(announcement, sums[0], [mine])
    exact = np.array_equal(recovered, victim.update.encoded)
    return (
        f"the follower published {len(sums)} partial sum(s) over the victim alone; adding the "
        f"leader's own share recovers the victim's encoded update {'exactly' if exact else ''}"
    )


def test_equivocation_yields_no_partial_sum_over_fewer_than_k(
    tmp_path: Path, data: IngestedSite
) -> None:
    """Attack 1: RoundOpen(r, k=1) and RoundOpen(r, k=3), same base model and ring; the
    nodes refuse the first and are offered the second; ParticipantSet {victim}."""
    fed = LyingLeaderFederation(tmp_path, data)
    weak, strong = fed.round_open(min_participants=1), fed.round_open(min_participants=3)
    assert weak.round == strong.round and weak.ring == strong.ring
    out = fed.to(FOLLOWER, announce(fed, weak, strong))

    victim = SITES[0]
    answers = {site: (fed.answer(site, weak), fed.answer(site, strong)) for site in SITES[:3]}
    late = fed.answer("site-4", strong)  # a node that only ever saw the second one
    shares = [m for pair in answers.values() for p in pair for m in p.messages]
    out += fed.to(FOLLOWER, [*shares, *late.messages])
    out += fed.to(FOLLOWER, [fed.participants(strong.round, [victim])])

    sums = fed.partial_sums(out)
    assert not sums, recovery(fed, strong, sums, victim, answers[victim][1])
    # A node answers one RoundOpen per round number: refusing the first, it refuses the second.
    for site in SITES[:3]:
        first, second = answers[site]
        assert isinstance(first, Refused) and first.reason == "k-below-minimum"
        assert isinstance(second, Refused) and second.reason == "already-answered"
        assert fed.nodes[site].ledger is not None and fed.nodes[site].ledger.rounds == []
        assert [r for _, r in audit_reasons(fed.nodes[site])] == [
            "k-below-minimum",
            "already-answered",
        ]
    # A share made for one announcement does not open under the other.
    assert isinstance(late, Joined)
    to_follower = fed.open_message(late.messages[1])
    assert isinstance(to_follower, ShareEnvelope) and to_follower.aggregator_id == FOLLOWER
    key = fed.gov.hpke_keys[FOLLOWER]
    open_sealed(to_follower.sealed, key, share_binding(strong, "site-4", FOLLOWER))
    with pytest.raises(AuthenticationError):
        open_sealed(to_follower.sealed, key, share_binding(weak, "site-4", FOLLOWER))


def summed_round(
    fed: LyingLeaderFederation, announcement: RoundOpen, sites: tuple[str, ...]
) -> list[PartialSum]:
    """The follower adopts `announcement`, `sites` join it and send their shares, and the
    leader asks for the sum over all of them; the partial sums the follower publishes."""
    out = fed.to(FOLLOWER, announce(fed, announcement))
    answers = [fed.answer(site, announcement) for site in sites]
    assert all(isinstance(a, Joined) for a in answers), [getattr(a, "detail", "") for a in answers]
    out += fed.to(FOLLOWER, [m for a in answers for m in a.messages])
    out += fed.to(FOLLOWER, [fed.participants(announcement.round, sites)])
    return fed.partial_sums(out)


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.__dict__["fields"]["reason"] for r in caplog.records if r.msg == "message-rejected"]


def test_a_second_partial_sum_on_one_base_model_is_refused_even_after_a_restart(
    tmp_path: Path, data: IngestedSite, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack 2: sum {1,2,3,4} on the genesis model, abort, re-open on the same model over
    {1,2,3}: the difference of the two aggregates would be site-4's update."""
    fed = LyingLeaderFederation(tmp_path, data)
    first = fed.round_open(round=1)
    assert len(summed_round(fed, first, SITES)) == 1  # the honest first sum

    fed.clock.now += 1
    smaller = SITES[:3]
    second = fed.round_open(round=2, expected_nodes=smaller, deadline_ms=first.deadline_ms + 1000)
    assert summed_round(fed, second, smaller) == []
    assert (
        "round 1 summed this base model over 4 node(s); this set drops 1" in (refusals(caplog)[-1])
    )

    follower = fed.restart(FOLLOWER)
    third = fed.round_open(round=3, expected_nodes=smaller, deadline_ms=first.deadline_ms + 2000)
    assert summed_round(fed, third, smaller) == []
    assert follower.current is not None and follower.current.announcement == third
    assert (
        "round 1 summed this base model over 4 node(s); this set drops 1" in (refusals(caplog)[-1])
    )


def test_a_superset_adding_fewer_than_k_nodes_is_refused_even_after_a_restart(
    tmp_path: Path, data: IngestedSite, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack 2, the other way: sum {1,2,3}, abort, re-open on the same model over
    {1,2,3,4}: the difference of the two aggregates would be site-4's update (k=3)."""
    fed = LyingLeaderFederation(tmp_path, data)
    first = fed.round_open(round=1, expected_nodes=SITES[:3])
    assert len(summed_round(fed, first, SITES[:3])) == 1

    fed.clock.now += 1
    second = fed.round_open(round=2, deadline_ms=first.deadline_ms + 1000)
    assert summed_round(fed, second, SITES) == []
    assert "drops 0 of them and adds 1" in refusals(caplog)[-1]
    assert "add none or at least k=3" in refusals(caplog)[-1]

    fed.restart(FOLLOWER)
    third = fed.round_open(round=3, deadline_ms=first.deadline_ms + 2000)
    assert summed_round(fed, third, SITES) == []
    assert "drops 0 of them and adds 1" in refusals(caplog)[-1]


class KTwoFederation(LyingLeaderFederation):
    """Both aggregators with k=2 (the study's), so that four sites can add k to a sum."""

    def config(self, agg: str) -> AggregatorConfig:
        config = super().config(agg)
        return dataclasses.replace(
            config, round=dataclasses.replace(config.round, min_participants=STUDY_K)
        )


def test_a_retry_over_the_same_set_or_one_adding_k_nodes_is_summed(
    tmp_path: Path, data: IngestedSite, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry rule's other side: after {1,2} was summed on a base model, {1,2} again (the
    difference is only fresh DP noise) and {1,2,3,4} (adds k=2 updates, what any round
    releases) are summed; {1,2,3} (adds one update) is refused, before and after them."""
    fed = KTwoFederation(tmp_path, data)
    pair, k = SITES[:2], {"min_participants": STUDY_K}
    step = 0

    def open_next(expected: tuple[str, ...]) -> RoundOpen:
        nonlocal step
        step += 1
        fed.clock.now += 1
        deadline = NOW_MS + 600_000 + step * 1000
        return fed.round_open(round=step, expected_nodes=expected, deadline_ms=deadline, **k)

    assert len(summed_round(fed, open_next(pair), pair)) == 1
    assert len(summed_round(fed, open_next(pair), pair)) == 1  # the same set: accepted
    assert summed_round(fed, open_next(SITES[:3]), SITES[:3]) == []
    assert "adds 1" in refusals(caplog)[-1]
    assert len(summed_round(fed, open_next(SITES), SITES)) == 1  # adds k=2: accepted
    fed.restart(FOLLOWER)
    assert summed_round(fed, open_next(SITES[:3]), SITES[:3]) == []  # drops site-4
    assert "round 5: round 1 summed this base model" in refusals(caplog)[-1]
    assert len(summed_round(fed, open_next(SITES), SITES)) == 1
