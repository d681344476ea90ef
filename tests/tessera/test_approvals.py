"""Steward approvals: what authorises a site to join a study, and what does not."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt

import pytest
import tomli_w

from tessera.crypto.signing import SignatureDomain, sign_message
from tessera.errors import AuthenticationError, ConfigError
from tessera.governance.approvals import (
    Approval,
    approve_study,
    find_approval,
    load_approval,
    load_approvals,
    verify_approval,
)
from tessera.governance.manifest import loads_manifest, study_hash
from tests.support.governance import NOW, STUDY_ID, build_federation, manifest_document

SECOND_STUDY = {
    "id": "bone-age",
    "purpose": "bone age bands",
    "labels": ["young", "old"],
    "architectures": ["small-cnn-v1"],
    "preprocessing": {"size": 32},
    "min_participants": 2,
    "max_rounds": 5,
    "clip_norm": 0.5,
    "dp": {"epsilon": 2.0, "delta": 1e-6},
    "expires": dt.date(2027, 1, 1),
}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    """A federation with two studies, each approved by every site's steward."""
    fed = build_federation(tmp_path_factory.mktemp("fed"), n_sites=2, approve=False)
    doc = manifest_document(fed.keys, fed.hpke_keys, fed.site_ids, fed.aggregator_ids)
    doc["studies"].append(SECOND_STUDY)
    fed.resign(loads_manifest(tomli_w.dumps(doc)))
    return fed


def approve(fed, study: str, site: str = "site-1", steward: str | None = None) -> Approval:
    key = fed.keys[steward or f"steward-{site}"]
    return approve_study(fed.manifest, study, site, key, NOW)


def test_a_stewards_approval_authorises_its_site_and_study(fed, tmp_path) -> None:
    approval = approve(fed, STUDY_ID)
    verify_approval(approval, fed.manifest, STUDY_ID, "site-1")
    assert approval.study_hash == study_hash(fed.manifest.study(STUDY_ID))
    path = tmp_path / "approval.json"
    path.write_text(approval.to_json())
    assert load_approval(path) == approval
    assert load_approvals(tmp_path) == [approval]
    assert load_approvals(tmp_path / "absent") == []


def test_an_approval_for_another_studys_hash_does_not_authorise(fed) -> None:
    other = approve(fed, "bone-age")
    with pytest.raises(AuthenticationError):
        verify_approval(other, fed.manifest, STUDY_ID, "site-1")
    # Relabelled as this study but still carrying the other study's hash: refused.
    relabelled = dataclasses.replace(other, study_id=STUDY_ID)
    with pytest.raises(AuthenticationError, match="other terms"):
        verify_approval(relabelled, fed.manifest, STUDY_ID, "site-1")
    # Relabelled and given this study's hash: the steward never signed that.
    forged = dataclasses.replace(relabelled, study_hash=study_hash(fed.manifest.study(STUDY_ID)))
    with pytest.raises(AuthenticationError, match="did not verify"):
        verify_approval(forged, fed.manifest, STUDY_ID, "site-1")
    with pytest.raises(AuthenticationError, match="no valid steward approval"):
        find_approval([other, relabelled, forged], fed.manifest, STUDY_ID, "site-1")
    assert find_approval([other, approve(fed, STUDY_ID)], fed.manifest, STUDY_ID, "site-1")


def test_another_sites_steward_cannot_approve_for_this_site(fed) -> None:
    with pytest.raises(ConfigError, match="not a data steward's key for site 'site-1'"):
        approve(fed, STUDY_ID, site="site-1", steward="steward-site-2")
    theirs = approve(fed, STUDY_ID, site="site-2")
    with pytest.raises(AuthenticationError):
        verify_approval(theirs, fed.manifest, STUDY_ID, "site-1")
    # Their steward signs a body claiming site-1, under their own steward id: refused.
    claim = dataclasses.replace(theirs, site_id="site-1")
    claim = dataclasses.replace(
        claim,
        signature=sign_message(
            fed.keys["steward-site-2"], SignatureDomain.STUDY_APPROVAL, claim.signed_bytes()
        ),
    )
    with pytest.raises(AuthenticationError, match="not signed by a steward of this site"):
        verify_approval(claim, fed.manifest, STUDY_ID, "site-1")
    # ...or naming site-1's steward: the signature is not that steward's.
    impostor = dataclasses.replace(claim, steward_id="steward-site-1")
    impostor = dataclasses.replace(
        impostor,
        signature=sign_message(
            fed.keys["steward-site-2"], SignatureDomain.STUDY_APPROVAL, impostor.signed_bytes()
        ),
    )
    with pytest.raises(AuthenticationError, match="did not verify"):
        verify_approval(impostor, fed.manifest, STUDY_ID, "site-1")


def test_changing_a_study_term_voids_its_approvals(fed) -> None:
    approval = approve(fed, STUDY_ID)
    doc = manifest_document(fed.keys, fed.hpke_keys, fed.site_ids, fed.aggregator_ids)
    doc["studies"].append(copy.deepcopy(SECOND_STUDY))
    doc["studies"][0]["dp"]["epsilon"] = 16.0
    doc["federation"]["version"] = 2
    laxer = loads_manifest(tomli_w.dumps(doc))
    with pytest.raises(AuthenticationError, match="approve the study again"):
        verify_approval(approval, laxer, STUDY_ID, "site-1")
    # The untouched study's approval still holds in the new version.
    verify_approval(approve(fed, "bone-age"), laxer, "bone-age", "site-1")


def test_a_removed_steward_no_longer_authorises(fed) -> None:
    approval = approve(fed, STUDY_ID)
    site = fed.manifest.site("site-1")
    replacement = dataclasses.replace(site.stewards[0], id="new-steward")
    manifest = dataclasses.replace(
        fed.manifest,
        sites=(dataclasses.replace(site, stewards=(replacement,)), *fed.manifest.sites[1:]),
    )
    with pytest.raises(AuthenticationError):
        verify_approval(approval, manifest, STUDY_ID, "site-1")


@pytest.mark.parametrize(
    "change",
    [
        {"federation_id": "other-federation"},
        {"approved_at": "2020-01-01T00:00:00+00:00"},
        {"signature": bytes(64)},
    ],
)
def test_tampered_approvals_are_rejected(fed, change) -> None:
    tampered = dataclasses.replace(approve(fed, STUDY_ID), **change)
    with pytest.raises(AuthenticationError):
        verify_approval(tampered, fed.manifest, STUDY_ID, "site-1")


def test_unknown_study_or_site_is_a_clear_error(fed) -> None:
    with pytest.raises(ConfigError, match="no study 'nope'; choose one of: bone-age, chest-xray"):
        approve(fed, "nope")
    with pytest.raises(ConfigError, match="no site 'site-9'"):
        approve_study(fed.manifest, STUDY_ID, "site-9", fed.keys["steward-site-1"], NOW)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ('{"study_id": "x"}', "exactly the keys"),
        ("[]", "exactly the keys"),
    ],
)
def test_malformed_approval_files_are_config_errors(text, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Approval.from_json(text)


def test_non_hex_signature_is_a_config_error(fed) -> None:
    text = approve(fed, STUDY_ID).to_json()
    broken = text.replace('"signature": "', '"signature": "zz', 1)
    with pytest.raises(ConfigError, match="not hex"):
        Approval.from_json(broken)
