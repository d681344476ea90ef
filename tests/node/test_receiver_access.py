"""Who may push to the C-STORE receiver: allowed calling AE titles, from allowed addresses,
over DICOM TLS when it is configured. Everyone else is refused at association
(A-ASSOCIATE-RJ), and the refusal is logged without what the peer sent. A receiver with no
allow-list does not start. Driven by dcmtk's real storescu against the real server."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.transport import ThreadedAssociationServer

from node.config import node_config_from_mapping
from node.intake.receiver import ReceiverConfig, ReceiverTLS, start_receiver
from tessera.errors import ConfigError
from tessera.observability.events import Event
from tests.support.dicom_net import CALLING, image_object, storescu, tls_files


def start(state: Path, **overrides: Any) -> ThreadedAssociationServer:
    """A receiver on a free loopback port that allows the calling AE title PACS1."""
    settings = {"host": "127.0.0.1", "port": 0, "allowed_calling_aets": (CALLING,), **overrides}
    return start_receiver(ReceiverConfig(state_dir=state, **settings))


def received(state: Path) -> list[Path]:
    folder = state / "received"
    return [p for p in folder.iterdir() if p.suffix == ".dcm"] if folder.is_dir() else []


def test_a_receiver_without_an_allow_list_does_not_start(tmp_path: Path) -> None:
    node = {"site_id": "site-a", "bundle_dir": str(tmp_path), "study_id": "chest-xray"}
    with pytest.raises(ConfigError, match=r"receiver\.allowed_calling_aets.*PACS"):
        node_config_from_mapping({**node, "receiver": {"enabled": True}}, env={})
    with pytest.raises(ValueError, match="allowed_calling_aets"):
        ReceiverConfig(state_dir=tmp_path, allowed_calling_aets=())
    disabled = node_config_from_mapping(node, env={})
    assert disabled.receiver.host == "127.0.0.1"  # loopback unless configured otherwise
    assert ReceiverConfig(state_dir=tmp_path, allowed_calling_aets=("PACS1",)).host == "127.0.0.1"


def test_senders_off_the_allow_lists_are_rejected_at_association(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = image_object(tmp_path / "ct.dcm")
    caplog.set_level(logging.INFO, logger="tessera.node.receiver")
    server = start(tmp_path / "by-aet")
    try:
        stranger = storescu(server.server_address[1], path, calling="STRANGER")
        allowed = storescu(server.server_address[1], path)
    finally:
        server.shutdown()
    assert "Association Rejected" in stranger.stderr, stranger.stderr
    assert "Calling AE Title Not Recognized" in stranger.stderr
    assert allowed.returncode == 0, allowed.stderr
    assert len(received(tmp_path / "by-aet")) == 1

    # PACS1 is allowed, but not from this address
    server = start(tmp_path / "by-address", allowed_networks=("10.77.0.0/16",))
    try:
        elsewhere = storescu(server.server_address[1], path)
    finally:
        server.shutdown()
    assert "Association Rejected" in elsewhere.stderr, elsewhere.stderr
    assert received(tmp_path / "by-address") == []

    refusals = [r for r in caplog.records if r.getMessage() == Event.RECEIVER_REJECTED]
    assert [r.fields["reason"] for r in refusals] == ["calling-aet", "address"]  # type: ignore[attr-defined]
    logged = " ".join(str(getattr(r, "fields", "")) for r in caplog.records)
    assert "STRANGER" not in logged  # what a refused peer sends is never logged


def test_dicom_tls_with_a_client_certificate_and_no_plaintext(tmp_path: Path) -> None:
    pki = tls_files(tmp_path / "pki")
    path = image_object(tmp_path / "ct.dcm")
    tls = ReceiverTLS(pki["server"], pki["server_key"], client_ca_file=pki["ca"])
    server = start(tmp_path / "state", tls=tls)
    port = server.server_address[1]
    trust = ("+cf", str(pki["ca"]))
    try:
        # A peer that connects and never speaks must not hold up the next one.
        with socket.create_connection(("127.0.0.1", port), timeout=60):
            secure = storescu(port, path, extra=("+tls", str(pki["client_key"]),
                                                 str(pki["client"]), *trust))  # fmt: skip
        plaintext = storescu(port, path)
        no_certificate = storescu(port, path, extra=("+tla", *trust))
    finally:
        server.shutdown()
    assert secure.returncode == 0, secure.stderr
    assert plaintext.returncode != 0 and no_certificate.returncode != 0
    assert len(received(tmp_path / "state")) == 1
