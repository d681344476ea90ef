"""`tessera provision`: PKI, keys, signed roster, Mosquitto config, bundles, re-runs."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support.mosquitto import TEST_FEDERATION as FEDERATION

from broker.errors import ProvisioningError
from broker.provisioning.bundle import load_bundle
from broker.provisioning.federation import load_federation, parse_federation
from broker.provisioning.provision import provision
from broker.provisioning.roster import load_roster
from tessera.cli import main
from tessera.crypto.signing import load_public_key
from tessera.errors import AuthenticationError, ConfigError

EXAMPLE = Path(__file__).parents[2] / "broker" / "examples" / "FEDERATION.toml"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_private_key_is_0600_and_bundles_are_0700(provisioned: Path) -> None:
    keys = sorted(provisioned.rglob("*.key"))
    names = {str(k.relative_to(provisioned)) for k in keys}
    assert "coordinator/ca.key" in names and "broker/server.key" in names
    assert "bundles/agg-1/hpke.key" in names and "bundles/site-a/signing.key" in names
    assert "bundles/site-a/hpke.key" not in names
    assert all(mode(k) == 0o600 for k in keys)
    assert mode(provisioned / "coordinator") == 0o700
    assert all(mode(b) == 0o700 for b in (provisioned / "bundles").iterdir())


def test_client_certificate_names_the_member_and_chains_to_the_ca(provisioned: Path) -> None:
    ca = x509.load_pem_x509_certificate((provisioned / "coordinator/ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((provisioned / "bundles/site-a/client.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-a"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Hospital A"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_server_certificate_covers_localhost(provisioned: Path) -> None:
    cert = x509.load_pem_x509_certificate((provisioned / "broker/server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_bundle_loads_with_a_verified_roster_of_every_key(provisioned: Path) -> None:
    bundle = load_bundle(provisioned / "bundles" / "agg-1")
    roster = bundle.roster
    assert roster.site_ids == ("site-a", "site-b")
    assert roster.aggregator_ids == ("agg-1", "agg-2")
    assert set(roster.hpke_keys()) == {"agg-1", "agg-2"}
    assert (
        roster.member("agg-1").signing_key == bundle.signing_key().public_key().public_bytes_raw()
    )
    assert roster.member("agg-1").hpke_key == bundle.hpke_key().public_key().public_bytes_raw()
    with pytest.raises(ConfigError, match="only aggregators hold HPKE keys"):
        load_bundle(provisioned / "bundles" / "site-a").hpke_key()


def test_tampered_roster_does_not_verify(provisioned: Path, tmp_path: Path) -> None:
    raw = (provisioned / "roster.json").read_bytes()
    (tmp_path / "roster.json").write_bytes(raw.replace(b"Hospital A", b"Hospital Z"))
    coordinator = load_public_key(bytes.fromhex((provisioned / "coordinator.pub").read_text()))
    load_roster(provisioned / "roster.json", provisioned / "roster.sig", coordinator)
    with pytest.raises(AuthenticationError):
        load_roster(tmp_path / "roster.json", provisioned / "roster.sig", coordinator)


def test_rerun_refuses_to_replace_the_ca(provisioned: Path) -> None:
    before = (provisioned / "coordinator/ca.pem").read_bytes()
    with pytest.raises(ProvisioningError, match="refusing to replace it"):
        provision(parse_federation(FEDERATION), provisioned)
    assert (provisioned / "coordinator/ca.pem").read_bytes() == before


def test_reuse_ca_keeps_members_and_issues_new_ones(tmp_path: Path) -> None:
    federation = parse_federation(FEDERATION)
    first = provision(federation, tmp_path)
    site_a_key = (tmp_path / "bundles/site-a/signing.key").read_bytes()
    ca = (tmp_path / "coordinator/ca.pem").read_bytes()
    grown = dict(FEDERATION, sites=[*FEDERATION["sites"], {"id": "site-c", "name": "C"}])
    second = provision(parse_federation(grown), tmp_path, reuse_ca=True)
    assert (first.roster_version, second.roster_version) == (1, 2)
    assert second.issued == ("site-c",)
    assert set(second.kept) == {"site-a", "site-b", "agg-1", "agg-2"}
    assert (tmp_path / "bundles/site-a/signing.key").read_bytes() == site_a_key
    assert (tmp_path / "coordinator/ca.pem").read_bytes() == ca
    # Old bundles get the new roster, and it verifies with the unchanged coordinator key.
    assert load_bundle(tmp_path / "bundles/site-a").roster.site_ids == (
        "site-a",
        "site-b",
        "site-c",
    )
    assert "user site-c" in (tmp_path / "broker/acl").read_text()


def test_reuse_ca_without_a_ca_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProvisioningError, match="holds no CA"):
        provision(parse_federation(FEDERATION), tmp_path, reuse_ca=True)


def test_reuse_ca_refuses_another_federations_folder(provisioned: Path) -> None:
    other = dict(FEDERATION, federation={**FEDERATION["federation"], "id": "other-fed"})
    with pytest.raises(ProvisioningError, match="belongs to federation 'fed-test'"):
        provision(parse_federation(other), provisioned, reuse_ca=True)


def test_hospital_name_too_long_for_a_certificate_says_so() -> None:
    long_name = "The Royal Infirmary and Associated Teaching Hospitals of the North West"
    data = dict(FEDERATION, sites=[{"id": "site-a", "name": long_name}])
    with pytest.raises(ConfigError, match=r"71 characters.*at most 64 \(RFC 5280\); shorten it"):
        parse_federation(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"aggregators": [{"id": "agg-1", "name": "A"}]}, "at least two"),
        ({"sites": []}, "at least one"),
        ({"federation": {"id": "fed", "leader": "site-a"}}, "leader 'site-a' is not one of"),
        ({"federation": {"id": "fed/x", "leader": "agg-1"}}, "not a valid id"),
        ({"sites": [{"id": "agg-1", "name": "dup"}]}, "unique"),
        ({"sites": [{"id": "s", "name": "n", "mrn": "1"}]}, "exactly 'id' and 'name'"),
        ({"broker": {"mqtt_port": 0}}, "mqtt_port"),
        ({"broker": {"websockets_port": True}}, "websockets_port"),
        ({"extra": {}}, "unknown table"),
        ({"federation": {"id": "fed", "leader": "agg-1"}}, r"studies must list.*ACL"),
        ({"federation": {"id": "fed", "leader": "agg-1", "studies": []}}, "studies must list"),
        ({"federation": {"id": "fed", "leader": "agg-1", "studies": ["a/+"]}}, "not a valid"),
        ({"federation": {"id": "f", "leader": "agg-1", "studies": ["presence"]}}, "reserved"),
        ({"federation": {"id": "f", "leader": "agg-1", "studies": ["s", "s"]}}, "twice"),
    ],
)
def test_federation_file_errors_name_the_fix(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_federation(dict(FEDERATION, **change))


def test_acl_grants_exactly_the_roles(provisioned: Path) -> None:
    acl = (provisioned / "broker/acl").read_text()
    site_block = acl.split("user site-a\n")[1].split("\n\n")[0].splitlines()
    expected = ["topic write tessera/fed-test/presence/site-a"]
    for study in FEDERATION["federation"]["studies"]:
        expected += [
            f"topic read tessera/fed-test/{study}/round",
            f"topic read tessera/fed-test/{study}/release",
            f"topic read tessera/fed-test/{study}/candidate/site-a",
            f"topic write tessera/fed-test/{study}/share/agg-1/site-a",
            f"topic write tessera/fed-test/{study}/share/agg-2/site-a",
            f"topic write tessera/fed-test/{study}/audit/site-a",
            f"topic read tessera/fed-test/{study}/release/site-a",
            f"topic read tessera/fed-test/{study}/receipts/+",
            f"topic write tessera/fed-test/{study}/fetch/site-a",
        ]
    assert sorted(site_block) == sorted(expected)
    leader = acl.split("user agg-1\n")[1].split("\n\n")[0]
    other = acl.split("user agg-2\n")[1].split("\n\n")[0]
    assert "topic write tessera/fed-test/study-1/participants" in leader
    assert "participants" in other and "write tessera/fed-test/study-1/participants" not in other
    assert "share/agg-1/+" in leader and "share/agg-1" not in other
    assert "topic write tessera/fed-test/study-1/candidate/site-b" in leader
    assert "candidate" not in other  # aggregators compute their own candidate
    assert "topic read tessera/fed-test/study-1/audit/+" in other
    for block in (leader, other):  # any aggregator answers a node's release request
        assert "topic read tessera/fed-test/study-1/fetch/+" in block
        assert "topic write tessera/fed-test/study-1/release/site-b" in block
    assert "topic write tessera/fed-test/study-1/receipts/agg-2" in other
    assert "receipts/agg-1" not in other and "read tessera/fed-test/study-1/receipts" not in other


def test_every_topic_a_member_may_write_is_concrete(provisioned: Path) -> None:
    """So a member can leave at most one retained message per topic it may write, and only
    under the federation's own study ids."""
    rules = [r.split() for r in (provisioned / "broker/acl").read_text().splitlines()]
    written = [r[2] for r in rules if r[:2] in (["topic", "write"], ["topic", "readwrite"])]
    assert written and all("+" not in t and "#" not in t for t in written)
    studies = set(FEDERATION["federation"]["studies"]) | {"presence"}
    assert {t.split("/")[2] for t in written} == studies
    # A site's: one share per aggregator, one audit report and one release request per
    # study, and its presence.
    acl = (provisioned / "broker/acl").read_text()
    site_a = acl.split("user site-a\n")[1].split("\n\n")[0].splitlines()
    assert len([r for r in site_a if " write " in r]) == 4 * len(studies - {"presence"}) + 1


def test_mosquitto_conf_has_the_security_settings(provisioned: Path) -> None:
    conf = (provisioned / "broker/mosquitto.conf").read_text()
    for line in [
        "per_listener_settings true",
        "persistence true",
        "max_packet_size 2162688",
        "max_queued_messages 100000",
        "max_queued_bytes ",
        "protocol websockets",
        "listener 443 ",
        "listener 8883 ",
    ]:
        assert line in conf
    for line in [
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "crlfile /mosquitto/config/crl.pem",
        "tls_version tlsv1.2",
        "allow_anonymous false",
    ]:
        assert conf.count(line) == 2, line
    assert "allow_anonymous true" not in conf
    suites = [line.split()[1] for line in conf.splitlines() if line.startswith("ciphers")]
    assert len(suites) == 4
    for suite in ":".join(suites).split(":"):
        assert "GCM" in suite or "CHACHA20-POLY1305" in suite or "CHACHA20_POLY1305" in suite


def test_there_is_no_websockets_listener_unless_the_federation_asks(tmp_path: Path) -> None:
    """Mosquitto 2.0 checks no CRL on its WebSockets listener, so it is opt-in."""
    without = dict(FEDERATION, broker={"max_packet_bytes": 2 << 20})
    provision(parse_federation(without), tmp_path)
    conf = (tmp_path / "broker/mosquitto.conf").read_text()
    assert "protocol websockets" not in conf and conf.count("listener ") == 1
    bundle = load_bundle(tmp_path / "bundles/site-a")
    with pytest.raises(ConfigError, match="no WebSockets listener"):
        bundle.session_config("broker.example", transport="websockets")


def test_cli_provisions_the_example_and_refuses_a_second_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["provision", str(EXAMPLE), "--out", str(out)]) == 0
    assert "issued: site-a, site-b, site-c, agg-uni, agg-ngo" in capsys.readouterr().out
    document = tomllib.loads((out / "bundles/site-b/bundle.toml").read_text())
    assert document["member"] == {"id": "site-b", "role": "site", "federation": "demo-fed"}
    assert main(["provision", str(EXAMPLE), "--out", str(out)]) == 2
    assert "refusing to replace it" in capsys.readouterr().err
    assert main(["provision", str(EXAMPLE), "--out", str(out), "--reuse-ca"]) == 0
    assert load_federation(EXAMPLE).leader == "agg-uni"
    assert os.access(out / "broker/mosquitto.conf", os.R_OK)


def test_server_certificate_is_reissued_only_when_host_names_change(tmp_path: Path) -> None:
    provision(parse_federation(FEDERATION), tmp_path)
    first = (tmp_path / "broker/server.pem").read_bytes()
    provision(parse_federation(FEDERATION), tmp_path, reuse_ca=True)
    assert (tmp_path / "broker/server.pem").read_bytes() == first
    moved = dict(FEDERATION, broker={"hostnames": ["mqtt.hospital-net.example"]})
    provision(parse_federation(moved), tmp_path, reuse_ca=True)
    cert = x509.load_pem_x509_certificate((tmp_path / "broker/server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mqtt.hospital-net.example" in names.get_values_for_type(x509.DNSName)
    document = tomllib.loads((tmp_path / "bundles/site-a/bundle.toml").read_text())
    assert document["broker"]["hostnames"] == ["mqtt.hospital-net.example"]
