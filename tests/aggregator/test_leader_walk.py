"""Issue #18, "What else": a malicious leader walked through every message it sends (the
RoundOpen, the ParticipantSet, the partial-sum request it makes with it, the release), each
field it could lie about, against the real follower and real nodes. None of the lies yields
a partial sum over fewer than k, a second partial sum, or a release the nodes accept."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from aggregator.rounds import Stage
from aggregator.service import Outgoing
from broker import topics
from node.round.participation import Joined, Refused
from node.round.releases import ModelStore, accept_release
from tessera.crypto.encoding import derive_ring_params
from tessera.errors import AuthenticationError
from tessera.wire.envelopes import seal_envelope
from tessera.wire.messages import ModelRelease, ParticipantSet
from tessera.wire.release import verify_release
from tests.support.leader_attack import (
    FOLLOWER,
    LEADER,
    NOW_MS,
    SITES,
    LyingLeaderFederation,
    kind,
)
from tests.support.models import IngestedSite, ingested_site


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> IngestedSite:
    return ingested_site(tmp_path_factory.mktemp("site"), images_per_site=16)


def rejections(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.__dict__["fields"]["reason"] for r in caplog.records if r.msg == "message-rejected"]


# (field, lie, what the follower says, what a node says: a refusal reason, or None where the
# node cannot see the lie, "auth" where it refuses the envelope itself)
ROUND_OPEN_LIES: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("k", {"min_participants": 1}, "requires k >= 3", "k-below-minimum"),
    ("k", {"min_participants": 2}, "requires k >= 3", None),  # the study's k, below agg-2's
    ("expected set", {"expected_nodes": SITES[:2]}, "expected-below-k", "expected-below-k"),
    ("expected set", {"expected_nodes": ("site-1", "site-8", "site-9")},
     "expected-not-in-manifest", "expected-not-in-manifest"),
    ("aggregator ids", {"aggregator_ids": (FOLLOWER, LEADER)}, "in that order", None),
    ("leader id", {"leader_id": FOLLOWER}, "signer is not the message's sender", "auth"),
    ("ring", {"ring": derive_ring_params(1.0, 4)}, "require exactly 10", "ring-outside-caps"),
    ("ring", {"ring": derive_ring_params(10.0, 2)}, "holds sums of 2", "ring-outside-caps"),
    ("ring", {"ring": derive_ring_params(10.0, 4, 2)}, "fraction bits", "ring-outside-caps"),
    ("clip", {"clip_norm": 2.0, "ring": derive_ring_params(10.0, 4)}, "clip-norm-above-study",
     "clip-norm-above-study"),
    ("caps", {"loss_cap": 1e6, "ring": derive_ring_params(1e6, 4)}, "ring-outside-caps",
     "ring-outside-caps"),
    ("base model", {"base_model_hash": bytes(32)}, "does not hold", "base-model-mismatch"),
    ("deadline", {"deadline_ms": NOW_MS - 1}, "has passed", "deadline-passed"),
]  # fmt: skip


def test_no_lie_in_a_round_open_is_adopted_or_costs_a_node_epsilon(
    tmp_path: Path, data: IngestedSite, caplog: pytest.LogCaptureFixture
) -> None:
    fed = LyingLeaderFederation(tmp_path, data)
    follower = fed.services[FOLLOWER]
    for number, (field, lie, follower_says, node_says) in enumerate(ROUND_OPEN_LIES, start=1):
        announcement = fed.round_open(round=number, **lie)
        payload = fed.as_leader(announcement, check=False)  # the attacker holds agg-1's key
        assert follower.on_message(fed.round_topic(), payload) == [], field
        assert follower.current is None, field  # not adopted: nothing to sum, ever
        assert follower_says in rejections(caplog)[-1], (field, rejections(caplog)[-1])
        if node_says is None:
            continue  # a node joins, but no aggregator holds the round its shares are for
        for site in set(SITES) & set(announcement.expected_nodes):  # the others: not-expected
            if node_says == "auth":
                with pytest.raises(AuthenticationError):
                    fed.answer(site, announcement)
                continue
            answer = fed.answer(site, announcement)
            assert isinstance(answer, Refused) and answer.reason == node_says, (field, answer)
    for site in SITES:
        ledger = fed.nodes[site].ledger
        assert ledger is not None and ledger.rounds == []  # no lie cost anyone epsilon

    # A repeated round number: once a round is held, the same number is refused everywhere.
    genuine = fed.round_open(round=len(ROUND_OPEN_LIES) + 1)
    assert fed.to(FOLLOWER, [Outgoing(fed.round_topic(), fed.as_leader(genuine))]) == []
    assert follower.current is not None and follower.current.announcement == genuine
    refused = fed.answer("site-1", fed.round_open(round=1))  # site-1 answered round 1 already
    assert isinstance(refused, Refused) and refused.reason == "already-answered"
    again = dataclasses.replace(genuine, min_participants=4)
    fed.to(FOLLOWER, [Outgoing(fed.round_topic(), fed.as_leader(again))])
    assert "not new" in rejections(caplog)[-1]
    assert follower.current.announcement == genuine


def test_no_participant_set_partial_sum_request_or_release_breaks_k_or_gets_accepted(
    tmp_path: Path, data: IngestedSite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fed = LyingLeaderFederation(tmp_path, data)
    leader, follower = fed.services[LEADER], fed.services[FOLLOWER]
    wire = fed.deliver(leader.open_round(SITES))  # an honest RoundOpen, which agg-2 adopts
    assert follower.current is not None
    announcement = follower.current.announcement
    joined = [fed.answer(site, announcement) for site in SITES[:3]]  # site-4 stays away
    assert all(isinstance(j, Joined) for j in joined)
    wire += fed.deliver(m for j in joined for m in j.messages)
    assert fed.services[FOLLOWER].store.held_nodes(announcement.study_id, 1) == SITES[:3]

    fed.clock.now = announcement.deadline_ms / 1000 + 1
    # agg-2 closes collection: its ReceivedSet, held back, then its receipts for the sites
    # (in that order: the outbox sends in order, and the round waits on the ReceivedSet)
    received = follower.tick()
    assert [kind(o) for o in received] == [topics.Kind.RECEIVED, topics.Kind.RECEIPTS]

    fed_id, study = announcement.federation_id, announcement.study_id
    by_a_node = ParticipantSet(fed_id, study, 1, "site-1", SITES[:3])
    lies: list[tuple[str, Outgoing, str]] = [
        ("too small", fed.participants(1, SITES[:2]), "fewer than k=3"),
        ("a node it does not hold", fed.participants(1, SITES), "holds no share from 1"),
        ("an unknown node", fed.participants(1, (*SITES[:3], "site-9")), "not on the round"),
        ("not from the leader", Outgoing(topics.participants_topic(fed_id, study),
                                         seal_envelope(by_a_node, "site-1",
                                                       fed.gov.keys["node-site-1"])),
         "not the round's leader"),
    ]  # fmt: skip
    for what, lie, reason in lies:
        answered = fed.to(FOLLOWER, [lie])
        assert fed.partial_sums(answered) == [], what
        assert reason in rejections(caplog)[-1], (what, rejections(caplog)[-1])

    # The honest end of the round: one partial sum each, one release signed by both.
    wire += fed.deliver([*leader.tick(), *received])
    assert [kind(o) for o in wire].count(topics.Kind.PARTIAL) == 2
    assert follower.current is not None and follower.current.state.stage is Stage.RELEASED
    releases = [o for o in wire if kind(o) is topics.Kind.RELEASE and getattr(o, "retain", False)]
    (final,) = [m for m in map(fed.open_message, releases) if isinstance(m, ModelRelease)]
    verify_release(final, fed.roster.aggregator_signing)  # the positive control

    # A second set, after the sum: refused, whatever it is.
    for second in (SITES[:3], SITES[:2]):
        assert fed.partial_sums(fed.to(FOLLOWER, [fed.participants(1, second)])) == []
        assert "already published in this round" in rejections(caplog)[-1]

    # Releases: one signature only, or a model not built from the agreed aggregate.
    leader_only = dataclasses.replace(final, signatures=final.signatures[:1])
    assert [s for s, _ in leader_only.signatures] == [LEADER]
    other_model = dataclasses.replace(final, payload=final.payload[:-1] + b"\x00")
    store = ModelStore(tmp_path / "node-models", fed_id, study, None)
    for forged in (leader_only, other_model):
        with pytest.raises(AuthenticationError):
            accept_release(forged.to_bytes(), fed.roster.aggregator_signing, store)
    assert store.versions() == []
    registered = len(follower.registry.list(study))
    follower_note = dataclasses.replace(final, round=2, signatures=final.signatures[:1])
    payload = seal_envelope(follower_note, LEADER, fed.gov.keys[LEADER])
    follower.on_message(topics.release_topic(fed_id, study), payload)
    assert len(follower.registry.list(study)) == registered  # nothing it did not compute
