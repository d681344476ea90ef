"""The release gate inside the round (a study that requires a privacy audit), with the two
services and the in-memory loop of test_service: the candidate goes out signed by the
leader alone, the sites' signed reports come back, and the release follows only when every
participant reported within the study's limit. Also: a follower that has sent its
signature note waits for the leader's decision instead of timing out on its own.

The audits themselves (shadow models, attacks) are tested in tests/node/test_privacy_audit.py
and end to end in tests/e2e/test_e2e_privacy_gate.py; here the reports are built by hand."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from aggregator.model_card import card_from_bytes
from aggregator.rounds import Stage
from broker import topics
from tessera.errors import AuthenticationError
from tessera.governance.audit import read_entries
from tessera.governance.privacy_report import AttackFigures, PrivacyAuditReport, Rate, sign_report
from tessera.observability.events import Event
from tessera.wire.messages import ModelRelease, RoundAbort
from tessera.wire.release import ReleaseBundle, verify_candidate, verify_release
from tests.aggregator.test_service import (
    AGGREGATORS,
    EPSILON,
    FED,
    LEADER,
    NODES,
    STUDY,
    Federation,
    Outgoing,
    events,
    kind_of,
    run_round,
)

LIMIT = 0.05


def audited_round(fed: Federation) -> ModelRelease:
    """Run a round in which every node reports to both aggregators (so it closes early,
    without waiting for the deadline); the candidate."""
    run_round(fed, skip=set())
    return candidate(fed)


def candidate(fed: Federation) -> ModelRelease:
    """The candidate: one identical copy to each participant, on that site's own topic."""
    copies = fed.published(ModelRelease, on=(topics.Kind.CANDIDATE,))
    assert sorted(topics.parse(out.topic).node or "" for out, _ in copies) == sorted(NODES)
    assert len({out.payload for out, _ in copies}) == 1
    published = copies[0][1]
    assert isinstance(published, ModelRelease)
    return published


def report(
    fed: Federation, site: str, of: ModelRelease, tpr: float = 0.01, signer: str | None = None
) -> Outgoing:
    """`site`'s signed audit report of the candidate `of`, on `site`'s audit topic."""
    rate = Rate(0.52, 0.47, 0.57)
    lira = AttackFigures(rate, rate, Rate(tpr, 0.0, min(1.0, tpr + 0.02)), rate, 0.2)
    loss = AttackFigures(rate, rate, Rate(0.0, 0.0, 0.01), rate, 0.0)
    document = PrivacyAuditReport(
        federation_id=FED, study_id=STUDY, site_id=site, model_version=of.version,
        model_round=of.round, model_hash=of.model_hash, members=200, non_members=50,
        shadow_models=4, shadow_epochs=1, bootstrap=50, confidence=0.95,
        attacks={"lira": lira, "loss": loss}, accountant_epsilon=EPSILON[site], delta=1e-5,
    )  # fmt: skip
    signed = sign_report(document, fed.node_keys[signer or site])
    return Outgoing(topics.audit_topic(FED, STUDY, site), signed.to_json())


def released_card(fed: Federation) -> dict[str, object]:
    ((_, final),) = fed.published(ModelRelease, on=(topics.Kind.RELEASE,))[-1:]
    assert isinstance(final, ModelRelease)
    bundle = verify_release(final, fed.agg_public)
    return card_from_bytes(bundle.card)


def test_the_release_waits_for_every_report_and_carries_the_figures(tmp_path: Path) -> None:
    fed = Federation(tmp_path, audit_limit=LIMIT)
    cand = audited_round(fed)
    assert all(fed.stage(agg) is Stage.AUDITING for agg in AGGREGATORS)
    # The candidate: signed by the leader alone, so no node can take it for a release.
    bundle = verify_candidate(cand, LEADER, fed.agg_public[LEADER])
    assert isinstance(bundle, ReleaseBundle) and "privacy_audit" not in card_from_bytes(bundle.card)
    with pytest.raises(AuthenticationError):
        verify_release(cand, fed.agg_public)
    assert not fed.published(ModelRelease, on=(topics.Kind.RELEASE,))

    for site in NODES[:-1]:
        fed.deliver([report(fed, site, cand)])
    assert all(fed.stage(agg) is Stage.AUDITING for agg in AGGREGATORS)  # one still missing
    fed.deliver([report(fed, NODES[-1], cand)])

    assert all(fed.stage(agg) is Stage.RELEASED for agg in AGGREGATORS)
    card = released_card(fed)
    audited = card["privacy_audit"]
    assert isinstance(audited, dict) and set(audited["per_site"]) == set(NODES)
    assert audited["per_site"]["site-a"]["tpr_at_0_1pct_fpr"] == 0.01
    assert audited["per_site"]["site-b"]["accountant_epsilon"] == EPSILON["site-b"]
    assert card["privacy"] == {"epsilon_per_site": EPSILON}
    # the release is the candidate's model: same weights, same ONNX export, new card
    final = fed.published(ModelRelease, on=(topics.Kind.RELEASE,))[-1][1]
    assert isinstance(final, ModelRelease)
    assert (final.model_hash, final.onnx_hash) == (cand.model_hash, cand.onnx_hash)
    assert final.card_hash != cand.card_hash
    for service in fed.services.values():
        latest = service.registry.latest(STUDY)
        assert latest is not None and latest.record.model_hash == cand.model_hash


def test_a_site_over_the_limit_holds_the_release(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = Federation(tmp_path, audit_limit=LIMIT)
    cand = audited_round(fed)
    fed.deliver([report(fed, site, cand) for site in NODES[:-1]])
    fed.deliver([report(fed, NODES[-1], cand, tpr=0.2)])  # the attack beats the limit here

    for agg in AGGREGATORS:
        assert fed.stage(agg) is Stage.ABORTED
        current = fed.services[agg].current
        assert current is not None and current.state.abort_reason is not None
        assert "audit-limit-exceeded" in current.state.abort_reason
        assert not any(n in current.state.abort_reason for n in NODES)  # a count, not who
        assert fed.services[agg].registry.latest(STUDY) is None
        (held,) = [e for e in read_entries(tmp_path / agg / "audit.log") if e.kind == "release"]
        assert held.fields["outcome"] == "held" and held.fields["sites"] == [NODES[-1]]
        assert held.fields["limit"] == LIMIT
    assert not fed.published(ModelRelease, on=(topics.Kind.RELEASE,))
    aborts = [m for _, m in fed.published(RoundAbort)]
    assert aborts and all(isinstance(m, RoundAbort) for m in aborts)


def test_a_missing_report_holds_the_release_at_the_audit_deadline(tmp_path: Path) -> None:
    fed = Federation(tmp_path, audit_limit=LIMIT)
    cand = audited_round(fed)
    fed.deliver([report(fed, site, cand) for site in NODES[:-1]])
    current = fed.services[LEADER].current
    assert current is not None and current.audit_deadline_ms is not None
    fed.clock.now = current.audit_deadline_ms / 1000 - 1
    for service in fed.services.values():
        fed.deliver(service.tick())
    assert all(fed.stage(agg) is Stage.AUDITING for agg in AGGREGATORS)  # not yet due
    fed.clock.now += 2
    for service in fed.services.values():
        fed.deliver(service.tick())
    for agg in AGGREGATORS:
        current = fed.services[agg].current
        assert current is not None and current.state.stage is Stage.ABORTED
        assert "audit-missing" in (current.state.abort_reason or "")
    assert not fed.published(ModelRelease, on=(topics.Kind.RELEASE,))


def test_bad_reports_are_refused_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fed = Federation(tmp_path, audit_limit=LIMIT)
    cand = audited_round(fed)
    other = ModelRelease(
        cand.federation_id, cand.study_id, cand.round, cand.version, cand.parent_hash,
        bytes(32), cand.onnx_hash, cand.card_hash, b"",
    )  # fmt: skip
    forged = report(fed, "site-a", cand, signer="site-b")  # site-b's key, site-a's name
    misrouted = Outgoing(topics.audit_topic(FED, STUDY, "site-b"), forged.payload)
    wrong_model = report(fed, "site-a", other)
    oversized = Outgoing(topics.audit_topic(FED, STUDY, "site-a"), b" " * (65 * 1024))
    for bad in (forged, misrouted, wrong_model, oversized):
        before = len(events(caplog, Event.MESSAGE_REJECTED))
        fed.deliver([bad])
        assert len(events(caplog, Event.MESSAGE_REJECTED)) == before + len(AGGREGATORS)
    assert all(fed.stage(agg) is Stage.AUDITING for agg in AGGREGATORS)
    for agg in AGGREGATORS:
        current = fed.services[agg].current
        assert current is not None and current.reports == {}

    fed.deliver([report(fed, site, cand) for site in NODES])
    assert all(fed.stage(agg) is Stage.RELEASED for agg in AGGREGATORS)


def test_a_report_that_overtakes_the_followers_combining_is_kept(tmp_path: Path) -> None:
    fed = Federation(tmp_path, audit_limit=LIMIT)

    def to_follower(out: Outgoing) -> bool:
        topic = topics.parse(out.topic)
        return topic.kind is topics.Kind.PARTIAL and topic.aggregator == "agg-2"

    run_round(fed, skip=set(), drop=to_follower)  # the partial sum to agg-2 is held back
    assert fed.stage(LEADER) is Stage.AUDITING and fed.stage("agg-2") is Stage.COMBINING
    cand = candidate(fed)
    fed.deliver([report(fed, site, cand) for site in NODES])  # before agg-2 has a candidate
    assert fed.stage("agg-2") is Stage.COMBINING
    fed.deliver(fed.lost)
    assert all(fed.stage(agg) is Stage.RELEASED for agg in AGGREGATORS)


def test_a_follower_whose_note_is_out_waits_for_the_leader(tmp_path: Path) -> None:
    """Regression (#6): the follower used to abort at its own agreement timeout while the
    leader, with the follower's note in hand, registered the release: the two registries
    split and no later round could start from a base model both held."""
    fed = Federation(tmp_path)

    def note(out: Outgoing) -> bool:
        return kind_of(out) is topics.Kind.RELEASE

    run_round(fed, skip=set(), drop=note)
    (held,) = fed.lost
    timeout = fed.services[LEADER].config.round.agreement_timeout_s
    fed.clock.now = fed.announcement().deadline_ms / 1000 + timeout + 1
    fed.deliver(fed.services["agg-2"].tick())  # the follower's clock runs out first
    assert fed.stage("agg-2") is Stage.COMBINING
    fed.deliver([held])  # the note reaches the leader, which releases
    assert all(fed.stage(agg) is Stage.RELEASED for agg in AGGREGATORS)
    records = [fed.services[a].registry.latest(STUDY) for a in AGGREGATORS]
    assert records[0] is not None and records[1] is not None
    assert records[0].record.model_hash == records[1].record.model_hash
