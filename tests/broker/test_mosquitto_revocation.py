"""Issue 20, point 3: a revoked or superseded certificate no longer connects.

Provisioning keeps a certificate revocation list signed by the federation CA beside the
broker configuration, and Mosquitto loads it. Re-issuing a member (its bundle folder
deleted, then `--reuse-ca`; or `--reissue MEMBER`) revokes its previous certificate;
`--revoke MEMBER` revokes the current one. Each is checked against a real Mosquitto
restarted on the new list, as an operator would after revoking.
"""

from __future__ import annotations

import argparse
import getpass
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from support.mosquitto import TEST_FEDERATION, MosquittoProcess, mqtt_connects

from broker.cli import register
from broker.provisioning.federation import Federation
from broker.provisioning.provision import provision


@pytest.fixture(scope="module")
def out(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A provisioned federation of this module's own, since its tests revoke certificates."""
    folder = tmp_path_factory.mktemp("revocation") / "provisioned"
    provision(federation, folder, run_as_user=getpass.getuser())
    return folder


@pytest.fixture(scope="module")
def broker(
    federation: Federation, out: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoProcess]:
    """A real Mosquitto on `out`'s broker files."""
    with MosquittoProcess(federation, out, tmp_path_factory.mktemp("mosquitto")) as process:
        yield process


def tessera(*argv: str) -> int:
    """`tessera ARGV` with only the broker package's commands (`tessera.cli` would import
    every service's, torch included)."""
    parser = argparse.ArgumentParser(prog="tessera")
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.handler(args))


def keep_copy(bundle: Path, where: Path) -> Path:
    """A copy of a member's current certificate, key and CA, as someone who stole them has."""
    where.mkdir()
    for name in ("ca.pem", "client.pem", "client.key"):
        shutil.copy2(bundle / name, where / name)
    return where


def test_a_reissued_members_old_certificate_no_longer_connects(
    federation: Federation, out: Path, broker: MosquittoProcess, tmp_path: Path
) -> None:
    old = keep_copy(out / "bundles/site-b", tmp_path / "old")
    assert mqtt_connects(old, broker)
    shutil.rmtree(out / "bundles/site-b")  # re-issue site-b as issue 20 did
    provision(federation, out, reuse_ca=True, run_as_user=getpass.getuser())
    broker.restart()
    assert mqtt_connects(out / "bundles/site-b", broker)
    assert not mqtt_connects(old, broker)


def test_the_cli_revokes_a_member_and_reissues_it(
    out: Path, broker: MosquittoProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "FEDERATION.toml"
    toml.write_text(tomli_w.dumps(TEST_FEDERATION))
    revoked = keep_copy(out / "bundles/site-a", tmp_path / "revoked")
    args = ["provision", str(toml), "--out", str(out), "--reuse-ca"]
    assert tessera(*args, "--revoke", "site-a") == 0
    assert "revoked: site-a" in capsys.readouterr().out
    broker.restart()
    assert not mqtt_connects(out / "bundles/site-a", broker)
    assert mqtt_connects(out / "bundles/agg-1", broker)  # nobody else is affected

    assert tessera(*args, "--reissue", "site-a") == 0
    assert "reissued: site-a" in capsys.readouterr().out
    broker.restart()
    assert mqtt_connects(out / "bundles/site-a", broker)
    assert not mqtt_connects(revoked, broker)
