"""The node's candidate-audit step, tested as test_participation tests the round step: a real
candidate signed with the leader's key, the real membership-inference audit on ingested
synthetic DICOM, and the signed report checked the way the aggregators check it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from broker.topics import audit_topic
from node.privacy.attacks import AuditConfig, PrivacyAccountingError
from node.privacy.site_audit import SiteData, audit_at_site
from node.round.candidate import (
    AuditFailed,
    CandidateContext,
    CandidateIgnored,
    CandidateRefused,
    JoinedRounds,
    Reported,
    audit_candidate,
)
from node.setup import study_preprocess
from node.training.federated import SiteTraining
from tessera.governance.audit import AuditLog, read_entries
from tessera.governance.privacy_report import report_from_json, verify_report
from tessera.models.study import StudyModel
from tessera.models.weights import weights_bytes
from tessera.wire.envelopes import seal_envelope
from tessera.wire.messages import ModelRelease, RoundOpen
from tessera.wire.release import ReleaseBundle, build_release, sign_release
from tests.node.test_participation import AGGREGATORS, SITE, round_open
from tests.node.test_participation import make_ctx as participation_ctx
from tests.support.governance import STUDY_ID, Federation, build_federation
from tests.support.models import LABELS, PREPROCESS, IngestedSite, ingested_site

LEADER = "agg-1"
# Small enough for a unit test: 2 shadow models of 1 epoch, over the 8 held-out images.
BUDGET = AuditConfig(shadow_models=2, shadow_epochs=1, bootstrap=10, min_examples=4)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """A federation whose study trains small-cnn-v1 on the test cache's images and labels."""
    terms = {
        "labels": list(LABELS),
        "architectures": ["small-cnn-v1"],
        "preprocessing": {"size": PREPROCESS.size, "channels": PREPROCESS.channels},
    }
    return build_federation(tmp_path_factory.mktemp("fed"), study=terms)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> IngestedSite:
    """32 labelled train images (members) and 8 test images (non-members) in the cache."""
    return ingested_site(tmp_path_factory.mktemp("site"), images_per_site=40)


@pytest.fixture(scope="module")
def model(fed: Federation) -> StudyModel:
    study = fed.manifest.study(STUDY_ID)
    assert study is not None
    return StudyModel.from_study(fed.manifest.federation_id, study, "small-cnn-v1")


@pytest.fixture(scope="module")
def joined(
    fed: Federation, data: IngestedSite, tmp_path_factory: pytest.TempPathFactory
) -> RoundOpen:
    """Round 1 as this site joined it: from the genesis model (version 0)."""
    ctx = participation_ctx(fed, data, tmp_path_factory.mktemp("round"))
    return round_open(ctx, model_version=0)


class RecordingAuditor:
    """The real `audit_at_site`, counting calls: a refused candidate must never reach it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return audit_at_site(*args)


def make_ctx(
    fed: Federation, data: IngestedSite, model: StudyModel, tmp_path: Path, **changes: Any
) -> CandidateContext:
    site = SiteData(SITE, fed.manifest.federation_id, STUDY_ID, data.state_dir,
                    study_preprocess(model))  # fmt: skip
    ctx = CandidateContext(
        site=site, leader_id=LEADER,
        aggregator_signing_keys={a: fed.keys[a].public_key() for a in AGGREGATORS},
        signing_key=fed.keys[f"node-{SITE}"], model=model,
        training=SiteTraining(batch_size=8, device="cpu"), budget=BUDGET, joined=JoinedRounds(),
        audit=AuditLog.open(tmp_path / "audit.log", counts_only=True), run_audit=RecordingAuditor(),
    )  # fmt: skip
    return dataclasses.replace(ctx, **changes)


def candidate(
    fed: Federation, model: StudyModel, of: RoundOpen, *, signers: tuple[str, ...] = (LEADER,),
    **changes: Any,
) -> ModelRelease:  # fmt: skip
    """The leader's candidate for round `of`: the study's model, parent the round's base."""
    parent = bytes(32) if of.model_version == 0 else of.base_model_hash
    bundle = ReleaseBundle(weights_bytes(model.genesis()), b"onnx export", b'{"card": 1}')
    fields: dict[str, Any] = dict(federation_id=of.federation_id, study_id=of.study_id,
                                  round_=of.round, version=of.model_version + 1,
                                  parent_hash=parent, bundle=bundle)  # fmt: skip
    fields.update(changes)
    release = build_release(**fields)
    for signer in signers:
        release = sign_release(release, signer, fed.keys[signer])
    return release


def sent(fed: Federation, release: ModelRelease, sender: str = LEADER) -> bytes:
    return seal_envelope(release, sender, fed.keys[sender])


def entries(ctx: CandidateContext) -> list[tuple[str, dict[str, Any]]]:
    return [(entry.kind, dict(entry.fields)) for entry in read_entries(ctx.audit.path)]


def test_a_joined_rounds_candidate_is_audited_once_and_the_signed_report_verifies(
    fed: Federation, data: IngestedSite, model: StudyModel, joined: RoundOpen, tmp_path: Path
) -> None:
    ctx = make_ctx(fed, data, model, tmp_path)
    ctx.joined.remember(joined)
    release = candidate(fed, model, joined)
    outcome = audit_candidate(sent(fed, release), ctx)
    assert isinstance(outcome, Reported) and outcome.round == joined.round
    assert outcome.message.topic == audit_topic(joined.federation_id, STUDY_ID, SITE)
    report = report_from_json(outcome.message.payload)
    verify_report(report, fed.manifest)  # signed with this site's node key from the manifest
    assert (report.site_id, report.model_round, report.model_version) == (SITE, 1, 1)
    assert report.model_hash == release.model_hash
    assert (report.members, report.non_members) == (32, 8)
    assert report.accountant_epsilon is None  # no DP round in this site's ledger
    assert outcome.figures == report.headline()
    ((kind, fields),) = entries(ctx)
    assert kind == "privacy-audit" and fields == {
        "study_id": STUDY_ID, "round": 1, "version": 1, "model_hash": release.model_hash.hex(),
        "outcome": "reported", **report.headline(),
    }  # fmt: skip
    # The same candidate again (a QoS 1 redelivery): ignored, not audited twice.
    again = audit_candidate(sent(fed, release), ctx)
    assert again == CandidateIgnored(1)
    assert ctx.run_audit.calls == 1  # type: ignore[attr-defined]
    assert len(entries(ctx)) == 1


def refusals(fed: Federation, model: StudyModel, of: RoundOpen) -> dict[str, tuple[bytes, str]]:
    """Candidates a site must refuse, unaudited: each with the error it is refused for."""
    genuine = candidate(fed, model, of)
    flipped = bytearray(sent(fed, genuine))
    flipped[-70] ^= 1  # one byte of the message body
    return {
        "sent-by-a-follower": (sent(fed, genuine, sender="agg-2"), "AuthenticationError"),
        "signed-by-a-follower": (sent(fed, candidate(fed, model, of, signers=("agg-2",))),
                                 "AuthenticationError"),
        "a-release-not-a-candidate": (sent(fed, candidate(fed, model, of,
                                                          signers=AGGREGATORS)),
                                      "AuthenticationError"),
        "another-study": (sent(fed, candidate(fed, model, of, study_id="other-study")),
                          "AuthenticationError"),
        "tampered": (bytes(flipped), "AuthenticationError"),
        "garbage": (b"TSRE garbage", "CodecError"),
        "wrong-parent": (sent(fed, candidate(fed, model, of, parent_hash=b"\x01" * 32)),
                         "not-from-our-base"),
    }  # fmt: skip


REFUSED = ("sent-by-a-follower", "signed-by-a-follower", "a-release-not-a-candidate",
           "another-study", "tampered", "garbage", "wrong-parent")  # fmt: skip


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_candidate_is_not_audited_and_the_round_stays_open(
    fed: Federation, data: IngestedSite, model: StudyModel, joined: RoundOpen, tmp_path: Path,
    case: str,
) -> None:  # fmt: skip
    ctx = make_ctx(fed, data, model, tmp_path)
    ctx.joined.remember(joined)
    payload, error = refusals(fed, model, joined)[case]
    assert audit_candidate(payload, ctx) == CandidateRefused(error)
    assert ctx.run_audit.calls == 0  # type: ignore[attr-defined]
    assert entries(ctx) == []  # forgeries cannot fill the log
    assert ctx.joined.get(joined.round) == joined  # the leader's real candidate is still due


def test_a_candidate_of_a_round_not_joined_is_ignored(
    fed: Federation, data: IngestedSite, model: StudyModel, joined: RoundOpen, tmp_path: Path
) -> None:
    ctx = make_ctx(fed, data, model, tmp_path)
    ctx.joined.remember(joined)
    other = dataclasses.replace(joined, round=2)
    assert audit_candidate(sent(fed, candidate(fed, model, other)), ctx) == CandidateIgnored(2)
    assert ctx.run_audit.calls == 0 and entries(ctx) == []  # type: ignore[attr-defined]


def test_a_later_rounds_candidate_must_descend_from_that_rounds_base(
    fed: Federation, data: IngestedSite, model: StudyModel, joined: RoundOpen, tmp_path: Path
) -> None:
    later = dataclasses.replace(joined, round=2, model_version=1)  # from version 1, not genesis
    # The default budget fails fast here (8 non-members): enough to see the audit was reached.
    ctx = make_ctx(fed, data, model, tmp_path, budget=AuditConfig(shadow_models=2))
    ctx.joined.remember(later)
    from_genesis = sent(fed, candidate(fed, model, later, parent_hash=bytes(32)))
    assert audit_candidate(from_genesis, ctx) == CandidateRefused("not-from-our-base")
    outcome = audit_candidate(sent(fed, candidate(fed, model, later)), ctx)
    assert isinstance(outcome, AuditFailed) and outcome.round == 2


def test_a_failed_audit_sends_nothing_and_is_audited_once(
    fed: Federation, data: IngestedSite, model: StudyModel, joined: RoundOpen, tmp_path: Path
) -> None:
    # The default budget needs 20 non-members; the cache holds 8.
    ctx = make_ctx(fed, data, model, tmp_path, budget=AuditConfig(shadow_models=2))
    ctx.joined.remember(joined)
    payload = sent(fed, candidate(fed, model, joined))
    outcome = audit_candidate(payload, ctx)
    assert isinstance(outcome, AuditFailed) and (outcome.round, outcome.outcome) == (1, "failed")
    assert "at least 20" in outcome.detail
    ((kind, fields),) = entries(ctx)
    assert kind == "privacy-audit" and fields["outcome"] == "failed"
    assert fields["detail"] == outcome.detail
    assert audit_candidate(payload, ctx) == CandidateIgnored(1)  # audited once, whatever came


def test_an_audit_above_the_accountants_epsilon_is_an_accounting_error(
    fed: Federation, data: IngestedSite, model: StudyModel, joined: RoundOpen, tmp_path: Path
) -> None:
    def proves_too_much(*_args: Any) -> Any:
        raise PrivacyAccountingError("empirical epsilon 5 is above the accountant's 1")

    ctx = make_ctx(fed, data, model, tmp_path, run_audit=proves_too_much)
    ctx.joined.remember(joined)
    outcome = audit_candidate(sent(fed, candidate(fed, model, joined)), ctx)
    assert outcome == AuditFailed(1, "accounting-error", "empirical epsilon 5 is above the "
                                  "accountant's 1")  # fmt: skip
    ((kind, fields),) = entries(ctx)
    assert (kind, fields["outcome"]) == ("privacy-audit", "accounting-error")


def test_only_the_newest_joined_rounds_are_kept(joined: RoundOpen) -> None:
    rounds = JoinedRounds(kept=2)
    for number in (1, 2, 3):
        rounds.remember(dataclasses.replace(joined, round=number))
    assert [rounds.get(n) is not None for n in (1, 2, 3)] == [False, True, True]
    rounds.take(3)
    assert rounds.get(3) is None
