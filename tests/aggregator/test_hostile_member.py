"""Attacks by a hostile member (issue 18, attack 5): a site that tells the two aggregators
different things, so that their model cards differ, their signatures cannot meet and the
round stalls until its timeout. Real AggregatorService objects, real keys, real HPKE and
Ed25519 (the in-memory loop of test_service routes like the broker's ACL).

- Two different epsilons, one to each aggregator: each aggregator commits to the node's
  sealed statement in its ReceivedSet; the leader leaves the node out, like a dropout, and
  its audit record names it. The round releases one model over the honest sites.
- Two different privacy-audit reports for one candidate: whichever order they reach the
  aggregators in, the release is held at both (reason `audit-conflict`); never two cards.
"""

from __future__ import annotations

from pathlib import Path

from aggregator.daemon import AggregatorDaemon
from aggregator.rounds import Stage
from broker import topics
from tessera.crypto.update_layout import pack_update
from tessera.governance.audit import AuditLog, read_entries
from tessera.wire.messages import ModelRelease, ReceivedSet, RoundAbort
from tests.aggregator.test_service import (
    AGGREGATORS,
    EPSILON,
    LEADER,
    N_PARAMS,
    NODES,
    STUDY,
    Federation,
    Outgoing,
    run_round,
)
from tests.aggregator.test_service_audit import LIMIT, audited_round, candidate, report
from tests.support.shares import node_envelopes, node_update

LIAR = "site-a"


def split_statements(fed: Federation) -> None:
    """Open a round; every node sends its shares, LIAR states epsilon 0.5 to the leader and
    7.0 to the follower (the same shares, only the statement differs)."""
    fed.deliver(fed.services[LEADER].open_round(NODES))
    for seed, node in enumerate(NODES):
        if node != LIAR:
            fed.deliver(fed.shares(node, seed)[1].values())
            continue
        delta, weight, loss = node_update(seed, N_PARAMS)
        vector = pack_update(delta, weight, loss)
        stated = {"agg-1": 0.5, "agg-2": 7.0}
        envelopes = node_envelopes(fed.announcement(), node, vector, fed.hpke_public, stated)
        fed.deliver(fed.signed_share(env, node) for env in envelopes.values())


def test_a_site_stating_two_epsilons_is_left_out_and_the_round_still_releases(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path)
    split_statements(fed)
    # every node reached both aggregators: collection closes without waiting
    for agg in AGGREGATORS:
        assert fed.stage(agg) is Stage.RELEASED, fed.stage(agg)
        current = fed.services[agg].current
        assert current is not None and current.state.participants == tuple(NODES[1:])
    leader = fed.services[LEADER].current
    assert leader is not None and leader.left_out == (LIAR,)  # what the audit record names
    cards = [fed.services[a].registry.latest(STUDY) for a in AGGREGATORS]
    assert cards[0] is not None and cards[1] is not None
    assert cards[0].card == cards[1].card
    assert cards[0].card["privacy"]["epsilon_per_site"] == {n: EPSILON[n] for n in NODES[1:]}
    # the follower's ReceivedSet committed to what it holds, and the liar's commitment differs
    (received,) = [m for _, m in fed.published(ReceivedSet, on=(topics.Kind.RECEIVED,))]
    assert isinstance(received, ReceivedSet) and received.node_ids == NODES
    assert len(set(received.statement_hashes)) == len(NODES)  # salted: all different


def test_the_leaders_audit_log_names_the_node_it_left_out(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    split_statements(fed)
    # the daemon's own audit step, over the leader's real service (no MQTT needed for it)
    daemon = object.__new__(AggregatorDaemon)
    daemon.service, daemon._audited = fed.services[LEADER], None
    daemon.store = fed.services[LEADER].store
    daemon.audit = AuditLog.open(tmp_path / "leader-audit.log")
    daemon._audit_progress()
    (entry,) = [
        e for e in read_entries(tmp_path / "leader-audit.log") if e.kind == "participant-set"
    ]
    assert entry.fields["left_out_statement_mismatch"] == [LIAR]
    assert entry.fields["nodes"] == list(NODES[1:])


def test_an_honest_node_commitment_matches_at_both_aggregators(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    fed.deliver(fed.services[LEADER].open_round(NODES))
    for seed, node in enumerate(NODES):
        fed.deliver(fed.shares(node, seed)[1].values())
    leader = fed.services[LEADER].current
    assert leader is not None and leader.left_out == ()
    assert leader.received["agg-1"] == leader.received["agg-2"]
    assert all(fed.stage(a) is Stage.RELEASED for a in AGGREGATORS)


def conflicting_reports(fed: Federation) -> tuple[Outgoing, Outgoing]:
    cand = audited_round(fed)
    fed.deliver([report(fed, site, cand) for site in NODES[:-1]])
    last = NODES[-1]
    return report(fed, last, cand, tpr=0.01), report(fed, last, cand, tpr=0.02)


def assert_held_everywhere(fed: Federation, tmp_path: Path) -> None:
    for agg in AGGREGATORS:
        assert fed.stage(agg) is Stage.ABORTED, (agg, fed.stage(agg))
        current = fed.services[agg].current
        assert current is not None and "audit-conflict" in (current.state.abort_reason or "")
        assert fed.services[agg].registry.latest(STUDY) is None
    assert not fed.published(ModelRelease, on=(topics.Kind.RELEASE,))[1:]  # at most a note
    assert [m for _, m in fed.published(RoundAbort)]
    held = [
        e
        for agg in AGGREGATORS
        for e in read_entries(tmp_path / agg / "audit.log")
        if e.kind == "release" and e.fields.get("reason") == "audit-conflict"
    ]
    assert held and all(e.fields["sites"] == [NODES[-1]] for e in held)


def test_two_reports_delivered_in_opposite_orders_hold_the_release_at_both(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path, audit_limit=LIMIT)
    first, second = conflicting_reports(fed)
    leader, follower = (fed.services[a] for a in AGGREGATORS)
    # the leader sees one report, the follower the other (each completes its gate) ...
    fed.deliver(leader.on_message(first.topic, first.payload))
    fed.deliver(follower.on_message(second.topic, second.payload))
    # ... and then, as the broker delivers every publication to both, the other one
    fed.deliver(leader.on_message(second.topic, second.payload))
    fed.deliver(follower.on_message(first.topic, first.payload))
    assert_held_everywhere(fed, tmp_path)


def test_two_reports_in_the_same_order_never_give_two_cards(tmp_path: Path) -> None:
    fed = Federation(tmp_path, audit_limit=LIMIT)

    def to_follower(out: Outgoing) -> bool:
        topic = topics.parse(out.topic)
        return topic.kind is topics.Kind.PARTIAL and topic.aggregator == "agg-2"

    # the follower is still combining when both reports arrive; the leader is not
    run_round(fed, skip=set(), drop=to_follower)
    cand = candidate(fed)
    fed.deliver([report(fed, site, cand) for site in NODES[:-1]])
    last = NODES[-1]
    fed.deliver([report(fed, last, cand, tpr=0.01), report(fed, last, cand, tpr=0.02)])
    fed.deliver(fed.lost)
    assert_held_everywhere(fed, tmp_path)


def test_a_repeated_identical_report_is_no_conflict(tmp_path: Path) -> None:
    fed = Federation(tmp_path, audit_limit=LIMIT)
    first, _ = conflicting_reports(fed)
    fed.deliver([first, first])  # a QoS 1 redelivery: the same bytes again
    assert all(fed.stage(a) is Stage.RELEASED for a in AGGREGATORS)
    cards = [fed.services[a].registry.latest(STUDY) for a in AGGREGATORS]
    assert cards[0] is not None and cards[1] is not None and cards[0].card == cards[1].card


def test_each_aggregator_tells_the_sites_the_commitments_it_holds_and_no_more(
    tmp_path: Path,
) -> None:
    # issue 19, point 8: site-d's share never reached agg-2 (the broker dropped it). Each
    # aggregator's receipts list the commitments of the statements it holds, without node
    # ids: site-d finds its own at agg-1 and not at agg-2.
    fed = Federation(tmp_path)
    run_round(fed, skip={("site-d", "agg-2")})
    fed.past_deadline()
    leader = fed.services[LEADER].current
    assert leader is not None
    held_by = {a: fed.published_to_sites(a) for a in AGGREGATORS}
    site_d = leader.received[LEADER]["site-d"]
    assert site_d in held_by["agg-1"].commitments
    assert site_d not in held_by["agg-2"].commitments
    (received,) = [m for _, m in fed.published(ReceivedSet, on=(topics.Kind.RECEIVED,))]
    assert isinstance(received, ReceivedSet)
    assert held_by["agg-2"].commitments == tuple(sorted(received.statement_hashes))
    assert held_by["agg-1"].commitments == tuple(sorted(leader.received[LEADER].values()))
    assert all(NODES[0].encode() not in out.payload for out in fed.wire
               if topics.parse(out.topic).kind is topics.Kind.RECEIPTS)  # fmt: skip
