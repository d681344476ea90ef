"""What every member's daemon derives from its startup bundle and the manifest at start-up.

`load_member` is the start-up both `tessera node run` and `tessera aggregator run` share,
each step failing with a message that names the fix:

1. the startup bundle (`broker.provisioning.bundle.load_bundle`, its roster verified with the
   bundle's coordinator key), which must be this member's own (role and member id);
2. the manifest, verified against the same pinned coordinator key (never a key found in the
   manifest) and checked to name the same members and keys as the roster
   (`broker.provisioning.roster.check_manifest_agrees`);
3. the study the member serves, and the architecture it trains: the configured one, or the
   study's only allowed one;
4. the study's model (`tessera.models.study.StudyModel`), and the aggregators' signing and
   HPKE public keys from the roster (all of them, never only those a message names).

What a daemon does with these (its own private keys, its state, its terms) stays with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from broker.provisioning.bundle import Bundle, load_bundle
from broker.provisioning.roster import check_manifest_agrees
from tessera.crypto.signing import public_key_bytes
from tessera.errors import ConfigError
from tessera.governance.manifest import Manifest, load_manifest, verify_manifest
from tessera.governance.manifest_model import Study
from tessera.models.study import StudyModel

# The service a bundle's role runs, as the configuration that names the architecture says it.
SERVICE = {"site": "node", "aggregator": "aggregator"}


@dataclass(frozen=True)
class MemberSetup:
    """One member's verified view of the federation, for one study."""

    bundle: Bundle
    manifest: Manifest  # verified against the bundle's pinned coordinator key
    study: Study
    model: StudyModel
    aggregator_signing: Mapping[str, Ed25519PublicKey]  # every aggregator of the roster
    aggregator_hpke: Mapping[str, X25519PublicKey]

    @property
    def leader(self) -> str:
        """The roster's leader aggregator."""
        return self.bundle.roster.leader


def load_member(
    bundle_dir: Path,
    *,
    role: str,
    member_id: str,
    manifest_path: Path,
    study_id: str,
    architecture: str | None,
) -> MemberSetup:
    """Steps 1 to 4 of the module docstring; ConfigError (or the bundle's and manifest's own
    errors) naming the fix."""
    bundle = own_bundle(bundle_dir, role, member_id)
    manifest = verified_manifest(manifest_path, bundle)
    study = manifest_study(manifest, study_id)
    chosen = architecture or only_architecture(study, SERVICE.get(role, role))
    model = StudyModel.from_study(manifest.federation_id, study, chosen)
    roster = bundle.roster
    signing, hpke = roster.signing_keys(), roster.hpke_keys()
    return MemberSetup(
        bundle,
        manifest,
        study,
        model,
        {a: signing[a] for a in roster.aggregator_ids},
        {a: hpke[a] for a in roster.aggregator_ids},
    )


def own_bundle(bundle_dir: Path, role: str, member_id: str) -> Bundle:
    """The startup bundle at `bundle_dir`; ConfigError unless it is `member_id`'s, a `role`."""
    bundle = load_bundle(bundle_dir)
    if bundle.role != role or bundle.member_id != member_id:
        raise ConfigError(
            f"bundle {bundle_dir} belongs to {bundle.member_id!r} ({bundle.role}); "
            f"mount {role} {member_id!r}'s own bundle"
        )
    return bundle


def verified_manifest(manifest_path: Path, bundle: Bundle) -> Manifest:
    """The manifest, signed by the bundle's coordinator and agreeing with its roster."""
    manifest = load_manifest(manifest_path)
    verify_manifest(manifest, public_key_bytes(bundle.coordinator_key))
    check_manifest_agrees(bundle.roster, manifest)
    return manifest


def manifest_study(manifest: Manifest, study_id: str) -> Study:
    """The manifest's study `study_id`; ConfigError naming the studies it has."""
    study = manifest.study(study_id)
    if study is None:
        known = ", ".join(s.id for s in manifest.studies)
        raise ConfigError(f"study_id = {study_id!r} is not in the manifest ({known})")
    return study


def only_architecture(study: Study, service: str) -> str:
    """The study's one allowed architecture; ConfigError when it allows several."""
    if len(study.architectures) != 1:
        raise ConfigError(
            f"the study allows {', '.join(study.architectures)}; set architecture in the "
            f"{service}'s configuration to choose one"
        )
    return study.architectures[0]
