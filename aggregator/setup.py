"""`tessera aggregator run`'s start-up, steps 1 and 2 of `aggregator.daemon`: what the
aggregator derives from its bundle and the manifest for its study.

The bundle, the verified manifest, the study, the architecture and the model come from
`broker.provisioning.member.load_member`, as for a node. What is the aggregator's own: its
round terms may be stricter than the study's, never looser, and its key maps include every
site's signing key (the nodes whose shares it opens).
"""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.config import AggregatorConfig
from aggregator.errors import AggregatorConfigError
from aggregator.leader import StudyTerms
from aggregator.service import RosterKeys
from broker.provisioning.bundle import Bundle
from broker.provisioning.member import load_member
from tessera.governance.manifest import Manifest
from tessera.governance.manifest_model import Study
from tessera.models.study import StudyModel


@dataclass(frozen=True)
class StudySetup:
    """What start-up derives from the bundle and the manifest for one study."""

    bundle: Bundle
    manifest: Manifest  # verified against the bundle's pinned coordinator key
    study: Study
    model: StudyModel
    roster: RosterKeys
    max_rounds: int

    @property
    def roster_sites(self) -> tuple[str, ...]:
        """Every site of the roster: the nodes each round expects."""
        return tuple(sorted(self.roster.node_signing))

    @property
    def terms(self) -> StudyTerms:
        """What this aggregator holds every RoundOpen to: the study's k and clip norm from
        the verified manifest, the leader and the sites from the verified roster."""
        return StudyTerms(
            self.study.min_participants, self.study.clip_norm, self.bundle.roster.leader,
            self.roster_sites,
        )  # fmt: skip


def load_study_setup(config: AggregatorConfig) -> StudySetup:
    """Steps 1 and 2 of start-up (see the module docstring)."""
    if config.bundle_dir is None:
        raise AggregatorConfigError(
            "bundle_dir is not set; point it at this aggregator's startup bundle from "
            "`tessera provision` (it holds the roster the service trusts)"
        )
    member = load_member(
        config.bundle_dir,
        role="aggregator",
        member_id=config.aggregator_id,
        manifest_path=config.manifest,
        study_id=config.study_id,
        architecture=config.architecture,
    )
    study, rounds = member.study, config.round
    if rounds.min_participants < study.min_participants:
        raise AggregatorConfigError(
            f"round.min_participants = {rounds.min_participants} is below the study's k = "
            f"{study.min_participants}; use at least that"
        )
    if rounds.clip_norm > study.clip_norm:
        raise AggregatorConfigError(
            f"round.clip_norm = {rounds.clip_norm} is above the study's {study.clip_norm}; "
            "nodes would refuse every round"
        )
    roster = member.bundle.roster
    signing = roster.signing_keys()
    keys = RosterKeys(
        aggregator_ids=roster.aggregator_ids,
        aggregator_signing=member.aggregator_signing,
        aggregator_hpke=member.aggregator_hpke,
        node_signing={s: signing[s] for s in roster.site_ids},
    )
    limit = study.max_rounds if rounds.max_rounds == 0 else min(rounds.max_rounds, study.max_rounds)
    return StudySetup(member.bundle, member.manifest, study, member.model, keys, limit)
