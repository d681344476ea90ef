"""The start-up both daemons share: a provisioned federation's bundles and signed manifest
(what `tessera demo` and the end-to-end tests run), loaded as each member would load them;
each refusal names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.provisioning.manifest_draft import draft_manifest
from broker.provisioning.member import MemberSetup, load_member
from node.demo.federation import FederationSpec, PreparedFederation, prepare_federation
from tessera.crypto.signing import generate_signing_key, load_private_key, public_key_bytes
from tessera.errors import AuthenticationError, ConfigError
from tessera.governance.manifest import save_manifest, sign_manifest

SPEC = FederationSpec(sites=("site-a", "site-b"), aggregators=("agg-1", "agg-2"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedFederation:
    return prepare_federation(tmp_path_factory.mktemp("federation"), SPEC)


def load(
    prepared: PreparedFederation, bundle_of: str, role: str, *, member_id: str | None = None,
    manifest: Path | None = None, study_id: str = SPEC.study_id, architecture: str | None = None,
) -> MemberSetup:  # fmt: skip
    """`bundle_of`'s bundle loaded as `member_id` (default: its owner) would load it."""
    return load_member(
        prepared.bundle(bundle_of), role=role, member_id=member_id or bundle_of,
        manifest_path=manifest or prepared.bundle(bundle_of) / "manifest.toml",
        study_id=study_id, architecture=architecture,
    )  # fmt: skip


def signed_manifest(
    prepared: PreparedFederation, path: Path, architectures: list[str],
    coordinator: Ed25519PrivateKey | None = None,
) -> Path:  # fmt: skip
    """The federation's manifest allowing `architectures`, signed by `coordinator` (default:
    the federation's own)."""
    coordinator = coordinator or load_private_key(
        prepared.provisioned / "coordinator" / "coordinator.key"
    )
    stewards = {s: [(f"steward-{s}", public_key_bytes(generate_signing_key()))] for s in SPEC.sites}
    table = {**SPEC.study_table(), "architectures": architectures}
    manifest = draft_manifest(prepared.roster, public_key_bytes(coordinator), stewards, [table])
    save_manifest(sign_manifest(manifest, coordinator), path)
    return path


@pytest.mark.parametrize(("member", "role"), [("site-a", "site"), ("agg-2", "aggregator")])
def test_every_member_derives_the_same_study_model_and_aggregator_keys(
    prepared: PreparedFederation, member: str, role: str
) -> None:
    setup = load(prepared, member, role)
    assert setup.bundle.member_id == member and setup.leader == "agg-1"
    assert setup.study.id == SPEC.study_id and setup.model == prepared.study_model()
    roster = prepared.roster
    assert set(setup.aggregator_signing) == set(setup.aggregator_hpke) == {"agg-1", "agg-2"}
    for aggregator, key in setup.aggregator_signing.items():
        assert public_key_bytes(key) == roster.member(aggregator).signing_key


def test_another_members_bundle_is_refused(prepared: PreparedFederation) -> None:
    with pytest.raises(ConfigError, match=r"belongs to 'site-b' \(site\); mount site 'site-a'"):
        load(prepared, "site-b", "site", member_id="site-a")
    with pytest.raises(ConfigError, match="mount aggregator 'agg-1''s own bundle"):
        load(prepared, "site-a", "aggregator", member_id="agg-1")


def test_an_unknown_study_names_the_manifests_studies(prepared: PreparedFederation) -> None:
    with pytest.raises(ConfigError, match=r"study_id = 'other' is not in the manifest \(lesion\)"):
        load(prepared, "site-a", "site", study_id="other")


def test_a_manifest_another_coordinator_signed_is_refused(
    prepared: PreparedFederation, tmp_path: Path
) -> None:
    path = tmp_path / "manifest.toml"
    signed_manifest(prepared, path, [SPEC.architecture], coordinator=generate_signing_key())
    with pytest.raises(AuthenticationError):
        load(prepared, "site-a", "site", manifest=path)


def test_several_architectures_need_one_chosen(
    prepared: PreparedFederation, tmp_path: Path
) -> None:
    path = signed_manifest(prepared, tmp_path / "manifest.toml", ["small-cnn-v1", "resnet18-v1"])
    for member, role, service in (("site-a", "site", "node"), ("agg-1", "aggregator",
                                                                "aggregator")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"set architecture in the {service}'s config"):
            load(prepared, member, role, manifest=path)
    chosen = load(prepared, "site-a", "site", manifest=path, architecture="resnet18-v1")
    assert chosen.model.architecture == "resnet18-v1"
