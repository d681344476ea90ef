"""Issue 18, attack 1, with real processes over a real broker (Mosquitto, mutual TLS): the
leader equivocates to recover one hospital's exact update.

The leader is the attacker (`tests/support/impostor_leader.py`): its daemon does not run;
the test holds the leader's bundle, connects as the leader and signs, for round 1 on the
genesis model with the ring the study's terms require, `RoundOpen(k=1)` and then
`RoundOpen(k=3)`, the study's k being 3. The real follower and two real nodes (site-a,
site-b) run through both; the victim (site-c) starts once both were published and sees
only the retained k=3 one, so it joins and sends its shares. Then the leader asks for the
sum over `{victim}` alone. Before the fix the follower adopted the k=1 announcement, the
nodes refused it and joined the k=3 one (whose shares fit both), and the follower sent the
leader a partial sum over the victim alone: with its own share the leader has the victim's
update. Now the follower refuses k=1 (logged), never sums fewer than k, and a node answers
one RoundOpen per round number, charging its privacy ledger for none it refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.e2e import LiveFederation, audit_entries, epsilon_agreement
from support.impostor_leader import ImpostorLeader

from node.demo.federation import FederationSpec
from tessera.observability.events import Event

FOLLOWER = "agg-ngo"  # the leader, agg-uni, is the attacker: its daemon never starts
BYSTANDERS, VICTIM = ("site-a", "site-b"), "site-c"
K = 3
SPEC = FederationSpec(
    sites=(*BYSTANDERS, VICTIM),
    federation_id="equivocation-fed",
    min_participants=K,
    round={"collect_timeout_s": 240, "agreement_timeout_s": 60, "start_wait_s": 60,
           "pause_s": 3, "max_rounds": 1, "local_epochs": 1},
    training={"batch_size": 16, "noise_multiplier": 0.8},
)  # fmt: skip


def rejected(live: LiveFederation, kind: str) -> list[dict[str, object]]:
    """The messages on `kind`'s topic (ROUND, PARTICIPANTS) the follower refused, logged."""
    return [e for e in live.find(FOLLOWER, Event.MESSAGE_REJECTED) if e.get("kind") == kind]


def answers(live: LiveFederation, site: str) -> list[dict[str, object]]:
    """The node's answers to round 1, as it logged them (refused or joined)."""
    return live.find(site, Event.ROUND_REFUSED, round=1) + live.find(
        site, Event.ROUND_JOINED, round=1
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_equivocating_leader_gets_no_partial_sum_over_one_site(tmp_path: Path) -> None:
    with LiveFederation(tmp_path, SPEC) as live, ImpostorLeader(live) as leader:
        live.start_all([FOLLOWER, *BYSTANDERS])
        live.wait_for(FOLLOWER, Event.AGGREGATOR_STARTED, timeout=120)
        for site in BYSTANDERS:
            live.wait_for(site, Event.NODE_STARTED, timeout=120)
        weak, strong = leader.round_open(1, min_participants=1), leader.round_open(1)
        assert strong.min_participants == K and (weak.ring, weak.round) == (strong.ring, 1)

        leader.announce(weak)
        for site in BYSTANDERS:
            live.wait_for(site, Event.ROUND_REFUSED, timeout=60, round=1)
        live.wait_until(
            lambda: rejected(live, "ROUND") or audit_entries(live.state(FOLLOWER), "round-opened"),
            "the follower's answer to RoundOpen(k=1)",
            60,
            watch=[FOLLOWER],
        )

        leader.announce(strong)  # retained: it replaces the k=1 one for a node that starts now
        live.wait_until(
            lambda: all(len(answers(live, site)) >= 2 for site in BYSTANDERS),
            "the bystanders' answers to RoundOpen(k=3)",
            120,
            watch=BYSTANDERS,
        )
        live.start(VICTIM)
        live.wait_for(VICTIM, Event.ROUND_JOINED, timeout=180, round=1)
        live.wait_until(
            lambda: VICTIM in live.held_shares(FOLLOWER, 1),
            "the victim's share at the follower",
            60,
            watch=[FOLLOWER],
        )

        leader.participants(1, [VICTIM])
        live.wait_until(
            lambda: leader.partial_sums() or rejected(live, "PARTICIPANTS"),
            "the follower's answer to ParticipantSet {victim}",
            60,
            watch=[FOLLOWER],
        )

        # No partial sum over fewer than k, whatever the leader says.
        sums = leader.partial_sums()
        assert not sums, (
            f"the follower sent the leader {len(sums)} partial sum(s) for round 1 after "
            f"ParticipantSet {{{VICTIM}}}: with its own share the leader has {VICTIM}'s update"
        )
        (refused_set,) = rejected(live, "PARTICIPANTS")
        assert f"fewer than k={K}" in str(refused_set["reason"]), refused_set
        assert not audit_entries(live.state(FOLLOWER), "participant-set")

        # The follower refused the k=1 announcement and holds the k=3 one.
        adopted = audit_entries(live.state(FOLLOWER), "round-opened")
        opened = [(e["round"], e["min_participants"]) for e in adopted]
        assert opened == [(1, K)], f"the follower adopted {opened} (round, k)"
        refused_open = rejected(live, "ROUND")
        assert refused_open, "the follower logged no refusal of RoundOpen(k=1)"
        assert f"asks for k=1, this aggregator requires k >= {K}" in str(refused_open[0]["reason"])

        # A node answers one RoundOpen per round number, and pays for none it refused.
        for site in BYSTANDERS:
            refused = audit_entries(live.state(site), "round-refused")
            refusals = [(e["round"], e["reason"]) for e in refused]
            assert refusals == [(1, "k-below-minimum"), (1, "already-answered")], (site, refusals)
            assert not audit_entries(live.state(site), "round-joined"), site
            assert not audit_entries(live.state(site), "epsilon-spent"), site
            assert epsilon_agreement(live.state(site), SPEC.study_id) == (0.0, 0.0), site
        assert [e["round"] for e in audit_entries(live.state(VICTIM), "round-joined")] == [1]
        assert not audit_entries(live.state(VICTIM), "round-refused")
        spent, audited = epsilon_agreement(live.state(VICTIM), SPEC.study_id)
        assert spent > 0 and spent == pytest.approx(audited)
