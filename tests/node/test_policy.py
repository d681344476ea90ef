"""The node's pre-round check: every refusal path, its boundary, and the policy file."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node.round.policy import (
    REASONS,
    LedgerState,
    RoundAnnouncement,
    RoundRefused,
    SitePolicy,
    TrainingWindow,
    check_round,
    load_site_policy,
)
from tessera.crypto.signing import generate_signing_key, public_key_bytes
from tessera.errors import ConfigError
from tessera.governance.audit import AuditLog, read_entries
from tests.support.governance import NOW, STUDY_ID, Federation, build_federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return build_federation(tmp_path_factory.mktemp("fed"), n_sites=3, n_aggregators=2)


@dataclasses.dataclass
class Args:
    """check_round's arguments, built valid, then changed by one case."""

    manifest: Any
    approvals: list[Any]
    policy: SitePolicy
    announcement: RoundAnnouncement
    ledger: LedgerState
    now: dt.datetime

    def check(self) -> None:
        check_round(
            self.manifest, self.approvals, self.policy, self.announcement, self.ledger, self.now
        )


def valid(fed: Federation) -> Args:
    return Args(
        manifest=fed.manifest,
        approvals=[fed.approvals["site-1"][STUDY_ID]],
        policy=SitePolicy(site_id="site-1", coordinator_key=fed.coordinator_public),
        announcement=RoundAnnouncement(
            federation_id=fed.manifest.federation_id,
            study_id=STUDY_ID,
            round=1,
            architecture="small-cnn-v1",
            min_participants=2,
            clip_norm=1.0,
            projected_epsilon=0.5,
        ),
        ledger=LedgerState(epsilon_spent=0.0, rounds_joined=0),
        now=NOW,
    )


def announce(**changes: Any) -> Callable[[Args, Federation], None]:
    def change(args: Args, fed: Federation) -> None:
        args.announcement = dataclasses.replace(args.announcement, **changes)

    return change


def policy(**changes: Any) -> Callable[[Args, Federation], None]:
    def change(args: Args, fed: Federation) -> None:
        args.policy = dataclasses.replace(args.policy, **changes)

    return change


def tampered_manifest(args: Args, fed: Federation) -> None:
    study = dataclasses.replace(args.manifest.studies[0], clip_norm=10.0)
    args.manifest = dataclasses.replace(args.manifest, studies=(study,))


def unsigned_manifest(args: Args, fed: Federation) -> None:
    args.manifest = dataclasses.replace(args.manifest, signature=None)


def other_pinned_key(args: Args, fed: Federation) -> None:
    args.policy = dataclasses.replace(
        args.policy, coordinator_key=public_key_bytes(generate_signing_key())
    )


def no_approvals(args: Args, fed: Federation) -> None:
    args.approvals = []


def other_sites_approvals(args: Args, fed: Federation) -> None:
    args.approvals = [fed.approvals["site-2"][STUDY_ID], fed.approvals["site-3"][STUDY_ID]]


def after_expiry(args: Args, fed: Federation) -> None:
    args.now = dt.datetime(2027, 7, 1, 0, 0, tzinfo=dt.UTC)


def ledger(**changes: Any) -> Callable[[Args, Federation], None]:
    def change(args: Args, fed: Federation) -> None:
        args.ledger = dataclasses.replace(args.ledger, **changes)

    return change


def site_round_limit_reached(args: Args, fed: Federation) -> None:
    args.policy = dataclasses.replace(args.policy, max_rounds=4)
    args.ledger = dataclasses.replace(args.ledger, rounds_joined=4)


def site_epsilon_cap_reached(args: Args, fed: Federation) -> None:
    args.policy = dataclasses.replace(args.policy, max_epsilon=1.0)
    args.ledger = dataclasses.replace(args.ledger, epsilon_spent=0.6)  # 0.6 + 0.5 > 1.0


NIGHT = TrainingWindow(dt.time(20, 0), dt.time(6, 0), "UTC")

REFUSALS = [
    ("manifest-signature", tampered_manifest),
    ("manifest-signature", unsigned_manifest),
    ("manifest-signature", other_pinned_key),
    ("wrong-federation", announce(federation_id="other-federation")),
    ("site-not-in-manifest", policy(site_id="site-9")),
    ("unknown-study", announce(study_id="brain-mri")),
    ("unapproved-study", no_approvals),
    ("unapproved-study", other_sites_approvals),
    ("study-expired", after_expiry),
    ("paused", policy(paused=True)),
    ("outside-window", policy(window=NIGHT)),
    ("architecture-not-allowed", announce(architecture="vit-huge")),
    ("k-below-minimum", policy(min_participants=3)),
    ("clip-norm-above-study", announce(clip_norm=1.5)),
    ("max-rounds", announce(round=21)),
    ("max-rounds", site_round_limit_reached),
    ("budget-exhausted", ledger(epsilon_spent=7.6)),
    ("budget-exhausted", site_epsilon_cap_reached),
]


def test_a_valid_round_passes(fed: Federation) -> None:
    valid(fed).check()


@pytest.mark.parametrize(("reason", "change"), REFUSALS)
def test_each_violation_is_refused_with_its_reason(fed, reason, change) -> None:
    args = valid(fed)
    change(args, fed)
    with pytest.raises(RoundRefused) as refused:
        args.check()
    assert refused.value.reason == reason
    assert reason in str(refused.value)


def test_every_reason_has_a_refusal_test() -> None:
    assert {reason for reason, _ in REFUSALS} == set(REASONS)


def test_the_studys_k_binds_even_when_the_site_asks_for_less(fed) -> None:
    args = valid(fed)
    args.announcement = dataclasses.replace(args.announcement, min_participants=1)
    with pytest.raises(RoundRefused, match="k-below-minimum"):
        args.check()


@pytest.mark.parametrize(
    "change",
    [
        ledger(epsilon_spent=7.5),  # 7.5 + 0.5 is exactly the study's 8.0
        announce(round=20),  # the study's last round
        announce(clip_norm=0.5),  # tighter clipping than the study is fine
        announce(min_participants=3),  # a larger k than required is fine
        policy(max_rounds=1),  # no rounds joined yet
    ],
)
def test_the_boundaries_are_allowed(fed, change) -> None:
    args = valid(fed)
    change(args, fed)
    args.check()


def test_the_last_day_of_a_study_still_runs(fed) -> None:
    args = valid(fed)
    args.now = dt.datetime(2027, 6, 30, 23, 59, tzinfo=dt.UTC)
    args.check()


def test_window_wraps_past_midnight_in_its_time_zone(fed) -> None:
    assert NIGHT.contains(dt.datetime(2026, 11, 29, 23, 0, tzinfo=dt.UTC))
    assert NIGHT.contains(dt.datetime(2026, 11, 30, 5, 59, tzinfo=dt.UTC))
    assert not NIGHT.contains(dt.datetime(2026, 11, 30, 6, 0, tzinfo=dt.UTC))
    berlin = TrainingWindow(dt.time(9, 0), dt.time(17, 0), "Europe/Berlin")
    # 12:00 UTC is 13:00 in Berlin (winter time): inside; 16:30 UTC is 17:30: outside.
    assert berlin.contains(dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC))
    assert not berlin.contains(dt.datetime(2026, 11, 29, 16, 30, tzinfo=dt.UTC))
    args = valid(fed)
    args.policy = dataclasses.replace(args.policy, window=berlin)
    args.check()


def test_naive_time_and_bad_projections_are_programming_errors(fed) -> None:
    args = valid(fed)
    args.now = NOW.replace(tzinfo=None)
    with pytest.raises(ValueError, match="aware datetime"):
        args.check()
    with pytest.raises(ValueError, match="projected_epsilon"):
        dataclasses.replace(args.announcement, projected_epsilon=float("nan"))


def test_a_refusal_is_recorded_with_its_reason(fed, tmp_path: Path) -> None:
    args = valid(fed)
    args.policy = dataclasses.replace(args.policy, paused=True)
    with AuditLog.open(tmp_path / "audit.jsonl", counts_only=True) as log:
        try:
            args.check()
        except RoundRefused as refused:
            log.append("round-refused", refused.audit_fields(args.announcement))
    [entry] = read_entries(tmp_path / "audit.jsonl")
    assert entry.kind == "round-refused"
    assert entry.fields == {
        "study_id": STUDY_ID,
        "round": 1,
        "reason": "paused",
        "detail": "the site policy pauses all training",
    }


def write_policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_policy_file_reads_every_key(fed, tmp_path: Path) -> None:
    key = base64.b64encode(fed.coordinator_public).decode()
    path = write_policy(
        tmp_path,
        f'site_id = "site-1"\ncoordinator_key = "{key}"\npaused = true\nmax_epsilon = 4\n'
        "max_rounds = 10\nmin_participants = 3\n"
        '[window]\nstart = "20:00"\nend = 06:00:00\ntimezone = "Europe/Berlin"\n',
    )
    assert load_site_policy(path) == SitePolicy(
        site_id="site-1",
        coordinator_key=fed.coordinator_public,
        paused=True,
        max_epsilon=4.0,
        max_rounds=10,
        min_participants=3,
        window=TrainingWindow(dt.time(20, 0), dt.time(6, 0), "Europe/Berlin"),
    )
    minimal = write_policy(tmp_path, f'site_id = "site-1"\ncoordinator_key = "{key}"\n')
    assert load_site_policy(minimal) == SitePolicy("site-1", fed.coordinator_public)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("pause = true", "unknown key 'pause'"),
        ("paused = 1", "paused must be true or false"),
        ("max_epsilon = -1.0", "max_epsilon must be a number above 0"),
        ("min_participants = 1", "min_participants must be an integer >= 2"),
        ("max_rounds = 0", "max_rounds must be an integer >= 1"),
        ('[window]\nstart = "8pm"\nend = "06:00"', "window.start must be a time"),
        ('[window]\nstart = "20:00"\nend = "06:00"\ntimezone = "Mars/Olympus"', "IANA"),
        ('[window]\nstart = "20:00"\nend = "20:00"', "start and end are equal"),
    ],
)
def test_policy_errors_name_the_key_and_the_fix(fed, tmp_path, extra, message) -> None:
    key = base64.b64encode(fed.coordinator_public).decode()
    path = write_policy(tmp_path, f'site_id = "site-1"\ncoordinator_key = "{key}"\n{extra}\n')
    with pytest.raises(ConfigError, match=message):
        load_site_policy(path)


def test_policy_site_id_follows_the_id_rule(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="site_id is missing"):
        load_site_policy(write_policy(tmp_path, "paused = true\n"))
    with pytest.raises(ConfigError, match="site_id 'site/1' is not a valid id"):
        load_site_policy(write_policy(tmp_path, 'site_id = "site/1"\n'))


def test_policy_without_a_pinned_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="coordinator_key is missing"):
        load_site_policy(write_policy(tmp_path, 'site_id = "site-1"\n'))
    with pytest.raises(ConfigError, match="coordinator_key: 'AAAA' is not a raw"):
        load_site_policy(write_policy(tmp_path, 'site_id = "s"\ncoordinator_key = "AAAA"\n'))
