"""Issue 20, point 3, without a broker: the CRL provisioning writes, certificate lifetimes,
renewal of one member, and the record of issued certificates."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from support.mosquitto import TEST_FEDERATION

from broker.errors import ProvisioningError
from broker.provisioning import pki
from broker.provisioning.bundle import load_bundle
from broker.provisioning.federation import parse_federation
from broker.provisioning.provision import provision

FEDERATION = parse_federation(TEST_FEDERATION)


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def crl(out: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((out / "broker/crl.pem").read_bytes())


def test_a_new_federations_crl_is_empty_signed_and_lasts_as_long_as_the_ca(
    provisioned: Path,
) -> None:
    ca = certificate(provisioned / "coordinator/ca.pem")
    revocations = crl(provisioned)
    assert len(revocations) == 0
    assert revocations.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert revocations.issuer == ca.subject
    # A CRL past its nextUpdate makes OpenSSL refuse every client: it must not lapse first.
    assert revocations.next_update_utc == ca.not_valid_after_utc


def test_leaf_certificates_last_at_most_397_days(provisioned: Path) -> None:
    for path in [provisioned / "broker/server.pem", provisioned / "bundles/site-a/client.pem"]:
        cert = certificate(path)
        assert cert.not_valid_after_utc - cert.not_valid_before_utc <= datetime.timedelta(
            days=397, hours=1
        )


def test_reissue_renews_one_members_tls_certificate_and_revokes_the_old_one(
    tmp_path: Path,
) -> None:
    provision(FEDERATION, tmp_path)
    site_b = tmp_path / "bundles/site-b"
    old = certificate(site_b / "client.pem")
    signing = (site_b / "signing.key").read_bytes()
    others = {m: (tmp_path / f"bundles/{m}/client.pem").read_bytes() for m in ("site-a", "agg-1")}
    result = provision(FEDERATION, tmp_path, reissue=["site-b"])
    assert (result.reissued, result.revoked, result.roster_version) == (("site-b",), ("site-b",), 2)
    new = certificate(site_b / "client.pem")
    assert new.serial_number != old.serial_number
    assert (site_b / "signing.key").read_bytes() == signing  # the manifest stays valid
    assert {m: (tmp_path / f"bundles/{m}/client.pem").read_bytes() for m in others} == others
    (entry,) = crl(tmp_path)
    assert entry.serial_number == old.serial_number
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.superseded
    assert load_bundle(site_b).roster.member("site-b").certificate_sha256 != b""


def test_deleting_a_members_folder_and_issuing_it_again_revokes_its_old_certificate(
    tmp_path: Path,
) -> None:
    provision(FEDERATION, tmp_path)
    (tmp_path / "coordinator/certificates.json").unlink()  # as provisioned before it existed
    provision(FEDERATION, tmp_path, reuse_ca=True)  # the record starts from the bundles
    old = certificate(tmp_path / "bundles/agg-2/client.pem")
    shutil.rmtree(tmp_path / "bundles/agg-2")
    result = provision(FEDERATION, tmp_path, reuse_ca=True)
    assert result.issued == ("agg-2",) and result.revoked == ("agg-2",)
    assert [e.serial_number for e in crl(tmp_path)] == [old.serial_number]


def test_revoke_cuts_off_a_member_until_it_is_reissued(tmp_path: Path) -> None:
    provision(FEDERATION, tmp_path)
    result = provision(FEDERATION, tmp_path, revoke=["site-a"])
    assert result.revoked == ("site-a",) and result.suspended == ("site-a",)
    current = certificate(tmp_path / "bundles/site-a/client.pem")
    assert [e.serial_number for e in crl(tmp_path)] == [current.serial_number]
    # A later run keeps it revoked and says so; --reissue readmits it.
    assert provision(FEDERATION, tmp_path, reuse_ca=True).suspended == ("site-a",)
    assert provision(FEDERATION, tmp_path, reissue=["site-a"]).suspended == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"revoke": ["site-z"]}, "no certificate was ever issued to 'site-z'"),
        ({"reissue": ["site-z"]}, "not in the federation file"),
        ({"revoke": ["site-a"], "reissue": ["site-a"]}, "--reissue alone revokes"),
        ({"revoke": ["site-a"], "reissue": ["site-b", "agg-3"]}, "cannot --reissue agg-3"),
    ],
)
def test_a_revocation_that_cannot_be_done_changes_nothing(
    tmp_path: Path, kwargs: dict[str, list[str]], message: str
) -> None:
    provision(FEDERATION, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ProvisioningError, match=message):
        provision(FEDERATION, tmp_path, **kwargs)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_revoke_needs_an_existing_federation(tmp_path: Path) -> None:
    with pytest.raises(ProvisioningError, match="act on an existing federation"):
        provision(FEDERATION, tmp_path, revoke=["site-a"])


def test_certificates_near_expiry_are_reported_and_the_brokers_renewed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pki, "LEAF_DAYS", 10)
    provision(FEDERATION, tmp_path)
    monkeypatch.undo()
    result = provision(FEDERATION, tmp_path, reuse_ca=True)
    assert set(result.expiring) == {m.id for m in FEDERATION.members}
    server = certificate(tmp_path / "broker/server.pem")
    remaining = server.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert remaining > datetime.timedelta(days=300)
    result = provision(FEDERATION, tmp_path, reissue=["site-a"])
    assert "site-a" not in result.expiring and "site-b" in result.expiring
