"""The node's /readyz checks are real: `keys` fails when the signing key on disk is not the
roster's, `model` passes only with a verified release serving; the names are the README's."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.daemon import READINESS_CHECKS
from node.demo.federation import PreparedFederation
from tessera.crypto.signing import generate_signing_key, load_private_key, save_private_key
from tests.support.daemons import close_unstarted, get_json, node_daemon, prepare, release_payload


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedFederation:
    return prepare(tmp_path_factory.mktemp("fed"))


def test_readyz_names_the_real_failing_checks(prepared: PreparedFederation) -> None:
    key_file = prepared.bundle("site-a") / "signing.key"
    original = load_private_key(key_file)
    daemon = node_daemon(prepared, "site-a")
    try:
        assert daemon.health.check_names == READINESS_CHECKS == ("broker", "keys", "model")
        daemon.health.start()
        url = f"http://127.0.0.1:{daemon.health.port}/readyz"
        # Never connected, no release yet: the keys are the roster's.
        assert get_json(url) == (503, {"ready": False, "failing": ["broker", "model"]})
        daemon._on_release("release", release_payload(prepared))  # verified and installed
        assert get_json(url) == (503, {"ready": False, "failing": ["broker"]})
        # A signing key that is not the one the roster names (a wrong or rotated mount).
        key_file.unlink()
        save_private_key(generate_signing_key(), key_file)
        assert get_json(url) == (503, {"ready": False, "failing": ["broker", "keys"]})
        key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\ntruncated")  # unreadable
        assert get_json(url)[1]["failing"] == ["broker", "keys"]
    finally:
        key_file.unlink()
        save_private_key(original, key_file)
        close_unstarted(daemon)


def test_a_tls_key_that_is_not_the_certificates_fails_keys(
    prepared: PreparedFederation, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_file = prepared.bundle("site-b") / "client.key"
    original = key_file.read_bytes()
    daemon = node_daemon(prepared, "site-b")
    try:
        daemon.health.start()
        url = f"http://127.0.0.1:{daemon.health.port}/readyz"
        assert "keys" not in get_json(url)[1]["failing"]
        other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key_file.write_bytes(other)
        assert "keys" in get_json(url)[1]["failing"]
    finally:
        key_file.write_bytes(original)
        close_unstarted(daemon)
