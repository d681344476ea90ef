"""A node whose newest model files are damaged on disk, with real processes (Mosquitto over
TLS, two aggregators, two node daemons, ONNX Runtime).

1. Two rounds release versions 1 and 2; every process stops but the broker.
2. site-a's version 2 is damaged: `model.safetensors` and `release.bin` truncated, one byte
   of `model.onnx` changed. site-a starts again: no traceback; it names the damaged version,
   trains from and serves the newest intact one (version 1: `/readyz` 200 with a warning,
   `POST /v1/infer` answers with version 1), and asks the aggregators for version 2 again.
3. One aggregator starts (the request waited for it in its persistent session) and sends
   version 2 to site-a alone; site-a verifies it, rewrites the damaged files, and serves it.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support.e2e import LiveFederation

from node.demo.federation import FederationSpec
from node.round.releases import ModelStore
from tessera.observability.events import Event
from tessera.wire.release import ONNX_FILE, RELEASE_FILE, WEIGHTS_FILE

LEADER, FOLLOWER = "agg-uni", "agg-ngo"
SITE = "site-a"
SPEC = FederationSpec(
    sites=(SITE, "site-b"),
    federation_id="damage-fed",
    min_participants=2,
    round={"collect_timeout_s": 20, "agreement_timeout_s": 25, "start_wait_s": 3,
           "pause_s": 2, "max_rounds": 2, "local_epochs": 1, "weight_cap": 64},
    strategy={"adaptive": False},
    training={"batch_size": 16, "noise_multiplier": 0.8},
)  # fmt: skip


def _request(port: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _damage(folder: Path) -> None:
    for name in (WEIGHTS_FILE, RELEASE_FILE):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    onnx = bytearray((folder / ONNX_FILE).read_bytes())
    onnx[len(onnx) // 2] ^= 0xFF
    (folder / ONNX_FILE).write_bytes(bytes(onnx))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_damaged_newest_model_falls_back_and_is_fetched_again(tmp_path: Path) -> None:
    with LiveFederation(tmp_path, SPEC, images_per_site=40) as live:
        live.start_all()
        live.wait_for(SITE, Event.RELEASE_INSTALLED, timeout=240, version=2)
        live.stop_all()

        state = live.state(SITE)
        store = ModelStore(state, SPEC.federation_id, SPEC.study_id)
        record = store.get(2)
        assert record is not None and [m.version for m in store.versions()] == [1, 2]
        _damage(store.folder(2))

        # 2. Restart: the newest intact version serves, the damaged one is named.
        live.start(SITE)
        started = live.wait_for(SITE, Event.NODE_STARTED, run=1, timeout=120)  # old: traceback
        port = int(started["http_port"])
        damaged = live.wait_for(SITE, Event.MODEL_DAMAGED, run=1, timeout=30, version=2)
        assert "re-fetch" in damaged["reason"]
        assert live.find(SITE, Event.MODEL_SWAPPED, run=1)[0]["version"] == 1
        live.wait_for(SITE, Event.RELEASE_REFETCH_REQUESTED, run=1, timeout=60, version=2)
        status, body = _request(port, "/readyz")
        ready = json.loads(body)
        assert status == 200 and ready["ready"] is True, body
        assert any("version 2" in warning for warning in ready["warnings"]), body
        dicom = next((live.root / "synth" / "site-00" / "dicom").rglob("*.dcm")).read_bytes()
        status, body = _request(port, "/v1/infer", dicom)
        assert status == 200 and json.loads(body)["model_version"] == "1", body

        # 3. One aggregator comes back and answers the waiting request.
        live.start(FOLLOWER)
        live.wait_for(FOLLOWER, Event.RELEASE_RESENT, run=1, timeout=120, node=SITE, version=2)
        live.wait_for(SITE, Event.MODEL_REPAIRED, run=1, timeout=60, version=2)
        live.wait_for(SITE, Event.MODEL_SWAPPED, run=1, timeout=30, version=2)
        status, body = _request(port, "/v1/infer", dicom)
        assert status == 200 and json.loads(body)["model_version"] == "2", body
        status, body = _request(port, "/readyz")
        ready = json.loads(body)
        assert status == 200 and (ready["ready"], ready["failing"]) == (True, []), body
        assert "warnings" not in ready, body
        folder = store.folder(2)
        for name, expected in ((WEIGHTS_FILE, record.model_hash), (ONNX_FILE, record.onnx_hash)):
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == expected, name
