"""The site's local policy, and the check a node runs before it touches patient data.

`check_round` is pure: the manifest, the approvals, the policy, the round's terms, the
privacy ledger's state and the time all come in as arguments, and it either returns or
raises `RoundRefused(reason, detail)`. The node calls it on every `RoundOpen`, before it
loads one image; a refusal is recorded in the audit log (`RoundRefused.audit_fields`) and
nothing is sent. The detail names terms and numbers only, never patient data.

Policy file (TOML; every key but `site_id` and `coordinator_key` is optional)::

    site_id = "site-1"
    coordinator_key = "<base64 Ed25519 key>"   # pinned: the only manifest signer trusted
    paused = false                            # true: refuse every round
    max_epsilon = 4.0                         # per study, at most the study's own epsilon
    max_rounds = 10                           # rounds this site joins per study
    min_participants = 3                      # k this site insists on (at least 2)
    [window]                                  # train only inside this daily window
    start = "20:00"                           # may wrap past midnight
    end = "06:00"
    timezone = "Europe/Berlin"                # IANA name; default "UTC"
"""

from __future__ import annotations

import datetime as dt
import math
import tomllib
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import NodeError
from tessera.errors import AuthenticationError, CodecError, ConfigError
from tessera.governance.approvals import Approval, find_approval
from tessera.governance.manifest import Manifest, decode_key, verify_manifest
from tessera.wire.ids import check_id

# Every reason a round can be refused for, in the order check_round tests them.
REASONS = (
    "manifest-signature",
    "wrong-federation",
    "site-not-in-manifest",
    "unknown-study",
    "unapproved-study",
    "study-expired",
    "paused",
    "outside-window",
    "architecture-not-allowed",
    "k-below-minimum",
    "clip-norm-above-study",
    "max-rounds",
    "budget-exhausted",
)


class RoundRefused(NodeError):
    """A round this node will not take part in; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"round refused ({reason}): {detail}")
        self.reason = reason
        self.detail = detail

    def audit_fields(self, announcement: RoundAnnouncement) -> dict[str, Any]:
        """The `round-refused` audit entry's fields: the study, the round and the reason."""
        return {
            "study_id": announcement.study_id,
            "round": announcement.round,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class RoundAnnouncement:
    """The terms of a round that the node checks; the daemon maps `RoundOpen` onto it, and
    adds `architecture` (the model's architecture id) and `projected_epsilon` (what this
    round would cost, from the node's own accountant)."""

    federation_id: str
    study_id: str
    round: int
    architecture: str
    min_participants: int
    clip_norm: float
    projected_epsilon: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.projected_epsilon) or self.projected_epsilon < 0:
            raise ValueError(
                f"projected_epsilon must be finite and >= 0, got {self.projected_epsilon}"
            )
        if not math.isfinite(self.clip_norm) or self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm}")


@dataclass(frozen=True)
class LedgerState:
    """What this site has already spent on the study: epsilon, and rounds joined."""

    epsilon_spent: float
    rounds_joined: int


@dataclass(frozen=True)
class TrainingWindow:
    """A daily window [start, end) in a time zone; end before start wraps past midnight."""

    start: dt.time
    end: dt.time
    timezone: str = "UTC"

    def contains(self, now: dt.datetime) -> bool:
        """True if `now` (aware) falls inside the window, in the window's time zone."""
        local = now.astimezone(zoneinfo.ZoneInfo(self.timezone)).time().replace(tzinfo=None)
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


@dataclass(frozen=True)
class SitePolicy:
    """The site's own rules, stricter than any study's. Build with `load_site_policy`."""

    site_id: str
    coordinator_key: bytes
    paused: bool = False
    max_epsilon: float | None = None
    max_rounds: int | None = None
    min_participants: int = 2
    window: TrainingWindow | None = None


def check_round(
    manifest: Manifest,
    approvals: Iterable[Approval],
    policy: SitePolicy,
    announcement: RoundAnnouncement,
    ledger: LedgerState,
    now: dt.datetime,
) -> None:
    """Return only if this site may take part in the announced round; else RoundRefused.

    Guarantees, in this order: the manifest is signed by the pinned coordinator key; it is
    this federation's; it lists this site and the study; this site's steward approved the
    study's current terms; the study has not expired; the site is not paused and is inside
    its window; the architecture is allowed; k is at least max(study k, site k); the clip
    norm is no looser than the study's; neither the study's nor the site's round limit is
    reached; and spent + projected epsilon stays within min(study epsilon, site epsilon).
    """
    if now.tzinfo is None:
        raise ValueError("check_round needs an aware datetime (e.g. datetime.now(UTC))")
    try:
        verify_manifest(manifest, policy.coordinator_key)
    except AuthenticationError:
        raise RoundRefused(
            "manifest-signature", "the manifest is not signed by the pinned coordinator key"
        ) from None
    if announcement.federation_id != manifest.federation_id:
        raise RoundRefused(
            "wrong-federation",
            f"round is for federation {announcement.federation_id!r}, "
            f"the manifest is {manifest.federation_id!r}",
        )
    if manifest.site(policy.site_id) is None:
        raise RoundRefused(
            "site-not-in-manifest",
            f"site {policy.site_id!r} is not in manifest version {manifest.version}",
        )
    study = manifest.study(announcement.study_id)
    if study is None:
        raise RoundRefused(
            "unknown-study",
            f"study {announcement.study_id!r} is not in manifest version {manifest.version}",
        )
    try:
        find_approval(approvals, manifest, study.id, policy.site_id)
    except AuthenticationError:
        raise RoundRefused(
            "unapproved-study",
            f"no valid approval of study {study.id!r}'s current terms by this site's steward",
        ) from None
    today = now.astimezone(dt.UTC).date()
    if study.is_expired(today):
        raise RoundRefused("study-expired", f"study {study.id!r} expired on {study.expires}")
    if policy.paused:
        raise RoundRefused("paused", "the site policy pauses all training")
    if policy.window is not None and not policy.window.contains(now):
        window = policy.window
        raise RoundRefused(
            "outside-window",
            f"training is allowed {window.start:%H:%M}-{window.end:%H:%M} {window.timezone}",
        )
    if announcement.architecture not in study.architectures:
        raise RoundRefused(
            "architecture-not-allowed",
            f"architecture {announcement.architecture!r} is not in the study's allowlist "
            f"{list(study.architectures)}",
        )
    k = max(study.min_participants, policy.min_participants)
    if announcement.min_participants < k:
        raise RoundRefused(
            "k-below-minimum",
            f"round asks for k={announcement.min_participants}, this site requires k >= {k}",
        )
    if announcement.clip_norm > study.clip_norm:
        raise RoundRefused(
            "clip-norm-above-study",
            f"round clip norm {announcement.clip_norm} exceeds the study's {study.clip_norm}",
        )
    _check_limits(study.max_rounds, study.dp.epsilon, policy, announcement, ledger)


def _check_limits(
    study_rounds: int,
    study_epsilon: float,
    policy: SitePolicy,
    announcement: RoundAnnouncement,
    ledger: LedgerState,
) -> None:
    if announcement.round > study_rounds:
        raise RoundRefused(
            "max-rounds", f"round {announcement.round} is past the study's {study_rounds} rounds"
        )
    if policy.max_rounds is not None and ledger.rounds_joined >= policy.max_rounds:
        raise RoundRefused(
            "max-rounds",
            f"this site has joined {ledger.rounds_joined} rounds, its limit is {policy.max_rounds}",
        )
    budget = study_epsilon if policy.max_epsilon is None else min(study_epsilon, policy.max_epsilon)
    if ledger.epsilon_spent + announcement.projected_epsilon > budget:
        raise RoundRefused(
            "budget-exhausted",
            f"epsilon spent {ledger.epsilon_spent:.4g} + this round "
            f"{announcement.projected_epsilon:.4g} would exceed the budget {budget:.4g}",
        )


def load_site_policy(path: str | Path) -> SitePolicy:
    """Read and validate the site policy TOML; ConfigError naming the key and the fix."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"site policy {path} does not exist; check the path") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"site policy {path} is not valid TOML: {error}") from None
    return site_policy_from_dict(data)


def site_policy_from_dict(data: Mapping[str, Any]) -> SitePolicy:
    """Validate a parsed policy table (see the module docstring for the keys)."""
    known = {
        "site_id",
        "coordinator_key",
        "paused",
        "max_epsilon",
        "max_rounds",
        "min_participants",
        "window",
    }
    extra = sorted(set(data) - known)
    if extra:
        raise ConfigError(
            f"site policy: unknown key {extra[0]!r}; remove it or fix its spelling "
            f"(known: {', '.join(sorted(known))})"
        )
    site_id = data.get("site_id")
    if site_id is None:
        raise ConfigError('site policy site_id is missing; add e.g. site_id = "site-1"')
    try:
        check_id("site policy site_id", site_id)
    except CodecError as error:
        raise ConfigError(str(error)) from None
    key_text = data.get("coordinator_key")
    if not isinstance(key_text, str):
        raise ConfigError(
            "site policy coordinator_key is missing; copy the coordinator's public key from "
            "the provisioning bundle (base64)"
        )
    paused = data.get("paused", False)
    if not isinstance(paused, bool):
        raise ConfigError(f"site policy paused must be true or false, got {paused!r}")
    max_epsilon = data.get("max_epsilon")
    if max_epsilon is not None and (
        isinstance(max_epsilon, bool)
        or not isinstance(max_epsilon, (int, float))
        or not math.isfinite(max_epsilon)
        or max_epsilon <= 0
    ):
        raise ConfigError(
            f"site policy max_epsilon must be a number above 0, got {max_epsilon!r}; "
            "write e.g. max_epsilon = 4.0, or remove it to use the study's"
        )
    return SitePolicy(
        site_id=site_id,
        coordinator_key=decode_key(key_text, "site policy coordinator_key"),
        paused=paused,
        max_epsilon=None if max_epsilon is None else float(max_epsilon),
        max_rounds=_int(data, "max_rounds", 1, None),
        min_participants=_int(data, "min_participants", 2, 2) or 2,
        window=_window(data.get("window")),
    )


def _int(data: Mapping[str, Any], key: str, minimum: int, default: int | None) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"site policy {key} must be an integer >= {minimum}, got {value!r}; "
            f"write e.g. {key} = {max(minimum, 3)}"
        )
    return value


def _window(value: object) -> TrainingWindow | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) - {"start", "end", "timezone"}:
        raise ConfigError(
            'site policy [window] takes start, end and timezone, e.g. start = "20:00", '
            'end = "06:00", timezone = "UTC"'
        )
    times = []
    for key in ("start", "end"):
        item = value.get(key)
        try:
            times.append(item if isinstance(item, dt.time) else dt.time.fromisoformat(str(item)))
        except ValueError:
            raise ConfigError(
                f'site policy window.{key} must be a time such as "20:00", got {item!r}'
            ) from None
    zone = value.get("timezone", "UTC")
    try:
        zoneinfo.ZoneInfo(str(zone))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"site policy window.timezone {zone!r} is not a known IANA time zone; use e.g. "
            '"Europe/Berlin" or "UTC" (install the tzdata package if none are known)'
        ) from None
    if times[0] == times[1]:
        raise ConfigError("site policy window start and end are equal; remove [window] instead")
    return TrainingWindow(times[0], times[1], str(zone))
