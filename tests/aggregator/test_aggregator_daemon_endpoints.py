"""The aggregator daemon's HTTP server binds where `http_host` says, and its /readyz `keys`
check fails when a key on disk is not the roster's."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from aggregator.daemon import READINESS_CHECKS
from node.demo.federation import PreparedFederation
from tessera.crypto.sealing import generate_hpke_key, save_hpke_key
from tests.support.daemons import aggregator_daemon, close_unstarted, failing, get_json, prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedFederation:
    return prepare(tmp_path_factory.mktemp("fed"))


def test_http_host_binds_the_address_it_names(prepared: PreparedFederation) -> None:
    daemon = aggregator_daemon(prepared, "agg-uni", http_host="127.0.0.2")
    try:
        daemon.health.start()
        port = daemon.health.port
        assert get_json(f"http://127.0.0.2:{port}/healthz") == (200, {"status": "alive"})
        with pytest.raises(ConnectionRefusedError):  # not on any other address
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
    finally:
        close_unstarted(daemon)


def test_readyz_keys_fails_for_an_hpke_key_that_is_not_the_rosters(
    prepared: PreparedFederation,
) -> None:
    key_file = prepared.bundle("agg-ngo") / "hpke.key"
    original = key_file.read_bytes()
    daemon = aggregator_daemon(prepared, "agg-ngo")
    try:
        assert daemon.health.check_names == READINESS_CHECKS
        assert READINESS_CHECKS[:3] == ("broker", "keys", "store")
        daemon.health.start()
        url = f"http://127.0.0.1:{daemon.health.port}/readyz"
        assert failing(url) == (503, ["broker"])
        key_file.unlink()
        save_hpke_key(generate_hpke_key(), key_file)
        assert failing(url) == (503, ["broker", "keys"])
    finally:
        key_file.write_bytes(original)
        close_unstarted(daemon)


def test_audit_anchors_go_to_the_log_stream_and_the_anchor_file(
    prepared: PreparedFederation, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tessera.errors import ConfigError
    from tessera.governance.audit import read_entries
    from tessera.observability.events import Event

    state = prepared.state("agg-uni")
    with pytest.raises(ConfigError, match=r"audit_anchor_file.*outside"):
        aggregator_daemon(prepared, "agg-uni", audit_anchor_file=str(state / "x" / "anchors"))
    anchors = tmp_path / "anchors"
    caplog.set_level("INFO", logger="tessera.audit")
    daemon = aggregator_daemon(prepared, "agg-uni", audit_anchor_file=str(anchors))
    try:
        assert daemon.audit is not None
        daemon.audit.append("round-aborted", {"study_id": "lesion", "round": 1, "reason": "test"})
    finally:
        close_unstarted(daemon)
    last = read_entries(state / "audit.log")[-1]
    logged = [r.__dict__["fields"]["anchor"] for r in caplog.records if r.msg == Event.AUDIT_ANCHOR]
    assert logged[-1] == anchors.read_text().splitlines()[-1] == f"{last.seq}:{last.hash}"
