"""A real node daemon's endpoints: its /readyz checks are real (`keys` fails when a key on
disk is not the roster's, `model` passes only with a verified release serving), and
inference has a listener of its own, on loopback unless configured, with TLS and a token
otherwise, never on the health port."""

from __future__ import annotations

import hashlib
import json
import secrets
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from node.daemon import READINESS_CHECKS
from node.demo.federation import PreparedFederation
from tessera.crypto.signing import generate_signing_key, load_private_key, save_private_key
from tessera.errors import ConfigError
from tests.support.daemons import (
    close_unstarted,
    failing,
    node_daemon,
    prepare,
    release_payload,
)
from tests.support.dicom_net import tls_files
from tests.support.models import pydicom_file


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedFederation:
    return prepare(tmp_path_factory.mktemp("fed"))


def test_readyz_names_the_real_failing_checks(prepared: PreparedFederation) -> None:
    key_file = prepared.bundle("site-a") / "signing.key"
    original = load_private_key(key_file)
    daemon = node_daemon(prepared, "site-a")
    try:
        assert daemon.health.check_names == READINESS_CHECKS
        assert READINESS_CHECKS[:3] == ("broker", "keys", "model")
        daemon.health.start()
        url = f"http://127.0.0.1:{daemon.health.port}/readyz"
        # Never connected, no release yet: the keys are the roster's.
        assert failing(url) == (503, ["broker", "model"])
        daemon._on_release("release", release_payload(prepared))  # verified and installed
        assert failing(url) == (503, ["broker"])
        # A signing key that is not the one the roster names (a wrong or rotated mount).
        key_file.unlink()
        save_private_key(generate_signing_key(), key_file)
        assert failing(url) == (503, ["broker", "keys"])
        key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\ntruncated")  # unreadable
        assert failing(url) == (503, ["broker", "keys"])
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
        assert "keys" not in failing(url)[1]
        other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key_file.write_bytes(other)
        assert "keys" in failing(url)[1]
    finally:
        key_file.write_bytes(original)
        close_unstarted(daemon)


def post(url: str, body: bytes, token: str | None, context: ssl.SSLContext | None) -> int:
    """The status of a POST of `body`, with the token as a bearer credential if given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as answer:
            assert json.loads(answer.read())["model_version"] == "1"
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_inference_has_its_own_tls_listener_with_a_token(
    prepared: PreparedFederation, tmp_path: Path
) -> None:
    pki, token = tls_files(tmp_path / "pki"), secrets.token_urlsafe(32)
    (tmp_path / "token.sha256").write_text(hashlib.sha256(token.encode()).hexdigest())
    daemon = node_daemon(prepared, "site-b", inference={
        "host": "127.0.0.1", "port": 0, "tls_cert": str(pki["server"]),
        "tls_key": str(pki["server_key"]), "token_sha256_file": str(tmp_path / "token.sha256"),
    })  # fmt: skip
    try:
        assert daemon.inference is not None
        daemon.health.start()
        daemon.inference.start()
        daemon._on_release("release", release_payload(prepared))
        body = pydicom_file("MR_small.dcm").read_bytes()
        trust = ssl.create_default_context(cafile=str(pki["ca"]))
        url = f"https://127.0.0.1:{daemon.inference.port}/v1/infer"
        assert post(url, body, None, trust) == 401
        assert post(url, body, "not-the-token", trust) == 401
        assert post(url, body, token, trust) == 200
        health = f"http://127.0.0.1:{daemon.health.port}"
        assert post(f"{health}/v1/infer", body, token, None) == 404  # never on the health port
        with urllib.request.urlopen(f"{health}/metrics", timeout=30) as answer:
            metrics = answer.read().decode()
        assert 'tessera_inference_latency_seconds_count{outcome="ok"} 1.0' in metrics
    finally:
        close_unstarted(daemon)


def test_inference_is_on_loopback_unless_tls_and_a_token_let_it_off(
    prepared: PreparedFederation,
) -> None:
    daemon = node_daemon(prepared, "site-a")  # the shipped default: no [inference] host
    try:
        assert daemon.inference is not None
        assert daemon.inference.httpd.server_address[0] == "127.0.0.1"
    finally:
        close_unstarted(daemon)
    with pytest.raises(ConfigError, match=r"inference\.host.*needs TLS and a client credential"):
        node_daemon(prepared, "site-a", inference={"host": "0.0.0.0"})


def test_audit_anchors_leave_the_state_folder_and_catch_a_cut_tail(
    prepared: PreparedFederation, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tessera.governance.audit import Anchor, AuditLog, AuditVerificationError, read_entries
    from tessera.governance.audit import verify as verify_log
    from tessera.observability.events import Event

    state = prepared.state("site-b")
    with pytest.raises(ConfigError, match=r"audit_anchor_file.*outside"):  # never beside the log
        node_daemon(prepared, "site-b", audit_anchor_file=str(state / "anchors"))
    anchors = tmp_path / "other-volume" / "site-b.anchors"
    anchors.parent.mkdir()
    caplog.set_level("INFO", logger="tessera.audit")
    daemon = node_daemon(prepared, "site-b", audit_anchor_file=str(anchors))
    try:
        daemon._on_release("release", release_payload(prepared, version=2))  # audited
        with AuditLog.open(state / "audit.log", counts_only=True) as other:  # the receiver, a CLI
            other.append("quarantine", {"count": 1})
        daemon.audit.catch_up()  # what the daemon's loop does every few seconds
    finally:
        close_unstarted(daemon)
    entries = read_entries(state / "audit.log")
    last = Anchor(entries[-1].seq, entries[-1].hash)
    logged = [r.__dict__["fields"]["anchor"] for r in caplog.records if r.msg == Event.AUDIT_ANCHOR]
    trail = anchors.read_text().splitlines()
    assert logged[-1] == trail[-1] == last.to_text()
    assert len(trail) >= 2 and trail == sorted(set(trail), key=trail.index)  # appended, kept
    # Whoever cuts the log's last entry is caught by the anchor kept outside it.
    lines = (state / "audit.log").read_bytes().splitlines(keepends=True)
    (state / "audit.log").write_bytes(b"".join(lines[:-1]))
    with pytest.raises(AuditVerificationError, match="last entries were deleted"):
        verify_log(state / "audit.log", Anchor.from_text(trail[-1]))
