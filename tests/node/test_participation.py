"""The node's round step: real signatures, real policy, real DP training on ingested synthetic
DICOM, real HPKE; each aggregator opens its own share and the shares recombine."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.topics import share_topic
from node.privacy.ledger import PrivacyLedger
from node.round.clock import ClockReading
from node.round.participation import (
    PROTOCOL_REASONS,
    Joined,
    ParticipationContext,
    Refused,
    participate,
)
from node.round.policy import SitePolicy
from node.training.federated import SiteTraining, train_for_round
from node.training.trainer import DPSettings
from tessera.crypto.encoding import derive_ring_params
from tessera.crypto.sealing import generate_hpke_key, open_sealed
from tessera.crypto.sharing import Share, ShareContext, add_into, expand
from tessera.crypto.signing import generate_signing_key
from tessera.crypto.update_layout import required_bound, vector_length
from tessera.errors import AuthenticationError, CodecError
from tessera.governance.audit import AuditLog, read_entries
from tessera.models.transfer import apply_transfer_mode, trainable_parameters
from tessera.models.weights import model_hash, state_arrays
from tessera.wire.envelopes import open_envelope_as, require_fields, seal_envelope, share_binding
from tessera.wire.messages import RoundOpen, ShareEnvelope
from tests.support.governance import NOW, STUDY_ID, Federation, build_federation
from tests.support.models import IngestedSite, ingested_site, small_model

SITE = "site-1"
AGGREGATORS = ("agg-1", "agg-2")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return build_federation(tmp_path_factory.mktemp("fed"), n_sites=2, n_aggregators=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> IngestedSite:
    return ingested_site(tmp_path_factory.mktemp("site"), images_per_site=16)


class RecordingTrainer:
    """The real `train_for_round`, counting calls: a refused round must never reach it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return train_for_round(*args)


def make_ctx(
    fed: Federation, data: IngestedSite, tmp_path: Path, **changes: Any
) -> ParticipationContext:
    model, _ = small_model()
    apply_transfer_mode(model, "head")  # only the head's 130 values travel: fast and small
    ctx = ParticipationContext(
        site_id=SITE, signing_key=fed.keys[f"node-{SITE}"], leader_id="agg-1",
        aggregator_signing_keys={a: fed.keys[a].public_key() for a in AGGREGATORS},
        aggregator_hpke_keys={a: fed.hpke_keys[a].public_key() for a in AGGREGATORS},
        manifest=fed.manifest, approvals=[fed.approvals[SITE][STUDY_ID]],
        policy=SitePolicy(site_id=SITE, coordinator_key=fed.coordinator_public),
        architecture="small-cnn-v1", model=model, images=data.images, labels=data.labels,
        site=SiteTraining(batch_size=4, dp=DPSettings(1.0, 1.0)),
        ledger=PrivacyLedger(tmp_path / "privacy.json", STUDY_ID, 8.0, 1e-5),
        audit=AuditLog.open(tmp_path / "audit.log", counts_only=True),
        train=RecordingTrainer(),
    )  # fmt: skip
    return dataclasses.replace(ctx, **changes)


def round_open(ctx: ParticipationContext, **changes: Any) -> RoundOpen:
    n = sum(v.size for v in trainable_parameters(ctx.model).values())
    fields: dict[str, Any] = dict(
        federation_id=ctx.manifest.federation_id, study_id=STUDY_ID, round=1,
        base_model_hash=model_hash(state_arrays(ctx.model)), model_version=1,
        deadline_ms=int(NOW.timestamp() * 1000) + 3_600_000, algorithm="fedavg",
        local_epochs=1, local_steps=0, learning_rate=0.05, prox_mu=0.0, clip_norm=1.0,
        ring=derive_ring_params(required_bound(1.0), max_participants=16), min_participants=2,
        vector_length=vector_length(n), aggregator_ids=AGGREGATORS,
        expected_nodes=(SITE, "site-2"), leader_id="agg-1", weight_cap=100,
    )  # fmt: skip
    fields.update(changes)
    return RoundOpen(**fields)


def signed(fed: Federation, message: RoundOpen) -> bytes:
    return seal_envelope(message, message.leader_id, fed.keys[message.leader_id])


def kinds(ctx: ParticipationContext) -> list[str]:
    return [entry.kind for entry in read_entries(ctx.audit.path)]


def test_a_joined_round_sends_one_share_per_aggregator_that_recombine(
    fed: Federation, data: IngestedSite, tmp_path: Path
) -> None:
    ctx = make_ctx(fed, data, tmp_path)
    announced = round_open(ctx)
    base = model_hash(state_arrays(ctx.model))
    result = participate(signed(fed, announced), ctx, NOW)
    assert isinstance(result, Joined) and result.joined
    assert [m.topic for m in result.messages] == [
        share_topic(announced.federation_id, STUDY_ID, agg, SITE) for agg in AGGREGATORS
    ]
    node_keys = {SITE: fed.keys[f"node-{SITE}"].public_key()}
    share_ctx = ShareContext(announced.federation_id, STUDY_ID, 1, SITE)
    total = np.zeros(announced.vector_length, dtype=announced.ring.dtype)
    for index, (agg, message) in enumerate(zip(AGGREGATORS, result.messages, strict=True)):
        envelope = open_envelope_as(message.payload, ShareEnvelope, node_keys, 1 << 20).message
        require_fields(envelope, federation_id=announced.federation_id, study_id=STUDY_ID,
                       round=1, aggregator_id=agg, node_id=SITE)  # fmt: skip
        binding = share_binding(announced, SITE, agg)
        plain = open_sealed(envelope.sealed, fed.hpke_keys[agg], binding)
        other = AGGREGATORS[1 - index]  # the other aggregator cannot open this share
        with pytest.raises(AuthenticationError):
            open_sealed(
                envelope.sealed, fed.hpke_keys[other], share_binding(announced, SITE, other)
            )
        share = Share.from_bytes(plain, index, announced.ring, announced.vector_length)
        add_into(total, expand(share, share_ctx, announced.vector_length, announced.ring))
    np.testing.assert_array_equal(total, result.update.encoded)
    assert result.update.encoded.any()  # a real update, not zeros
    # DP was charged under the round's number, and the audit agrees with the ledger.
    assert ctx.ledger is not None and [r["round"] for r in ctx.ledger.rounds] == [1]
    assert result.epsilon_spent == pytest.approx(ctx.ledger.spent) and result.epsilon_spent > 0
    assert kinds(ctx) == ["round-joined", "epsilon-spent"]
    assert model_hash(state_arrays(ctx.model)) == base  # the node's own model is untouched
    # The same announcement again (a replay, or a retained message) is refused, untrained.
    again = participate(signed(fed, announced), ctx, NOW)
    assert isinstance(again, Refused) and again.reason == "already-joined"
    assert again.messages == () and ctx.train.calls == 1  # type: ignore[attr-defined]


Change = Callable[[ParticipationContext], tuple[ParticipationContext, dict[str, Any]]]


def ctx_change(**changes: Any) -> Change:
    return lambda ctx: (dataclasses.replace(ctx, **changes), {})


def round_change(**changes: Any) -> Change:
    return lambda ctx: (ctx, changes)


def extra_roster_aggregator(
    ctx: ParticipationContext,
) -> tuple[ParticipationContext, dict[str, Any]]:
    hpke = {**ctx.aggregator_hpke_keys, "agg-3": generate_hpke_key().public_key()}
    signing = {**ctx.aggregator_signing_keys, "agg-3": generate_signing_key().public_key()}
    return dataclasses.replace(ctx, aggregator_hpke_keys=hpke, aggregator_signing_keys=signing), {}


def site_policy(**changes: Any) -> Change:
    return lambda ctx: (
        dataclasses.replace(ctx, policy=dataclasses.replace(ctx.policy, **changes)),
        {},
    )


REFUSALS: list[tuple[str, Change]] = [
    ("dp-required", lambda ctx: (dataclasses.replace(ctx, site=dataclasses.replace(ctx.site,
                                                                                  dp=None)), {})),
    ("wrong-federation", round_change(federation_id="other-federation")),
    ("unapproved-study", ctx_change(approvals=[])),
    ("paused", site_policy(paused=True)),
    ("architecture-not-allowed", ctx_change(architecture="vit-huge-v1")),
    ("k-below-minimum", round_change(min_participants=1)),
    ("clip-norm-above-study", round_change(clip_norm=2.0)),
    ("max-rounds", round_change(round=21)),
    ("budget-exhausted", site_policy(max_epsilon=0.01)),
    ("bad-terms", round_change(clip_norm=0.0)),
    ("aggregators-not-in-roster", extra_roster_aggregator),
    ("not-expected", round_change(expected_nodes=("site-2",))),
    ("deadline-passed", round_change(deadline_ms=int(NOW.timestamp() * 1000) - 1)),
    # Issue 19: a clock measured further from the leader's than the node tolerates.
    ("clock-skew", ctx_change(clock=ClockReading(offset_s=600.4, tolerated_s=120.0))),
    ("base-model-mismatch", round_change(base_model_hash=bytes(32))),
    ("not-enough-data", lambda ctx: (dataclasses.replace(ctx, images=ctx.images[:1],
                                                         labels=ctx.labels[:1]), {})),
    # Attack 3 of issue #18: rounds that can never release must not cost epsilon.
    ("expected-below-k", round_change(expected_nodes=(SITE,))),
    ("expected-not-in-manifest", round_change(expected_nodes=(SITE, "site-9"))),
    ("ring-outside-caps", round_change(ring=derive_ring_params(0.5, 16))),  # cannot encode
    ("ring-outside-caps", round_change(ring=derive_ring_params(1e6, 16, 8), loss_cap=1e6)),
    ("ring-outside-caps", round_change(ring=derive_ring_params(required_bound(1.0), 1))),
    # Issue 19, point 9: terms under which an update can round to all zeros cost no epsilon.
    ("update-unrepresentable", round_change(weight_cap=2**15)),  # 1/cap below 2 bits at 16
    ("update-unrepresentable", round_change(weight_cap=16_000, clip_norm=0.1)),  # too small
]  # fmt: skip


@pytest.mark.parametrize(("reason", "change"), REFUSALS, ids=[r for r, _ in REFUSALS])
def test_every_refusal_sends_nothing_trains_nothing_and_is_audited(
    fed: Federation, data: IngestedSite, tmp_path: Path, reason: str, change: Change
) -> None:
    ctx, round_changes = change(make_ctx(fed, data, tmp_path))
    result = participate(signed(fed, round_open(ctx, **round_changes)), ctx, NOW)
    assert isinstance(result, Refused) and not result.joined
    assert result.reason == reason and result.messages == ()
    assert ctx.train.calls == 0  # type: ignore[attr-defined]
    assert ctx.ledger is not None and ctx.ledger.rounds == []  # no epsilon spent
    (entry,) = read_entries(ctx.audit.path)
    assert entry.kind == "round-refused" and entry.fields["reason"] == reason
    assert entry.fields["study_id"] == STUDY_ID and entry.fields["round"] >= 1
    if reason == "clock-skew":
        assert result.detail.startswith("your clock is 600 s ahead of the leader's (")
        assert "NTP" in result.detail


def test_every_protocol_reason_has_a_refusal_test() -> None:
    tested_apart = {"already-joined", "already-answered", "ledger-behind"}
    assert set(PROTOCOL_REASONS) - tested_apart <= {r for r, _ in REFUSALS}


def test_a_ledger_behind_its_audit_log_refuses_before_anything_else(
    fed: Federation, data: IngestedSite, tmp_path: Path
) -> None:
    """Issue #19, point 4: the audit log records a charge the ledger does not hold (deleted,
    or restored from an older backup): the round is refused, untrained, even one that would
    also fail every other check, and the ledger stays as it is."""
    ctx = make_ctx(fed, data, tmp_path)
    assert ctx.ledger is not None
    ctx.audit.append("epsilon-spent", {"study_id": STUDY_ID, "round": 1, "epsilon": 0.7,
                                       "total": 0.7})  # fmt: skip
    result = participate(signed(fed, round_open(ctx, round=2, clip_norm=0.0)), ctx, NOW)
    assert isinstance(result, Refused) and result.reason == "ledger-behind"
    assert "tessera node rebuild-ledger" in result.detail and result.messages == ()
    assert ctx.train.calls == 0  # type: ignore[attr-defined]
    assert ctx.ledger.rounds == [] and not ctx.ledger.path.exists()
    assert kinds(ctx) == ["epsilon-spent", "round-refused"]


def test_a_node_answers_one_round_open_per_round_number_even_after_a_restart(
    fed: Federation, data: IngestedSite, tmp_path: Path
) -> None:
    """Issue #18, attack 1: a node that refused RoundOpen(r, k=1) must not then join a second
    RoundOpen(r, k=2) (equivocation), nor after a restart (its audit log remembers)."""
    ctx = make_ctx(fed, data, tmp_path)
    weak, strong = round_open(ctx, min_participants=1), round_open(ctx, min_participants=2)
    first = participate(signed(fed, weak), ctx, NOW)
    assert isinstance(first, Refused) and first.reason == "k-below-minimum"
    for node in (ctx, make_ctx(fed, data, tmp_path)):  # the second: a restarted node
        second = participate(signed(fed, strong), node, NOW)
        assert isinstance(second, Refused) and second.reason == "already-answered"
        assert second.messages == () and node.train.calls == 0  # type: ignore[attr-defined]
    assert ctx.ledger is not None and ctx.ledger.rounds == []
    refused = [e for e in read_entries(ctx.audit.path) if e.kind == "round-refused"]
    assert [e.fields["reason"] for e in refused] == [
        "k-below-minimum",
        "already-answered",
        "already-answered",
    ]
    assert refused[0].fields["round_open"] == weak.digest().hex()
    assert refused[1].fields["round_open"] == strong.digest().hex()


def test_an_announcement_not_from_the_leader_is_refused_unaudited(
    fed: Federation, data: IngestedSite, tmp_path: Path
) -> None:
    ctx = make_ctx(fed, data, tmp_path)
    # agg-2 is a real aggregator of the roster, but not its leader.
    by_other = round_open(ctx, leader_id="agg-2")
    forged_key = generate_signing_key()
    genuine = bytearray(signed(fed, round_open(ctx)))
    genuine[-70] ^= 1  # flip one byte of the message body
    attempts: list[tuple[bytes, type[Exception]]] = [
        (signed(fed, by_other), AuthenticationError),
        (seal_envelope(round_open(ctx), "agg-1", forged_key), AuthenticationError),
        (bytes(genuine), AuthenticationError),
        (b"TSRE garbage", CodecError),
    ]
    for payload, error in attempts:
        with pytest.raises(error):
            participate(payload, ctx, NOW)
    assert ctx.train.calls == 0  # type: ignore[attr-defined]
    assert read_entries(ctx.audit.path) == []  # forgeries cannot fill the log


def test_without_dp_or_a_ledger_no_round_is_joined(
    fed: Federation, data: IngestedSite, tmp_path: Path
) -> None:
    ctx = make_ctx(fed, data, tmp_path, site=SiteTraining(batch_size=4),
                   ledger=None)  # fmt: skip
    result = participate(signed(fed, round_open(ctx, algorithm="fedsgd")), ctx, NOW)
    assert isinstance(result, Refused) and result.reason == "dp-required"
    assert result.messages == () and ctx.train.calls == 0  # type: ignore[attr-defined]
    assert kinds(ctx) == ["round-refused"]


def test_budget_spent_by_another_process_after_the_check_refuses_without_sending(
    fed: Federation, data: IngestedSite, tmp_path: Path
) -> None:
    ctx = make_ctx(fed, data, tmp_path)
    assert ctx.ledger is not None
    path = ctx.ledger.path

    def racing_trainer(*args: Any) -> Any:
        # A manual run elsewhere spends most of the budget between the check and the charge.
        PrivacyLedger(path, STUDY_ID, 1000.0, 1e-5).charge_round(99, 0.5, 1.0, 50)
        return train_for_round(*args)

    ctx = dataclasses.replace(ctx, train=racing_trainer)
    result = participate(signed(fed, round_open(ctx)), ctx, NOW)
    assert isinstance(result, Refused) and result.reason == "budget-exhausted"
    assert result.messages == ()
    # Round 1 was never charged; the ledger re-read the file and recorded the refusal.
    assert [r["round"] for r in PrivacyLedger(path, STUDY_ID, 8.0, 1e-5).rounds] == [99]
    assert [r["round"] for r in ctx.ledger.refusals] == [1]
    assert kinds(ctx) == ["round-refused"]
